"""`listen`, `Listener` and `Dialer`: the derpquic API (mirrors the Go derpquic package).

Each owns a set of connections on a shared `Driver`: `AcceptQueue` (the Listener's
incoming connections and the streams their peers open) and `DialedConns` (the Dialer's
connections, by peer, for reuse) are what the driver's connections report to.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Self

from derpnet.keys import PrivateKey, PrivateKeyLike, PublicKey, PublicKeyLike

from .auth import AuthPolicy
from .config import Options, coerce_keys
from .conn import Conn, ConnState
from .datagrams import DatagramChannel, DatagramInbox, channel_for
from .driver import SUPPORTED_VERSIONS, Driver
from .stream import Stream

__all__ = ["listen", "Listener", "Dialer", "DEFAULT_LINGER"]

log = logging.getLogger("derpquic")

#: How long close() waits for data of already-closed streams to be acknowledged.
DEFAULT_LINGER = 2.0
#: A prepared connection still in its handshake after this long is not waited for by a dial.
SPARE_PATIENCE = 2.0
#: A dial that took a spare connection starts the next one this much later (seconds).
SPARE_DELAY = 0.02

_HANDSHAKING = (ConnState.HANDSHAKE, ConnState.AUTH)


def _open_packet_conn(host: Any, key: PrivateKeyLike | None,
                      options: dict[str, Any]) -> tuple[Any, PrivateKey, bool]:
    """(pc, private key, owned) from a relay URL/host (or a list of them: several relays,
    see derpnet.relayset), or an existing PacketConn."""
    if isinstance(host, (str, list, tuple)) or type(host).__name__ == "RelayAddress":
        import derpnet
        priv = PrivateKey.generate() if key is None else PrivateKey.coerce(key)
        pc = derpnet.listen_packet(host, priv, **options)
        return pc, priv, True
    pc = host
    if options:
        raise TypeError(f"unexpected options for an existing PacketConn: {', '.join(sorted(options))}")
    if not all(hasattr(pc, m) for m in ("read_from", "write_to", "set_read_deadline", "local_addr")):
        raise TypeError(f"expected a relay URL or a PacketConn, not {type(pc).__name__}")
    if key is None:
        key = getattr(pc, "private_key", None)
        if key is None:
            raise ValueError("pass key= (the PacketConn's private key): derpquic proves it to peers")
    priv = PrivateKey.coerce(key)
    if priv.public_key != pc.local_addr():
        raise ValueError("key does not match the PacketConn's address")
    return pc, priv, False


class ConnSet:
    """The connections one Listener or Dialer owns (`ConnOwner`; driver lock held)."""

    def __init__(self) -> None:
        self.conns: set[Conn] = set()
        self.inbox: DatagramInbox | None = None  # with datagrams=True

    def conn_ready(self, conn: Conn) -> None:
        pass

    def conn_closed(self, conn: Conn) -> None:
        self.conns.discard(conn)
        if self.inbox is not None:
            self.inbox.forget(conn)

    def datagram_received(self, conn: Conn, data: bytes) -> None:
        if self.inbox is not None:
            self.inbox.put(conn, data)

    def stream_opened(self, stream: Stream) -> None:  # pragma: no cover - dialled conns refuse them first
        stream.refuse(ConnectionRefusedError("unexpected stream"))


class AcceptQueue(ConnSet):
    """A Listener's side of the driver (`Acceptor`): the options and policy for incoming
    connections, and the streams waiting for accept()."""

    def __init__(self, lock: threading.Lock, opts: Options, policy: AuthPolicy) -> None:
        super().__init__()
        self.opts = opts
        self.policy = policy
        self.closed = False
        self.failure: BaseException | None = None  # the driver stopped for good
        self._queue: deque[Stream] = deque()
        self._cond = threading.Condition(lock)
        self.half_open: dict[PublicKey, set[Conn]] = {}  # handshaking connections by peer
        self.half_open_count = 0
        self.refused: dict[str, int] = {}  # Initials refused statelessly, by reason

    def refusal(self, peer: PublicKey) -> str | None:
        allow = self.policy.allow
        if allow is not None and peer not in allow:
            self.refused["not allowed"] = self.refused.get("not allowed", 0) + 1
            return "not allowed"  # answered: the dialler fails at once
        if (self.half_open_count >= self.opts.max_half_open
                or len(self.half_open.get(peer, ())) >= self.opts.max_half_open_per_peer):
            self.refused["busy"] = self.refused.get("busy", 0) + 1
            return ""  # dropped: the dialler's retransmission may find room
        return None

    def conn_accepted(self, conn: Conn) -> None:
        self.conns.add(conn)
        self.half_open.setdefault(conn.peer, set()).add(conn)
        self.half_open_count += 1
        # Until accept(), a stream may hold only unaccepted_window bytes (before the first
        # datagram is processed: the transport parameters advertise it).
        conn.quic.set_peer_stream_window(self.opts.unaccepted_window)

    def _handshake_over(self, conn: Conn) -> None:
        peer_conns = self.half_open.get(conn.peer)
        if peer_conns is not None and conn in peer_conns:
            peer_conns.discard(conn)
            self.half_open_count -= 1
            if not peer_conns:
                del self.half_open[conn.peer]

    def conn_ready(self, conn: Conn) -> None:
        self.conns.add(conn)
        self._handshake_over(conn)

    def conn_closed(self, conn: Conn) -> None:
        super().conn_closed(conn)
        self._handshake_over(conn)

    def driver_failed(self, error: BaseException) -> None:
        self.failure = error
        self._cond.notify_all()

    def stream_opened(self, stream: Stream) -> None:
        if self.closed or len(self._queue) >= self.opts.backlog:
            log.warning("derpquic: refusing a stream from %s: %s", stream.remote_addr().b64(),
                        "listener closed" if self.closed else "accept backlog full")
            stream.refuse(ConnectionRefusedError("refused"))
            return
        self._queue.append(stream)
        self._cond.notify()

    def get(self, timeout: float | None) -> Stream:
        """The next stream (lock NOT held). Raises TimeoutError, or OSError once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self.closed:
                    raise OSError(errno.EBADF, "listener closed")
                if self.failure is not None and not self._queue:
                    raise ConnectionAbortedError(*self.failure.args)
                while self._queue:
                    s = self._queue.popleft()
                    if not s.closed:
                        self._grant(s)
                        return s
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("accept timed out")
                self._cond.wait(left)

    @staticmethod
    def _grant(s: Stream) -> None:
        """An accepted stream may receive its whole window at once (lock held)."""
        conn = s._conn
        if not conn.closed and conn.quic.grant_stream(s.stream_id, conn.opts.stream_window):
            conn.flush()

    def close(self) -> None:
        """Stop accepting; refuse what is queued (lock held)."""
        self.closed = True
        queued, self._queue = list(self._queue), deque()
        for s in queued:
            s.refuse(ConnectionAbortedError("listener closed"))
        self._cond.notify_all()


