"""Per-peer path choice, relay or direct UDP: the sans-IO state machine under PacketConn.

Layer: paths (pure). No sockets, no threads, no clock: every input carries `now`.
Inputs are disco messages that arrived (already authenticated by `disco.DiscoBox`),
our endpoints, traffic notes and timer ticks; outputs are disco messages to send
(`SendDisco`, via the relay or a UDP address) and `PathChanged` events. The I/O edge
(`derpnet.direct`) moves the bytes. Model: Tailscale's magicsock `endpoint.go`.

Rules, each tested in tests/derpnet/test_paths.py:

* **Only our peers.** Nothing is ever sent to a peer until it is *enabled*: it proved
  its key in a derpnet-auth QUIC handshake (`enable()`), or it sent us a valid disco
  message. A Go derpnet peer tears its transport down on any non-0x00 packet.
* **Discovery.** An active enabled peer without a direct path gets, every
  `upgrade_interval`, a CallMeMaybe with our endpoints (over the relay) and a Ping to each
  endpoint it told us about. A CallMeMaybe received makes us ping its endpoints at once
  (both NATs open towards each other) and answer with our own CallMeMaybe.
* **Trust.** A direct path is used only after a Pong that answers one of *our* Pings
  (tx id) and arrives from the exact address pinged, inside a box that opens with the
  peer's key. Data packets never confirm a path, so a spoofed packet cannot capture one.
* **Liveness.** While traffic flows, the path gets a heartbeat Ping every `heartbeat`
  seconds, padded to the path's packet size (so a path that stops carrying large packets
  fails too); `trust` seconds without a Pong and the peer is back on the relay at once.
* **Choice.** The lowest round trip among trusted addresses, with hysteresis.
* **Packet size.** A new path carries `base_udp_size` bytes of UDP payload; padded Pings
  of the `probe_sizes` prove larger sizes (fragmentation permitting).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from .disco import CallMeMaybe, Message, Ping, Pong, new_tx_id
from .events import Event
from .keys import PublicKey

__all__ = ["PathChanged", "SendDisco", "PathInfo", "PathTable", "Addr", "RELAY_PATH_MTU", "BASE_UDP_SIZE",
           "PROBE_SIZES"]

log = logging.getLogger(__name__)

Addr = tuple[str, int]

RELAY_PATH_MTU = 65535      # the largest datagram a PacketConn carries over the relay
BASE_UDP_SIZE = 1252        # UDP payload assumed on any direct path until a probe proves more
PROBE_SIZES = (8192, 16384, 32768, 65507)  # padded pings that probe larger UDP payloads
MAX_ENDPOINTS = 32          # endpoints kept per peer (CallMeMaybe and reflexive)
MAX_PINGS = 64              # pings in flight per peer
MAX_PEERS = 4096            # peers remembered; the least recently active one is forgotten
PING_EXPIRY = 5.0           # a ping unanswered for this long is forgotten
_NO_SRC: Addr = ("0.0.0.0", 0)  # Pong.src for pings that came over the relay


@dataclass(frozen=True)
class PathChanged(Event):
    """The path to `peer` changed: `addr` None = the relay, else the direct UDP (ip, port).

    `mtu` is the largest datagram (payload bytes) the path carries; layers above shrink or
    grow their packets to it. `rtt` is the measured round trip in seconds (direct only);
    `reason` says why, for logs ("pong", "mtu", "silent", "idle", "better", "closed").
    """

    peer: PublicKey
    addr: Addr | None
    mtu: int
    rtt: float | None = None
    reason: str = ""

    @property
    def direct(self) -> bool:
        return self.addr is not None


@dataclass(frozen=True)
class SendDisco:
    """Action: seal `msg` for `peer` and send it to `addr` over UDP (None: over the relay).
    `size` > 0 asks for a Ping padded to exactly that many bytes of UDP payload; the
    sender puts its own node key in a Ping (the table does not know it)."""

    peer: PublicKey
    msg: Message
    addr: Addr | None
    size: int = 0


@dataclass(frozen=True)
class PathInfo:
    """A snapshot of one peer's path, for `PacketConn.paths()`."""

    peer: PublicKey
    addr: Addr | None
    rtt: float | None
    mtu: int
    enabled: bool
    candidates: tuple[Addr, ...]


@dataclass
class _Candidate:
    last_pong: float
    rtt: float
    udp_size: int


@dataclass
class _Ping:
    addr: Addr | None
    sent: float
    size: int


