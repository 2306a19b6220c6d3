"""The QUIC driver: one receive thread per PacketConn routes datagrams to connections.

The connection-independent half of the I/O edge (aioquic's `QuicServer`, with a thread
instead of an event loop): reads datagrams, routes each to its `Conn` by (peer key,
destination connection ID), creates server-side connections for Initial packets
(answering unknown versions with Version Negotiation), and runs the connections' timers
(`TimerHeap`), sleeping in the PacketConn's read deadline until the earliest. It also
relays PacketConn events (the relay link is back, the path to a peer changed) to the
connections they concern. Threads, locking and time: docs/derpquic.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import Any, ClassVar

from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported by aioquic
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder

from derpnet.frames import PeerGone, PeerGoneReason
from derpnet.keys import PrivateKey, PublicKey
from derpnet.packetconn import LinkUp
from derpnet.paths import PathChanged

from .auth import AuthPolicy, KeyProof, Role
from .carrier import Carrier
from .codes import QUIC_CONNECTION_REFUSED, AppError
from .config import Options
from .conn import MIN_PACKET_SIZE, Conn, create_conn
from .hooks import Acceptor, ConnOwner
from .routes import Routes
from .timers import TimerHeap

__all__ = ["Driver", "DriverRegistry", "Admission", "admit", "CID_LENGTH", "SUPPORTED_VERSIONS"]

log = logging.getLogger("derpquic")

CID_LENGTH = 8
#: At most this many datagrams are taken from the PacketConn and processed as one batch.
RECEIVE_BATCH = 256
#: The QUIC versions we speak (aioquic's); others get a Version Negotiation packet.
SUPPORTED_VERSIONS: list[int] = list(QuicConfiguration().supported_versions)


class Admission(Enum):
    """What becomes of a datagram that no connection claims."""

    ACCEPT = "accept"        # an Initial packet: a new connection
    NEGOTIATE = "negotiate"  # a version we do not speak: answer with Version Negotiation
    DROP = "drop"            # anything else (stray, short, late)


def refuse_initial(header: QuicHeader, reason: str) -> bytes:
    """A stateless answer to the Initial packet `header` belongs to: an Initial packet of our
    own carrying CONNECTION_CLOSE(CONNECTION_REFUSED, `reason`), protected with the Initial
    keys every QUIC endpoint derives from the client's destination connection ID (RFC 9001
    5.2). Nothing is kept: the dialler fails at once with ConnectionRefusedError."""
    assert header.version is not None
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    builder = QuicPacketBuilder(host_cid=os.urandom(CID_LENGTH), peer_cid=header.source_cid,
                                version=header.version, is_client=False, max_datagram_size=MIN_PACKET_SIZE)
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    phrase = reason.encode()[:64]
    buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=3 * 8 + len(phrase))
    buf.push_uint_var(QUIC_CONNECTION_REFUSED)
    buf.push_uint_var(0)  # frame type: none in particular
    buf.push_uint_var(len(phrase))
    buf.push_bytes(phrase)
    datagrams, _ = builder.flush()
    return datagrams[0]


def admit(header: QuicHeader, size: int) -> Admission:
    """Whether a `size`-byte datagram with `header`, for no known connection, starts one
    (as aioquic's asyncio server decides). Datagrams under QUIC's minimum are dropped."""
    if size < MIN_PACKET_SIZE:
        return Admission.DROP
    if (header.packet_type != QuicPacketType.VERSION_NEGOTIATION and header.version is not None
            and header.version not in SUPPORTED_VERSIONS):
        return Admission.NEGOTIATE
    if header.packet_type == QuicPacketType.INITIAL:
        return Admission.ACCEPT
    return Admission.DROP


class Driver:
    """Runs every QUIC connection of one PacketConn; shared by the Listener and the Dialers
    built on it (see `acquire`). Implements `ConnHost` for its connections. One lock,
    `lock`, guards everything mutable here and in the connections and streams."""

    #: What the driver builds connections and key-proof exchanges from (tests swap them).
    conn_class: ClassVar[type[Conn]] = Conn
    key_proof_class: ClassVar[type[KeyProof]] = KeyProof

    @classmethod
    def acquire(cls, pc: Any, private_key: PrivateKey) -> Driver:
        """The driver of `pc` (created on first use); balance with `release()`."""
        return _REGISTRY.acquire(cls, pc, private_key)

    def release(self) -> None:
        if _REGISTRY.release(self):
            self.shutdown()

    def __init__(self, pc: Any, private_key: PrivateKey) -> None:
        self.pc = pc
        self.private_key = private_key
        self.local: PublicKey = pc.local_addr()
        if private_key.public_key != self.local:
            raise ValueError("the private key does not match the PacketConn's address")
        self.lock = threading.Lock()
        self.carrier = Carrier(pc)
        self.routes = Routes()
        self.timers: TimerHeap[Conn] = TimerHeap()
        self.acceptor: Acceptor | None = None  # the Listener accepting on this PacketConn, if any
        self.armed: float | None = None  # the read deadline we set (monotonic), None = none
        self.stopped = False
        self.dead: BaseException | None = None  # why the receive thread stopped on its own
        self.drained = threading.Condition(self.lock)  # notified when a conn's sends complete
        self.drain_waiters = 0
        self.link_ups = 0  # relay reconnects seen (each probes every connection at once)
        self.thread = threading.Thread(target=self._run, name=f"derpquic-rx-{self.local.b64()[:8]}",
                                       daemon=True)
        self.thread.start()
        self.carrier.listen(self._on_packetconn_event)

    @property
    def conns(self) -> set[Conn]:
        return self.routes.conns

    @property
    def gone(self) -> dict[PublicKey, float]:
        """Peers the relay said are not connected (PeerGone), until heard from again."""
        return self.routes.gone

    # ------------------------------------------------------------------ PacketConn events

    def _on_packetconn_event(self, ev: object) -> None:
        """Runs on a PacketConn thread (which must not hold the PacketConn's lock)."""
        match ev:
            case LinkUp(generation=generation) if generation > 1:
                # The relay link is back after an outage: probe every connection now rather
                # than wait out a PTO that backed off exponentially while packets were dropped.
                with self.lock:
                    if not self.stopped:
                        self.link_ups += 1
                        now = time.monotonic()
                        for conn in self.routes:
                            conn.probe(now)
            case PathChanged(peer=peer, mtu=mtu):
                with self.lock:
                    if not self.stopped:
                        now = time.monotonic()
                        for conn in self.routes.to(peer):
                            conn.path_changed(mtu, now)
            case PeerGone(key=peer, reason=reason):
                # The relay says `peer` is not connected to it: it left (DISCONNECTED, sent to
                # those it had sent packets to) or is unknown (NOT_HERE, the answer to a disco
                # packet, which we only send to peers known to be ours). Its connections decide
                # what that means for them (Conn.peer_left); new dials to it fail fast until
                # it is heard from again.
                with self.lock:
                    if not self.stopped:
                        now = time.monotonic()
                        for conn in self.routes.peer_left(peer, now):
                            conn.peer_left(now, not_here=reason == PeerGoneReason.NOT_HERE)
            case _:
                pass

    # ------------------------------------------------------------------ ConnHost

    def now(self) -> float:
        return time.monotonic()

    def send_datagram(self, data: bytes, peer: PublicKey) -> None:
        self.carrier.send(data, peer)

    def send_datagrams(self, datagrams: list[bytes], peer: PublicKey) -> None:
        self.carrier.send_many(datagrams, peer)

    def add_route(self, conn: Conn, cid: bytes) -> None:
        self.routes.add(conn, cid)

    def remove_route(self, conn: Conn, cid: bytes) -> None:
        self.routes.remove(conn, cid)

    def forget(self, conn: Conn) -> None:
        self.routes.forget(conn)
        self.timers.cancel(conn)

    def schedule(self, conn: Conn, when: float | None) -> None:
        if conn.terminated:
            return
        self.timers.schedule(conn, when)
        if when is not None and (self.armed is None or when < self.armed):
            self._arm()

    def flushed(self, conn: Conn) -> None:
        if self.drain_waiters:
            self.drained.notify_all()

    def peer_verified(self, peer: PublicKey) -> None:
        self.carrier.note_verified(peer)

    def path_mtu(self, peer: PublicKey) -> int:
        return self.carrier.path_mtu(peer)

    # ------------------------------------------------------------------ connections

    def connect(self, peer: PublicKey, *, owner: ConnOwner, opts: Options, policy: AuthPolicy) -> Conn:
        """Start a client connection (lock held by the caller)."""
        now = time.monotonic()
        conn = self._new_conn(peer, Role.CLIENT, owner, opts, policy, now)
        if peer in self.gone:  # the relay said it left: give it GONE_GRACE to answer, not the whole timeout
            conn.heartbeat.peer_left(now)
        conn.quic.connect(peer, now)
        self.routes.register(conn, conn.quic.host_cid)
        conn.process(now)
        return conn

    def _accept(self, peer: PublicKey, header: QuicHeader, acceptor: Acceptor, now: float) -> Conn:
        conn = self._new_conn(peer, Role.SERVER, acceptor, acceptor.opts, acceptor.policy, now,
                              original_dcid=header.destination_cid)
        self.routes.register(conn, header.destination_cid, conn.quic.host_cid)
        acceptor.conn_accepted(conn)
        return conn

    def _new_conn(self, peer: PublicKey, role: Role, owner: ConnOwner, opts: Options, policy: AuthPolicy,
                  now: float, original_dcid: bytes | None = None) -> Conn:
        proof = self.key_proof_class(self.private_key, peer, role, policy, now=now,
                                     timeout=None if role is Role.CLIENT else opts.dial_timeout)
        return create_conn(self, proof, owner, opts, now, original_dcid=original_dcid, conn_class=self.conn_class)

    # ------------------------------------------------------------------ receive thread

    def _run(self) -> None:
        try:
            while True:
                batch: Sequence[tuple[bytes, Any]] = ()
                try:
                    batch = self.carrier.read(RECEIVE_BATCH)
                except TimeoutError:
                    pass
                except OSError as e:
                    with self.lock:
                        if not self.stopped:
                            log.warning("derpquic: packet connection failed: %s", e)
                            self._stop(ConnectionAbortedError(f"the relay connection is gone: {e}"))
                    return
                with self.lock:
                    if self.stopped:
                        return
                    if batch:
                        self._datagrams(batch, time.monotonic())
                    self._run_timers(time.monotonic())
                    self._arm()
        except BaseException:  # pragma: no cover - a bug: make it visible, fail everything
            log.exception("derpquic: receive thread crashed")
            with self.lock:
                self._stop(ConnectionAbortedError("derpquic receive thread crashed"))
            raise

    def _datagrams(self, batch: Sequence[tuple[bytes, Any]], now: float) -> None:
        """Feed a batch of datagrams to their connections, then let each connection that got
        some process them and answer once (lock held): one flush, one ACK, one relay write
        per connection and batch instead of one per packet."""
        touched: dict[Conn, None] = {}
        for data, addr in batch:
            try:
                conn = self._route(data, addr, now)
                if conn is not None and not conn.terminated:
                    conn.receive(data, now)
                    touched[conn] = None
            except Exception:  # never let one bad packet kill the thread
                log.exception("derpquic: error handling a datagram from %s", addr)
        self._each(touched, lambda conn: conn.received_batch(now), "processing datagrams", now)

    def _stop(self, error: BaseException) -> None:
        """The receive thread ends for good: fail everything (lock held)."""
        self.dead = error
        now = time.monotonic()
        for conn in self.routes:
            conn.discard(error, now, tell_peer=False)
        self.stopped = True
        if self.acceptor is not None:
            self.acceptor.driver_failed(error)

    def _route(self, data: bytes, addr: Any, now: float) -> Conn | None:
        """The connection a datagram is for (lock held): its own, or a new one for an
        Initial packet; None after answering an unknown version with Version Negotiation,
        or for anything else (dropped)."""
        peer = addr if type(addr) is PublicKey else PublicKey.coerce(addr)
        if data and not data[0] & 0x80:  # short header: the destination ID follows the first byte
            return self.routes.lookup(peer, data[1:1 + CID_LENGTH])
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            return None
        conn = self.routes.lookup(peer, header.destination_cid)
        if conn is not None:
            return conn
        acceptor = self.acceptor
        if acceptor is None or acceptor.closed:
            return None
        admission = admit(header, len(data))
        if admission is Admission.NEGOTIATE:
            self.send_datagram(encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid,
                supported_versions=SUPPORTED_VERSIONS), peer)
        if admission is not Admission.ACCEPT:
            return None
        refusal = acceptor.refusal(peer)  # a key outside `allow`, too many handshakes: no state at all
        if refusal is not None:
            if refusal:
                self.send_datagram(refuse_initial(header, refusal), peer)
            return None
        return self._accept(peer, header, acceptor, now)

    # ------------------------------------------------------------------ timers

    def _run_timers(self, now: float) -> None:
        self._each(self.timers.pop_due(now), lambda conn: conn.timer_fired(now), "the QUIC timer", now)

    @staticmethod
    def _each(conns: Iterable[Conn], call: Callable[[Conn], None], what: str, now: float) -> None:
        """call(conn) for every live one of `conns` (lock held); a bug fails that connection
        only, never the receive thread."""
        for conn in conns:
            if conn.terminated:
                continue
            try:
                call(conn)
            except Exception:
                log.exception("derpquic: %s of %s failed", what, conn)
                conn.discard(ConnectionAbortedError(f"internal error in {what}"), now, tell_peer=False)

    def _arm(self) -> None:
        """Set the PacketConn's read deadline to the earliest timer (lock held)."""
        t = self.timers.earliest()
        if t == self.armed:
            return
        self.armed = t
        self.carrier.set_deadline(t)

    # ------------------------------------------------------------------ shutdown

    def close_conns(self, conns: Iterable[Conn], error: BaseException, *, linger: float) -> None:
        """Close `conns` (lock NOT held): first wait up to `linger` seconds for the data of
        streams the application already closed to be acknowledged, then CONNECTION_CLOSE."""
        deadline = time.monotonic() + linger
        with self.lock:
            live = [c for c in conns if not c.terminated]
            while True:
                left = deadline - time.monotonic()
                if not any(c.lingering() for c in live) or left <= 0 or self.stopped:
                    break
                self.drain_waiters += 1
                try:
                    self.drained.wait(left)
                finally:
                    self.drain_waiters -= 1
            for c in live:
                if not c.terminated:
                    # Stays routed while aioquic repeats CONNECTION_CLOSE (3 PTO) if the
                    # driver keeps running for someone else.
                    c.close(error, code=AppError.CLOSED, reason="closed")

    def shutdown(self) -> None:
        """Stop the receive thread (after the last user released the driver)."""
        with self.lock:
            if self.stopped:
                return
            now = time.monotonic()
            for conn in self.routes:
                conn.discard(ConnectionAbortedError("closed locally"), now, tell_peer=True)
            self.stopped = True
            self.timers.clear()
        self.carrier.unlisten(self._on_packetconn_event)
        self.carrier.set_deadline(time.monotonic() - 1)  # wake the receive thread
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        self.carrier.set_deadline(None)

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else f"{len(self.conns)} connections"
        return f"<derpquic.Driver {self.local.b64()} {state}>"


class DriverRegistry:
    """One running driver per PacketConn, shared by its Listener and Dialers and counted,
    so that the last `release` stops it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drivers: dict[int, tuple[Driver, int]] = {}  # id(pc) -> (driver, references)

    def acquire(self, cls: type[Driver], pc: Any, private_key: PrivateKey) -> Driver:
        with self._lock:
            driver, refs = self._drivers.get(id(pc), (None, 0))
            if driver is None or driver.pc is not pc or driver.stopped:
                driver, refs = cls(pc, private_key), 0
            elif driver.private_key != private_key:
                raise ValueError("this PacketConn is already used with another private key")
            self._drivers[id(pc)] = (driver, refs + 1)
            return driver

    def release(self, driver: Driver) -> bool:
        """True when that was the last reference."""
        with self._lock:
            current, refs = self._drivers.get(id(driver.pc), (None, 0))
            if current is not driver:
                return True
            if refs > 1:
                self._drivers[id(driver.pc)] = (driver, refs - 1)
                return False
            del self._drivers[id(driver.pc)]
            return True


_REGISTRY = DriverRegistry()