class DialedConns(ConnSet):
    """A Dialer's connections, the one per peer that new dials reuse, and the spare ones
    `Dialer.prepare` keeps (unused, handshaken ahead of the dial that takes them)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_peer: dict[PublicKey, Conn] = {}
        self.spares: dict[PublicKey, Conn] = {}
        self.prepared: set[PublicKey] = set()

    def conn_closed(self, conn: Conn) -> None:
        super().conn_closed(conn)
        if self.by_peer.get(conn.peer) is conn:
            del self.by_peer[conn.peer]
        if self.spares.get(conn.peer) is conn:
            del self.spares[conn.peer]


class _Endpoint:
    """What Listener and Dialer share: the PacketConn, its driver, closing."""

    _owner: ConnSet

    def __init__(self, host: Any, key: PrivateKeyLike | None, options: dict[str, Any]) -> None:
        self.opts = Options.pop_from(options)
        self._pc, self._key, self._owns_pc = _open_packet_conn(host, key, options)
        try:
            self._driver = Driver.acquire(self._pc, self._key)
        except BaseException:
            if self._owns_pc:
                self._pc.close()
            raise
        self._lock = self._driver.lock
        self.closed = False

    @property
    def addr(self) -> PublicKey:
        """Our address: the public key peers dial."""
        return self._driver.local

    def local_addr(self) -> PublicKey:
        return self._driver.local

    @property
    def packet_conn(self) -> Any:
        """The underlying PacketConn (another Listener/Dialer may share it)."""
        return self._pc

    @property
    def private_key(self) -> PrivateKey:
        return self._key

    def _take_datagrams(self) -> None:
        """With datagrams=True: received datagrams wait for recv_datagram()."""
        if self.opts.datagrams:
            self._owner.inbox = DatagramInbox(self._lock, self.opts.datagram_queue)

    def recv_datagram(self, timeout: float | None = None) -> tuple[bytes, DatagramChannel]:
        """The next datagram a peer sent (needs datagrams=True): (data, the channel to answer
        on). Raises TimeoutError, or OSError once closed. See derpquic.datagrams."""
        inbox = self._owner.inbox
        if inbox is None:
            raise ValueError("recv_datagram() needs datagrams=True")
        return inbox.get(timeout)

    def _close_common(self, error: BaseException, linger: float) -> None:
        with self._lock:
            if self._owner.inbox is not None:
                self._owner.inbox.close()
            conns = list(self._owner.conns)
        self._driver.close_conns(conns, error, linger=linger)
        self._driver.release()
        if self._owns_pc:
            try:
                self._pc.close()
            except OSError:  # pragma: no cover
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, linger: float = DEFAULT_LINGER) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class Listener(_Endpoint):
    """Accepts streams of QUIC connections that peers dial to our key (Go's derpquic Listener:
    every stream of every connection).

    `host`: a relay URL (``"https://derp.example.com"``, ``"http://127.0.0.1:3340"``, a bare
    hostname), a list of them (reachable on every one: derpnet.relayset) or an existing
    PacketConn (then pass `key` unless it exposes it).
    Authentication: peers that prove their key (derpnet peers) are authenticated; Go peers
    cannot and are accepted unauthenticated unless `require_auth=True` or `allow=[keys]`
    (then only those keys, proven, get through; others are refused before any stream is
    yielded). Other keyword arguments: derpquic.config.Options fields, then
    derpnet.listen_packet options (ssl_context, ...).
    """

    def __init__(self, host: Any, key: PrivateKeyLike | None = None, *,
                 allow: Iterable[PublicKeyLike] | None = None, require_auth: bool = False,
                 **options: Any) -> None:
        self.allow = coerce_keys(allow)
        self.require_auth = bool(require_auth)
        self.supported_versions = SUPPORTED_VERSIONS  # (answered by the driver's Version Negotiation)
        super().__init__(host, key, options)
        self._owner = self._queue = AcceptQueue(self._lock, self.opts,
                                                AuthPolicy(require_auth=self.require_auth, allow=self.allow))
        self._take_datagrams()
        with self._lock:
            current = self._driver.acceptor
            busy = current is not None and not current.closed
            if not busy:
                self._driver.acceptor = self._queue
        if busy:
            self._driver.release()
            if self._owns_pc:
                self._pc.close()
            raise OSError(errno.EADDRINUSE, "a Listener is already accepting on this PacketConn")

    def accept(self, timeout: float | None = None) -> Stream:
        """The next stream a peer opened. Raises TimeoutError, or OSError once closed."""
        return self._queue.get(timeout)

    def __iter__(self) -> Iterator[Stream]:
        while True:
            try:
                yield self.accept()
            except OSError:
                if self.closed:
                    return
                raise

    def close(self, linger: float = DEFAULT_LINGER) -> None:
        """Stop accepting and close every accepted connection (after up to `linger` s for
        data of already-closed streams to be acknowledged). Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._driver.acceptor is self._queue:
                self._driver.acceptor = None
            self._queue.close()
        self._close_common(ConnectionAbortedError("listener closed"), linger)

    def __repr__(self) -> str:
        return f"<derpquic.Listener {self.addr.b64()}{' closed' if self.closed else ''}>"