@dataclass
class _Peer:
    key: PublicKey
    enabled: bool = False
    endpoints: dict[Addr, float] = field(default_factory=dict)  # addr -> when learnt
    pings: dict[bytes, _Ping] = field(default_factory=dict)
    cands: dict[Addr, _Candidate] = field(default_factory=dict)
    best: Addr | None = None
    last_active: float = float("-inf")
    next_discovery: float = float("-inf")
    next_heartbeat: float = float("-inf")
    last_cmm_sent: float = float("-inf")
    probed: set[Addr] = field(default_factory=set)  # addresses whose sizes were probed


class PathTable:
    """Every peer's path state. Not thread-safe: the edge holds one lock around it."""

    def __init__(self, *, heartbeat: float = 1.0, trust: float = 2.5, upgrade_interval: float = 5.0,
                 idle_after: float = 30.0, base_udp_size: int = BASE_UDP_SIZE,
                 probe_sizes: Iterable[int] = PROBE_SIZES, switch_ratio: float = 0.7,
                 max_peers: int = MAX_PEERS) -> None:
        if trust <= heartbeat:
            raise ValueError("trust must be longer than the heartbeat interval")
        self.heartbeat = heartbeat
        self.trust = trust
        self.upgrade_interval = upgrade_interval
        self.idle_after = idle_after
        self.base_udp_size = base_udp_size
        self.probe_sizes = tuple(sorted(s for s in probe_sizes if s > base_udp_size))
        self.switch_ratio = switch_ratio
        self.max_peers = max_peers
        self._peers: dict[PublicKey, _Peer] = {}
        self._routes: dict[PublicKey, tuple[Addr, int]] = {}   # peer -> (addr, mtu): the hot path
        self._addr_peer: dict[Addr, PublicKey] = {}           # UDP source -> peer, for received data
        self._local: tuple[Addr, ...] = ()
        self._actions: list[SendDisco] = []
        self._events: list[PathChanged] = []
        self.ignored_pongs = 0

    # ------------------------------------------------------------ queries (hot path)

    def route(self, peer: PublicKey) -> tuple[Addr, int] | None:
        """The direct path to `peer` as (addr, mtu), or None: use the relay."""
        return self._routes.get(peer)

    def peer_for_addr(self, addr: Addr) -> PublicKey | None:
        """Which peer data from UDP `addr` belongs to (None: unknown sender, drop it)."""
        return self._addr_peer.get(addr)

    def is_enabled(self, peer: PublicKey) -> bool:
        p = self._peers.get(peer)
        return p is not None and p.enabled

    def mtu(self, peer: PublicKey) -> int:
        r = self._routes.get(peer)
        return RELAY_PATH_MTU if r is None else r[1]

    def snapshot(self) -> list[PathInfo]:
        out = []
        for p in self._peers.values():
            best = p.best
            cand = p.cands.get(best) if best is not None else None
            out.append(PathInfo(p.key, best, cand.rtt if cand else None,
                                cand.udp_size - 1 if cand else RELAY_PATH_MTU, p.enabled, tuple(p.endpoints)))
        return out

    @property
    def local_endpoints(self) -> tuple[Addr, ...]:
        return self._local

    # ------------------------------------------------------------ outputs

    def take_actions(self) -> list[SendDisco]:
        out, self._actions = self._actions, []
        return out

    def take_events(self) -> list[PathChanged]:
        out, self._events = self._events, []
        return out

    def has_events(self) -> bool:
        return bool(self._events)

    def next_deadline(self) -> float | None:
        """When `poll()` next has work (None: nothing scheduled)."""
        times = [d for p in self._peers.values() if p.enabled
                 for d in (self._peer_deadline(p),) if d is not None]
        return min(times) if times else None

    def _peer_deadline(self, p: _Peer) -> float | None:
        times = []
        if p.best is not None:
            times.append(p.cands[p.best].last_pong + self.trust)
        if p.pings:
            times.append(min(x.sent for x in p.pings.values()) + PING_EXPIRY)
        due = p.next_heartbeat if p.best is not None else p.next_discovery
        if due < p.last_active + self.idle_after:  # heartbeats and discovery only while active
            times.append(due)
        return min(times) if times else None

    # ------------------------------------------------------------ inputs

    def set_local_endpoints(self, endpoints: Iterable[Addr], now: float) -> None:
        """Our candidate addresses (interfaces, STUN). A change is announced to active peers."""
        eps = tuple(dict.fromkeys(endpoints))[:MAX_ENDPOINTS]
        if eps == self._local:
            return
        self._local = eps
        for p in self._peers.values():
            if p.enabled and self._active(p, now):
                p.next_discovery = now
                p.last_cmm_sent = float("-inf")
        self.poll(now)

    def add_local_endpoint(self, addr: Addr, now: float) -> None:
        """An address a peer saw us at (Pong.src) or STUN told us."""
        if addr != _NO_SRC and addr not in self._local:
            self.set_local_endpoints((*self._local, addr), now)

    def enable(self, peer: PublicKey, now: float) -> None:
        """`peer` is one of ours (proved its key): discovery with it may start (it is
        active: it just proved itself in a handshake)."""
        p = self._peer(peer)
        if not p.enabled:
            p.enabled = True
            p.next_discovery = now
            p.last_active = max(p.last_active, now)
            log.debug("paths: %s enabled", peer.short() if hasattr(peer, "short") else peer)
        self.poll(now)

    def note_traffic(self, peer: PublicKey, now: float) -> None:
        """Data was sent to or received from `peer`: it is active (heartbeats, upgrades)."""
        p = self._peers.get(peer)
        if p is None:
            return  # not one of ours (yet): nothing to do for it, and nothing to keep
        was_active = self._active(p, now)
        p.last_active = now
        if not was_active and p.enabled:
            p.next_discovery = min(p.next_discovery, now)
            p.next_heartbeat = min(p.next_heartbeat, now)
            self.poll(now)

    def on_disco(self, peer: PublicKey, msg: Message, src: Addr | None, now: float) -> None:
        """A disco message from `peer` (box verified) arrived from UDP `src` (None: the relay)."""
        p = self._peer(peer)
        if not p.enabled:
            p.enabled = True  # a valid disco message proves the sender is one of ours
            p.next_discovery = now
        if isinstance(msg, Ping):
            self._on_ping(p, msg, src, now)
        elif isinstance(msg, Pong):
            self._on_pong(p, msg, src, now)
        elif isinstance(msg, CallMeMaybe):
            if src is not None:
                return  # CallMeMaybe only counts over the relay, as in Tailscale
            self._on_call_me_maybe(p, msg, now)
        self.poll(now)

    def poll(self, now: float) -> None:
        """Run due timers: expiry, fallback, heartbeats, discovery."""
        for p in self._peers.values():
            if not p.enabled:
                continue
            if p.pings:
                for tx in [tx for tx, x in p.pings.items() if now - x.sent >= PING_EXPIRY]:
                    del p.pings[tx]
            active = self._active(p, now)
            if p.best is not None and now >= p.cands[p.best].last_pong + self.trust:
                dead = p.best
                del p.cands[dead]
                p.probed.discard(dead)
                others = [a for a, c in p.cands.items() if now < c.last_pong + self.trust]
                fastest = min(others, key=lambda a: p.cands[a].rtt) if others else None
                self._set_best(p, fastest, now, "silent" if active else "idle")
                p.next_discovery = now
            if not active:
                continue
            if p.best is not None:
                if now >= p.next_heartbeat:
                    best = p.best
                    self._ping(p, best, now, p.cands[best].udp_size)
                    p.next_heartbeat = now + self.heartbeat
                    if best not in p.probed:
                        self._probe_sizes(p, best, now)
            elif now >= p.next_discovery:
                self._discover(p, now)

    # ------------------------------------------------------------ internals

    def _peer(self, peer: PublicKey) -> _Peer:
        p = self._peers.get(peer)
        if p is None:
            if len(self._peers) >= self.max_peers:
                self._evict()
            p = self._peers[peer] = _Peer(peer)
        return p

    def _evict(self) -> None:
        """Forget the least recently active peer (bounded memory whoever writes to us)."""
        victim = min(self._peers.values(), key=lambda q: q.last_active)
        self._routes.pop(victim.key, None)
        for a in [a for a, k in self._addr_peer.items() if k == victim.key]:
            del self._addr_peer[a]
        del self._peers[victim.key]

    def _active(self, p: _Peer, now: float) -> bool:
        return now - p.last_active < self.idle_after

    def _discover(self, p: _Peer, now: float) -> None:
        p.next_discovery = now + self.upgrade_interval
        self._send_call_me_maybe(p, now)
        for addr in p.endpoints:
            self._ping(p, addr, now, 0)

    def _send_call_me_maybe(self, p: _Peer, now: float) -> None:
        p.last_cmm_sent = now
        self._actions.append(SendDisco(p.key, CallMeMaybe(self._local), None))

    def _ping(self, p: _Peer, addr: Addr | None, now: float, size: int) -> None:
        if len(p.pings) >= MAX_PINGS:
            oldest = min(p.pings, key=lambda tx: p.pings[tx].sent)
            del p.pings[oldest]
        tx = new_tx_id()
        p.pings[tx] = _Ping(addr, now, size)
        self._actions.append(SendDisco(p.key, Ping(tx, p.key), addr, size))

    def _probe_sizes(self, p: _Peer, addr: Addr, now: float) -> None:
        p.probed.add(addr)
        have = p.cands[addr].udp_size
        for size in self.probe_sizes:
            if size > have:
                self._ping(p, addr, now, size)

    def _learn_endpoint(self, p: _Peer, addr: Addr, now: float) -> None:
        if addr in p.endpoints:
            p.endpoints[addr] = now
            return
        if len(p.endpoints) >= MAX_ENDPOINTS:
            oldest = min(p.endpoints, key=lambda a: p.endpoints[a])
            del p.endpoints[oldest]
            if self._addr_peer.get(oldest) == p.key and oldest not in p.cands:
                del self._addr_peer[oldest]
        p.endpoints[addr] = now
        owner = self._addr_peer.get(addr)
        if owner is None or owner not in self._peers or addr not in self._peers[owner].cands:
            self._addr_peer[addr] = p.key

    def _on_ping(self, p: _Peer, msg: Ping, src: Addr | None, now: float) -> None:
        self._actions.append(SendDisco(p.key, Pong(msg.tx_id, src if src is not None else _NO_SRC), src))
        if src is None:
            return
        # A peer-reflexive candidate: the peer reached us from `src`; ping it back so
        # that our NAT opens towards it too (unless a ping to it is already in flight).
        known = src in p.endpoints
        self._learn_endpoint(p, src, now)
        if not known and not any(x.addr == src for x in p.pings.values()):
            self._ping(p, src, now, 0)

    def _on_pong(self, p: _Peer, msg: Pong, src: Addr | None, now: float) -> None:
        ping = p.pings.get(msg.tx_id)
        if ping is None or ping.addr != src:
            self.ignored_pongs += 1  # not an answer to a ping of ours from where we sent it
            return
        del p.pings[msg.tx_id]
        if src is None:
            return  # a relay round trip: nothing to learn about direct paths
        self.add_local_endpoint(msg.src, now)
        rtt = max(now - ping.sent, 0.0)
        cand = p.cands.get(src)
        if cand is None:
            cand = p.cands[src] = _Candidate(now, rtt, self.base_udp_size)
        else:
            cand.last_pong = now
            if ping.size <= self.base_udp_size:
                cand.rtt = rtt if cand.rtt <= 0 else 0.5 * cand.rtt + 0.5 * rtt
        grew = ping.size > cand.udp_size
        if grew:
            cand.udp_size = ping.size
        self._addr_peer[src] = p.key
        self._learn_endpoint(p, src, now)
        if p.best is None:
            self._set_best(p, src, now, "pong")
        elif p.best == src:
            if grew:
                self._set_best(p, src, now, "mtu", force=True)
        else:
            cur = p.cands.get(p.best)
            if cur is None or cand.rtt < cur.rtt * self.switch_ratio:
                self._set_best(p, src, now, "better")

    def _on_call_me_maybe(self, p: _Peer, msg: CallMeMaybe, now: float) -> None:
        p.last_active = max(p.last_active, now)  # the peer wants to talk: treat as active
        for addr in msg.endpoints[:MAX_ENDPOINTS]:
            self._learn_endpoint(p, addr, now)
            if p.best != addr:
                self._ping(p, addr, now, 0)
        if now - p.last_cmm_sent >= 1.0:
            self._send_call_me_maybe(p, now)
        if p.best is None:
            p.next_discovery = max(p.next_discovery, now + self.upgrade_interval)

    def _set_best(self, p: _Peer, addr: Addr | None, now: float, reason: str, *, force: bool = False) -> None:
        if addr == p.best and not force:
            return
        p.best = addr
        if addr is None:
            self._routes.pop(p.key, None)
            self._events.append(PathChanged(p.key, None, RELAY_PATH_MTU, None, reason))
            return
        cand = p.cands[addr]
        mtu = cand.udp_size - 1  # one byte of every UDP datagram is the 0x00 framing
        self._routes[p.key] = (addr, mtu)
        p.next_heartbeat = min(p.next_heartbeat, now + self.heartbeat)
        self._events.append(PathChanged(p.key, addr, mtu, cand.rtt, reason))
