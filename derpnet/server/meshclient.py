"""The relay's outgoing mesh links: one DERP client connection per `--mesh-with` member.

Layer: relay server, on the relay's event loop (derper's derphttp mesh client and
RunWatchConnectionLoop). A `MeshLink` dials its member with our server key and the mesh
key, sends WatchConns, and registers a route in the `MeshHub` for every PeerPresent
(removed on PeerGone, and all of them when the link breaks). Packets for those keys go out
as ForwardPacket frames on this link. WatchConns is followed by a Ping: its Pong proves
the member accepted our mesh key (derper closes the connection at WatchConns otherwise).
A link that reaches our own server key (the member list names us) stops, as derper's.
When and what to log and how long to wait between attempts: `MeshRetry` (sans-IO).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import ssl
from typing import TYPE_CHECKING

from .. import frames as F
from ..connection import ClientConnection, State
from ..errors import DerpError
from ..events import Connected, Event, Hello, Upgrade
from ..keys import PublicKey
from .mesh import MeshTarget

if TYPE_CHECKING:  # pragma: no cover
    from .server import RelayServer

__all__ = ["MeshLink", "MeshRetry", "Outcome", "RETRY_INTERVAL", "RETRY_MAX", "FORWARD_BUFFER_LIMIT"]

log = logging.getLogger(__name__)

RETRY_INTERVAL = 5.0   # derper's mesh retryInterval
RETRY_MAX = 300.0      # a member refusing our key is retried at most this rarely
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0   # the member keeps us alive every 60 s
FORWARD_BUFFER_LIMIT = 4 << 20  # bytes waiting for the member: beyond, ForwardPackets are dropped
_PROOF = b"meshpsk?"   # the Ping behind WatchConns


class Outcome(enum.Enum):
    """How one attempt of a mesh link ended."""

    UNREACHABLE = "unreachable"  # DNS, TCP, TLS, or an HTTP/DERP handshake error
    REFUSED = "refused"          # the member refused our mesh key
    BROKEN = "broken"            # an accepted link ended


class MeshRetry:
    """Waits between attempts and which failures to log (pure; one per link).

    A refused mesh key is a configuration error: logged once (WARNING) until the link works,
    retried with a doubling wait from `interval` up to `cap`, never in a tight loop. Other
    failures are retried every `interval`, as derper does, and logged once per streak."""

    def __init__(self, interval: float = RETRY_INTERVAL, cap: float = RETRY_MAX) -> None:
        self.interval = interval
        self.cap = max(cap, interval)
        self.refusals = 0
        self._last: Outcome | None = None

    def failed(self, outcome: Outcome) -> tuple[float, bool]:
        """(seconds to wait, whether to log it at WARNING) after an attempt ended so."""
        first = outcome is not self._last
        self._last = outcome
        if outcome is Outcome.REFUSED:
            self.refusals += 1
            return min(self.interval * 2 ** min(self.refusals - 1, 30), self.cap), first
        self.refusals = 0
        return self.interval, first and outcome is not Outcome.BROKEN

    def accepted(self) -> None:
        """The member accepted us: the next failure is news again."""
        self._last = None
        self.refusals = 0


class MeshLink:
    """One member of the mesh, seen from here: a watch connection that forwards packets."""

    def __init__(self, server: RelayServer, target: MeshTarget, *, ssl_context: ssl.SSLContext | None = None,
                 retry: MeshRetry | None = None) -> None:
        self.server = server
        self.target = target
        self.ssl_context = ssl_context
        self.retry = retry or MeshRetry()
        self.accepted = False  # the member took our mesh key (Pong after WatchConns)
        self.attempts = 0
        self.forward_drops = 0
        self.member_key: PublicKey | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._keys: set[PublicKey] = set()
        self._pending: list[bytes] = []  # ForwardPacket frames written at the end of this loop turn
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"<MeshLink {self.target.url}>"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"mesh {self.target.host}")

    async def close(self) -> None:
        """Stop the link. The cancel is repeated until the task ends: Python 3.11's
        asyncio.wait_for swallows a cancel that races its inner future's completion, and the
        watch loop would then go on retrying (seen as a DerpServer whose close() hung)."""
        task, self._task = self._task, None
        self._closing = True
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved (a bug in the loop was logged there already)

    # ------------------------------------------------------------ forwarding (the Forwarder interface)

    def forward_packet(self, src: PublicKey, dst: PublicKey, data: bytes) -> None:
        """ForwardPacket to the member; dropped (counted) when the link is down or backed up."""
        w = self._writer
        if w is None or w.is_closing() or w.transport.get_write_buffer_size() > FORWARD_BUFFER_LIMIT:
            self.forward_drops += 1
            self.server.relay.drop("mesh_link_down")
            return
        if not self._pending:  # one write per loop turn: a read from a client carries many packets
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(F.encode_forward_packet(src, dst, data))

    def _flush(self) -> None:
        frames, self._pending = self._pending, []
        w = self._writer
        if w is None or w.is_closing():
            self.forward_drops += len(frames)
            self.server.relay.drop("mesh_link_down", len(frames))
            return
        w.write(b"".join(frames))

    # ------------------------------------------------------------ the watch loop

    async def _run(self) -> None:
        name = self.target.host
        while not self._closing:
            self.attempts += 1
            try:
                outcome, why = await self._attempt()
            except Exception as e:  # a bug here must not end the link for good: log it, retry
                log.exception("mesh(%s): internal error", name)
                outcome, why = Outcome.BROKEN, f"internal error: {e}"
            if outcome is None:
                return  # we are that member
            delay, loud = self.retry.failed(outcome)
            level = logging.WARNING if loud else logging.DEBUG
            if outcome is Outcome.REFUSED:
                log.log(level, "mesh(%s): the member refused our mesh key (%s); retrying in %.3gs, "
                        "logged once until it works", name, why, delay)
            else:
                log.log(level if outcome is Outcome.UNREACHABLE else logging.INFO,
                        "mesh(%s): %s: %s; retrying in %.3gs", name, outcome.value, why, delay)
            await asyncio.sleep(delay)

    async def _attempt(self) -> tuple[Outcome | None, str]:
        t = self.target
        server = self.server
        info = {"version": F.PROTOCOL_VERSION, "CanAckPings": True, "meshKey": (server.mesh_key or b"").hex()}
        conn = ClientConnection(server.private_key, t.host, client_info=info, user_agent="derpnet-mesh")
        ctx = None
        if t.scheme == "https":
            ctx = self.ssl_context or ssl.create_default_context()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                t.dial_host, t.port, ssl=ctx, server_hostname=t.name if ctx else None), CONNECT_TIMEOUT)
        except (TimeoutError, OSError) as e:
            return Outcome.UNREACHABLE, f"cannot connect to {t.dial_host}:{t.port}: {e or type(e).__name__}"
        try:
            return await self._session(conn, reader, writer)
        finally:
            self._writer = None
            self._forget_all()
            writer.close()

    async def _session(self, conn: ClientConnection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> tuple[Outcome | None, str]:
        writer.write(conn.send(Upgrade()))
        timeout = CONNECT_TIMEOUT
        try:
            while True:
                data = await asyncio.wait_for(reader.read(256 << 10), timeout)
                if not data:
                    if conn.state is State.AWAIT_SERVER_INFO:  # our hello was refused
                        return Outcome.REFUSED, "closed the connection after our ClientInfo"
                    conn.receive_eof()
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, F.ServerKey) and ev.key == self.server.public_key:
                        log.info("mesh(%s): that is this relay; not meshing with it", self.target.host)
                        return None, "self"
                    if self._handle(conn, writer, ev):
                        timeout = IDLE_TIMEOUT
        except (DerpError, OSError) as e:
            return (Outcome.BROKEN if self.accepted else Outcome.UNREACHABLE), str(e) or type(e).__name__
        except TimeoutError:
            return (Outcome.BROKEN if self.accepted else Outcome.UNREACHABLE), f"silent for {timeout:g}s"
        if self.accepted:
            return Outcome.BROKEN, "the member closed the connection"
        return Outcome.REFUSED, "closed the connection at WatchConns"

    def _handle(self, conn: ClientConnection, writer: asyncio.StreamWriter, ev: Event) -> bool:
        """One event from the member; True once the link is up."""
        match ev:
            case F.ServerKey():
                writer.write(conn.send(Hello()))
                for later in conn.receive_data(b""):
                    self._handle(conn, writer, later)
            case Connected(server_key=key):
                self.member_key = key
                self._writer = writer
                writer.write(F.encode_watch_conns() + F.encode_ping(_PROOF))
                return True
            case F.Pong(data=data) if data == _PROOF and not self.accepted:
                self.accepted = True
                self.retry.accepted()
                log.info("mesh(%s): watching %s (%d keys there so far)", self.target.host,
                         self.member_key.short() if self.member_key else "?", len(self._keys))
            case F.PeerPresent(key=key):
                if key != self.server.public_key:
                    self._keys.add(key)
                    self.server.mesh_hub().add_route(key, self)
            case F.PeerGone(key=key):
                if key in self._keys:
                    self._keys.discard(key)
                    self.server.mesh_hub().remove_route(key, self)
            case F.Ping():
                writer.write(conn.send(ev.response()))
        return self._writer is not None

    def _forget_all(self) -> None:
        """The link broke: its member's keys are unknown now (they come back on reconnect)."""
        was, self.accepted = self.accepted, False
        keys, self._keys = self._keys, set()
        if keys:
            log.debug("mesh(%s): clearing %d forwarding routes", self.target.host, len(keys))
        hub = self.server.mesh_hub()
        for key in keys:
            hub.remove_route(key, self)
        if was:
            log.info("mesh(%s): link down", self.target.host)


def use_derp_http() -> bool:
    """derper's TS_DEBUG_USE_DERP_HTTP: mesh members are dialled over plain HTTP."""
    return os.environ.get("TS_DEBUG_USE_DERP_HTTP", "").lower() in ("1", "true", "yes", "on")
