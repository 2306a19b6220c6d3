"""Forwarding state of the relay, without I/O: who is connected under which key, where a
packet for a key goes, who must hear that a key left, and the counters.

Everything here runs on the relay's single event-loop thread, so there are no locks.
Connections are duck-typed `Endpoint`s (the asyncio protocol in `conn.py`); the relay
only calls their enqueue methods, which never block.

Duplicate keys follow derper's `lastWriterIsActive` policy (shared/derp-protocol.md §4.5):
all connections of a key stay open; the newest one is the active receiver; any frame a
duplicate sends makes it active; when the active one leaves, the most recent sender
among the rest takes over, or nobody (packets are then dropped as "dup_client").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container
from typing import Protocol

from ..disco import MAGIC as DISCO_MAGIC  # disco packets get their own queue (conn.py)
from ..disco import looks_like_disco
from ..frames import PeerGoneReason
from ..keys import PublicKey

__all__ = ["Relay", "Endpoint", "MeshHooks", "looks_like_disco", "DISCO_MAGIC", "DROP_REASONS"]

# derper's drop reasons (its /debug/varz names), plus what we count ourselves.
DROP_REASONS = (
    "unknown_dest",       # no connection for the destination key
    "dup_client",         # the key has duplicate connections and none is active
    "queue_head",         # the destination's queue was full: its oldest packet was dropped
    "gone_disconnected",  # the destination left with the packet still queued
    "restarting",         # sent while the relay was draining for a restart (restart.py)
    "unknown_dest_on_fwd",  # a mesh peer forwarded a packet for a key not connected here
    "mesh_link_down",     # the mesh link that reaches the destination could not take it
)


class Endpoint(Protocol):
    """What the relay needs from a client connection."""

    key: PublicKey
    conn_id: int
    is_dup: bool

    def enqueue_packet(self, src: PublicKey, data: bytes) -> None:
        """Queue a RecvPacket from `src`; must never block."""

    def enqueue_peer_gone(self, key: PublicKey, reason: int) -> None:
        """Queue a PeerGone frame."""

    def close(self, reason: str) -> None:
        """Drop the connection."""


class MeshHooks(Protocol):
    """What the relay tells the mesh (mesh.MeshHub) and asks it."""

    @property
    def routes(self) -> Container[PublicKey]:
        """The keys connected to other mesh members."""

    def client_present(self, c: Endpoint) -> None:
        """A connection registered."""

    def client_gone(self, key: PublicKey) -> None:
        """The last connection of `key` left."""


class _ClientSet:
    """The connections of one key: normally one; more when a key is duplicated."""

    __slots__ = ("conns", "active", "history")

    def __init__(self, first: Endpoint) -> None:
        self.conns: list[Endpoint] = [first]
        self.active: Endpoint | None = first
        self.history: list[Endpoint] = []  # duplicates only: by recency of activity, newest last


class Relay:
    """The relay's routing table and counters (one per server, used from the loop thread)."""

    def __init__(self) -> None:
        self._clients: dict[PublicKey, _ClientSet] = {}
        # src key -> connections that were sent packets from src (they get PeerGone when src leaves)
        self._watchers: dict[PublicKey, set[Endpoint]] = {}
        self.drops: Counter[str] = Counter({r: 0 for r in DROP_REASONS})
        self.connections = 0        # registered DERP connections now
        self.connections_total = 0  # registered DERP connections ever
        self.dup_keys = 0           # keys with more than one connection now
        self.packets_received = 0
        self.bytes_received = 0
        self.packets_forwarded = 0
        self.bytes_forwarded = 0
        self.peer_gone_disconnected = 0
        self.peer_gone_not_here = 0
        self.pings = 0
        self.pongs_sent = 0
        self.keepalives_sent = 0
        self.mesh: MeshHooks | None = None  # set when the relay has a mesh key

    # ------------------------------------------------------------ membership

    def register(self, c: Endpoint) -> None:
        """A client finished its hello: it becomes the active receiver for its key."""
        self.connections += 1
        self.connections_total += 1
        cs = self._clients.get(c.key)
        if cs is None:
            self._clients[c.key] = _ClientSet(c)
            c.is_dup = False
            if self.mesh is not None:
                self.mesh.client_present(c)
            return
        if len(cs.conns) == 1:
            self.dup_keys += 1
            # derper's history starts with the previous connection only.
            cs.history = [cs.conns[0]]
        else:
            cs.history.append(c)
        for other in cs.conns:
            other.is_dup = True
        c.is_dup = True
        cs.conns.append(c)
        cs.active = c
        if self.mesh is not None:
            self.mesh.client_present(c)

    def unregister(self, c: Endpoint) -> None:
        """A registered client left. When it was its key's last connection, notify watchers."""
        cs = self._clients.get(c.key)
        if cs is None or c not in cs.conns:
            return
        self.connections -= 1
        cs.conns.remove(c)
        if not cs.conns:
            del self._clients[c.key]
            if self.mesh is None:
                self._peer_gone(c.key)
                return
            self.mesh.client_gone(c.key)
            if c.key not in self.mesh.routes:  # still in the region through another member
                self._peer_gone(c.key)
            return
        if c in cs.history:
            cs.history.remove(c)
        if len(cs.conns) == 1:
            self.dup_keys -= 1
            remain = cs.conns[0]
            remain.is_dup = False
            cs.active = remain
            cs.history = []
        elif cs.active is c:
            cs.active = cs.history[-1] if cs.history else None

    def note_activity(self, c: Endpoint) -> None:
        """A duplicate connection sent a frame: it becomes the active receiver (last writer wins)."""
        cs = self._clients.get(c.key)
        if cs is None or len(cs.conns) < 2:
            return
        cs.active = c
        h = cs.history
        if not h or h[-1] is not c:
            if c in h:
                h.remove(c)  # keep each connection once: order of most recent activity
            h.append(c)

    def lookup(self, dst: PublicKey) -> tuple[Endpoint | None, int]:
        """The active connection for `dst` (or None) and how many connections the key has."""
        cs = self._clients.get(dst)
        if cs is None:
            return None, 0
        return cs.active, len(cs.conns)

    def active_connections(self) -> list[Endpoint]:
        """The active connection of every key (what a new mesh watcher is told about)."""
        return [cs.active for cs in self._clients.values() if cs.active is not None]

    def connections_of(self, key: PublicKey) -> list[Endpoint]:
        """Every connection of `key` (several when it is duplicated)."""
        cs = self._clients.get(key)
        return list(cs.conns) if cs else []

    # ------------------------------------------------------------ peer-gone bookkeeping

    def watch(self, src: PublicKey, receiver: Endpoint) -> bool:
        """`receiver` is being written a packet from `src`: tell it when `src` leaves the relay.

        Returns False (and watches nothing) if `src` has already left: the packet was
        queued before it went, and the receiver should be told right away. In a mesh an
        unknown `src` is watched anyway, as derper does: a packet forwarded by another member
        may arrive before that member's PeerPresent for its sender.
        """
        if src not in self._clients and self.mesh is None:
            return False
        w = self._watchers.get(src)
        if w is None:
            self._watchers[src] = {receiver}
        else:
            w.add(receiver)
        return True

    def unwatch(self, src: PublicKey, receiver: Endpoint) -> None:
        """Forget that `receiver` wants to hear about `src` (it is leaving)."""
        w = self._watchers.get(src)
        if w is not None:
            w.discard(receiver)
            if not w:
                del self._watchers[src]

    def peer_gone_from_mesh(self, key: PublicKey) -> None:
        """No mesh member has `key` any more: if it is not here either, it left the region."""
        if key not in self._clients:
            self._peer_gone(key)

    def _peer_gone(self, key: PublicKey) -> None:
        for receiver in self._watchers.pop(key, ()):
            receiver.enqueue_peer_gone(key, PeerGoneReason.DISCONNECTED)

    # ------------------------------------------------------------ counters

    def drop(self, reason: str, n: int = 1) -> None:
        """Count `n` dropped packets under `reason`."""
        self.drops[reason] += n

    def stats(self) -> dict[str, object]:
        """A snapshot of the counters (plain ints and a dict of drops by reason)."""
        return {
            "clients": self.connections,
            "client_keys": len(self._clients),
            "clients_total": self.connections_total,
            "dup_client_keys": self.dup_keys,
            "packets_received": self.packets_received,
            "bytes_received": self.bytes_received,
            "packets_forwarded": self.packets_forwarded,
            "bytes_forwarded": self.bytes_forwarded,
            "packets_dropped": sum(self.drops.values()),
            "dropped": dict(self.drops),
            "peer_gone_sent": {"disconnected": self.peer_gone_disconnected, "not_here": self.peer_gone_not_here},
            "pings": self.pings,
            "pongs_sent": self.pongs_sent,
            "keepalives_sent": self.keepalives_sent,
        }