def listen(host: Any, key: PrivateKeyLike | None = None, **options: Any) -> Listener:
    """Listen for derpquic streams on our key through the relay `host` (see Listener)."""
    return Listener(host, key, **options)


class Dialer(_Endpoint):
    """Opens streams to peers by key (Go's derpquic Dialer).

    Every dial to a Go peer is a new QUIC connection with one stream (as the Go tool
    does). To a derpnet peer, an existing healthy connection is reused (a new stream on
    it) unless `reuse_connections=False`. The peer must prove it holds the dialled key;
    a peer that cannot (the Go derpconnect) is refused with AuthenticationError unless
    `allow_unauthenticated=True`.
    """

    def __init__(self, host: Any, key: PrivateKeyLike | None = None, *, allow_unauthenticated: bool = False,
                 reuse_connections: bool = True, **options: Any) -> None:
        self.allow_unauthenticated = bool(allow_unauthenticated)
        self.reuse_connections = bool(reuse_connections)
        super().__init__(host, key, options)
        self._owner = self._dialed = DialedConns()
        self._take_datagrams()
        self._policy = AuthPolicy(allow_unauthenticated=self.allow_unauthenticated)

    def dial(self, pubkey: PublicKeyLike, timeout: float | None = None) -> Stream:
        """A new stream to `pubkey`, visible to the peer's listener at once.

        timeout (default: the `dial_timeout` option, 20 s) bounds the QUIC and key-proof
        handshakes. Raises TimeoutError (nobody answered), AuthenticationError (the peer
        did not prove its key), ConnectionRefusedError (the peer refused us),
        ConnectionError, or OSError once closed."""
        with self._lock:
            return self._ready_conn(PublicKey.coerce(pubkey), timeout).open_stream()

    def datagram_channel(self, pubkey: PublicKeyLike, timeout: float | None = None) -> DatagramChannel:
        """The connection to `pubkey` as a channel for QUIC DATAGRAM frames (RFC 9221;
        needs `datagrams=True` on both sides); the peer's answers come out of
        `recv_datagram()`. Raises as dial() does, and OSError EPROTONOSUPPORT when the
        peer takes no datagrams (a Go peer, or a listener without `datagrams=True`)."""
        if not self.opts.datagrams:
            raise ValueError("datagram_channel() needs a Dialer made with datagrams=True")
        with self._lock:
            conn = self._ready_conn(PublicKey.coerce(pubkey), timeout)
            assert self._dialed.inbox is not None
            return channel_for(conn, self._dialed.inbox.channels)

    def _ready_conn(self, peer: PublicKey, timeout: float | None) -> Conn:
        """A connection to `peer` ready for one more stream (lock held): a spare, the one
        reused, or a new one, within `timeout` (default: the dial_timeout option)."""
        if timeout is None:
            timeout = self.opts.dial_timeout
        deadline = time.monotonic() + timeout
        driver = self._driver
        while True:
            if self.closed:
                raise OSError(errno.EBADF, "dialer closed")
            if driver.dead is not None:
                raise ConnectionAbortedError(*driver.dead.args)
            conn = self._take_spare(peer)
            if conn is not None:
                mine = True
            else:
                conn = self._reusable(peer)
                mine = conn is None
            if conn is None:
                conn = driver.connect(peer, owner=self._dialed, opts=self.opts, policy=self._policy)
                self._dialed.conns.add(conn)
                self._dialed.by_peer[peer] = conn
            while conn.state in _HANDSHAKING:
                left = deadline - time.monotonic()
                if left <= 0:
                    err = TimeoutError(
                        f"dial {peer.b64()}: no answer within {timeout:g} s (is anyone listening on "
                        f"that key at this relay?)" if not conn.received_any else
                        f"dial {peer.b64()}: handshake did not complete within {timeout:g} s")
                    if mine:
                        conn.close(err)
                    raise err
                conn.cond.wait(left)
            if conn.state is ConnState.READY:
                if not mine and not conn.ours:
                    continue  # a Go peer: one connection per dial, make our own
                if conn.ours:
                    self._dialed.by_peer[peer] = conn  # (a taken spare) reused from now on
                if not conn.ours and peer in self._dialed.prepared:
                    # The next dial to this Go peer finds a spare ready: started a little
                    # later, so that its handshake (ours and the peer's CPU) does not
                    # delay this stream's first exchange.
                    refill = threading.Timer(SPARE_DELAY, self._refill, args=(peer,))
                    refill.name = "derpquic-spare"
                    refill.daemon = True
                    refill.start()
                return conn
            if mine:
                why = conn.error or ConnectionAbortedError("connection failed")
                raise type(why)(*why.args)
            # someone else's attempt failed: try our own

    def prepare(self, pubkey: PublicKeyLike) -> None:
        """Start connecting to `pubkey` now, so that dials to it do not wait for the QUIC
        handshake and key proofs: for a derpnet peer that is the connection every dial()
        reuses; a Go peer takes one connection per dial, so a spare is kept ready for it
        (kept alive while unused, replaced as each dial takes it). Returns at once; a
        failure shows in the dial that would have used the connection."""
        peer = PublicKey.coerce(pubkey)
        with self._lock:
            if self.closed:
                raise OSError(errno.EBADF, "dialer closed")
            self._dialed.prepared.add(peer)
            self._start_spare(peer)

    def _take_spare(self, peer: PublicKey) -> Conn | None:
        """The prepared connection to `peer`, if it is ready or still young (lock held); a
        failed one, or one still in its handshake after SPARE_PATIENCE, is dropped (the
        dial then starts afresh)."""
        conn = self._dialed.spares.pop(peer, None)
        if conn is None:
            return None
        if conn.state is ConnState.READY and not conn.quic.state_closed:
            conn.heartbeat.keep_idle = False
            return conn
        if conn.state in _HANDSHAKING and time.monotonic() - conn.heartbeat.created < SPARE_PATIENCE:
            conn.heartbeat.keep_idle = False
            return conn
        if not conn.closed:
            conn.close(ConnectionAbortedError("spare connection replaced"))
        return None

    def _refill(self, peer: PublicKey) -> None:
        with self._lock:
            self._start_spare(peer)

    def _start_spare(self, peer: PublicKey) -> None:
        """A new unused connection to `peer` for the next dial (lock held)."""
        spare = self._dialed.spares.get(peer)
        if self.closed or self._driver.dead is not None or (spare is not None and not spare.closed):
            return
        current = self._dialed.by_peer.get(peer)
        if current is not None and current.ours and not current.closed:
            return  # one of ours: its connection is reused anyway
        conn = self._driver.connect(peer, owner=self._dialed, opts=self.opts, policy=self._policy)
        conn.heartbeat.keep_idle = True
        self._dialed.conns.add(conn)
        self._dialed.spares[peer] = conn

    def _reusable(self, peer: PublicKey) -> Conn | None:
        conn = self._dialed.by_peer.get(peer)
        if conn is None or not self.reuse_connections:
            return None
        if conn.state in _HANDSHAKING:
            return conn  # wait for it; if it turns out to be a Go peer we dial our own
        if (conn.state is ConnState.READY and conn.ours and not conn.quic.state_closed
                and peer not in self._driver.gone):  # not while the relay says it left
            # Reuse only while the peer was heard from recently (no idle-timeout race).
            if conn.heartbeat.heard_recently(time.monotonic(), min(conn.opts.idle_timeout, 30.0) / 2):
                return conn
        return None

    def close(self, linger: float = DEFAULT_LINGER) -> None:
        """Close every connection this dialer made (after up to `linger` s for data of
        already-closed streams to be acknowledged) and, if we opened it, the PacketConn.
        Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for conn in self._dialed.conns:
                conn.cond.notify_all()
        self._close_common(ConnectionAbortedError("dialer closed"), linger)

    def __repr__(self) -> str:
        return f"<derpquic.Dialer {self.addr.b64()}{' closed' if self.closed else ''}>"
