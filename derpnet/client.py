"""The relay link: one blocking DERP connection to one relay, with its reader thread.

Layer: relay link (Tailscale's derp/derp_client.go; dialling is in `dial`, as derphttp's).
`DerpClient` reaches the relay with a `dial.Dialer` (DNS, TCP, TLS on a `TLSSession`),
does the DERP handshake through the sans-IO `ClientConnection`, writes frames from any
thread through a `Wire`, and runs one reader thread that hands packets and events to
callbacks and keeps the link's `Liveness`. Threads, locks, error types and the liveness
ping: DEVELOPERS.md, "The relay link".
"""

from __future__ import annotations

import errno
import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from . import frames as F
from .connection import ClientConnection
from .dial import Dialer, RelayAddress, parse_relay, set_io_timeouts, with_relay_url
from .errors import DerpError, HandshakeError, UpgradeError
from .events import Connected, Event, Hello, Upgrade
from .keys import PrivateKey, PrivateKeyLike, PublicKey, PublicKeyLike
from .liveness import Dead, DeadReason, Liveness, SendPing
from .wire import Wire, WireBroken
from .wsclient import ClientWebSocket, WsHandshakeIO
from .wsclient import upgrade as ws_upgrade

__all__ = ["DerpClient", "derp_handshake", "HandshakeIO", "RelayAddress", "parse_relay", "DEFAULT_CONNECT_TIMEOUT",
           "DEFAULT_WRITE_TIMEOUT", "DEFAULT_IDLE_TIMEOUT", "DEFAULT_PING_AFTER", "DEFAULT_PING_TIMEOUT"]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_WRITE_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 120.0  # 2 x the relay's keep-alive period, as the Go client
DEFAULT_PING_AFTER = 5.0  # relay silent this long while the link is in use: probe it with a Ping
DEFAULT_PING_TIMEOUT = 5.0  # no frame within this long after the Ping: the link is dead
MAX_ASIDE = 8  # control frames waiting for the aside writer (Pongs to a pinging relay)

PacketCallback = Callable[[PublicKey, bytes], None]
EventCallback = Callable[[Event], None]
CloseCallback = Callable[["DerpClient", "BaseException | None"], None]


class DerpClient:
    """One DERP connection to one relay.

    ``DerpClient(relay, key, on_packet=..., ...).connect()`` blocks until the relay's
    ServerInfo has been opened, then starts the reader thread. Callbacks run in the
    reader thread and must not block:

    * ``on_packet(src: PublicKey, data: bytes)`` for every RecvPacket;
    * ``on_event(frame)`` for other frames (PeerGone, Health, Restarting, PeerPresent, Pong, ...);
    * ``on_close(client, error)`` once when the link ends (`error` is None after `close()`).
    """

    def __init__(
        self,
        relay: str | RelayAddress,
        key: PrivateKeyLike,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        write_timeout: float | None = DEFAULT_WRITE_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        ping_after: float | None = DEFAULT_PING_AFTER,
        ping_timeout: float = DEFAULT_PING_TIMEOUT,
        on_packet: PacketCallback | None = None,
        on_event: EventCallback | None = None,
        on_close: CloseCallback | None = None,
        user_agent: str = "derpnet-python",
        websocket: bool | None = None,
    ) -> None:
        self.relay = parse_relay(relay)
        self.key = PrivateKey.coerce(key)
        self.public_key = self.key.public_key
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.idle_timeout = idle_timeout
        self.ping_after = ping_after
        self.ping_timeout = ping_timeout
        self.liveness = Liveness(idle_timeout=idle_timeout, ping_after=ping_after, ping_timeout=ping_timeout)
        self.on_packet = on_packet
        self.on_event = on_event
        self.on_close = on_close
        self._user_agent = user_agent
        #: True: DERP over WebSocket only (also a ws:// or wss:// URL); False: never; None:
        #: raw DERP, and WebSocket when the relay refuses the plain upgrade.
        self.websocket: bool | None = True if self.relay.websocket else websocket
        self._conn = ClientConnection(self.key, self.relay.host_header, user_agent=user_agent)
        self.server_key: PublicKey | None = None
        self.server_info: dict[str, object] = {}
        self.restarting: F.Restarting | None = None  # last Restarting frame seen
        self.error: BaseException | None = None  # why the link ended
        self.connected_at: float | None = None  # time.monotonic() of the handshake's end
        self.frames_skipped = 0
        self._dialer: Dialer | None = None  # while connecting
        self._wire: Wire | None = None  # once connected
        self._state_lock = threading.Lock()
        self._dead = False
        self._closing = False
        self._started = False
        self._early: list[Event] = []  # events that came with the ServerInfo
        self._aside = _AsideWriter(self)  # our liveness Pings and our Pongs
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------ public

    @property
    def url(self) -> str:
        return self.relay.url

    @property
    def connected(self) -> bool:
        return self._started and not self._dead

    @property
    def connect_phase(self) -> str | None:
        """Where connect() is ("connecting", "in the DERP handshake", ...), None outside it."""
        dialer = self._dialer
        return dialer.phase if dialer is not None else None

    @property
    def reader_thread(self) -> threading.Thread | None:
        return self._reader

    @property
    def uptime(self) -> float:
        return 0.0 if self.connected_at is None else time.monotonic() - self.connected_at

    def __repr__(self) -> str:
        state = "closed" if self._dead else ("connected" if self._started else "new")
        return f"<DerpClient {self.public_key} via {self.url} {state}>"

    def __enter__(self) -> DerpClient:
        if not self._started:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, *, start: bool = True) -> DerpClient:
        """Connect and do the DERP handshake within `connect_timeout`; then start the reader
        (unless `start=False`: call `start()` later; frames wait in the kernel meanwhile)."""
        with self._state_lock:
            if self._wire is not None or self._dialer is not None or self._dead:
                raise RuntimeError("DerpClient.connect() can only be called once")
            dialer = self._dialer = Dialer(self.relay, self.connect_timeout)
            if self._closing:
                dialer.abort()
        try:
            dialer, framing = _establish(self, dialer)
        except BaseException as e:
            self._dead = True
            (self._dialer or dialer).close_socket()  # the WebSocket fallback's dialer, if it got that far
            if isinstance(e, (OSError, DerpError)):
                raise with_relay_url(e, self.url) from e
            raise
        finally:
            with self._state_lock:
                current, self._dialer = self._dialer, None
            (current or dialer).close()
        with self._state_lock:
            if not self._closing:
                sock, tls = dialer.take()
                set_io_timeouts(sock, self.liveness.check_interval, self.write_timeout)  # recv: liveness checks
                self._wire = Wire(sock, tls, url=self.url, write_timeout=self.write_timeout, framing=framing)
        if self._wire is None:
            self._dead = True
            dialer.close_socket()
            raise ConnectionAbortedError(errno.ECONNABORTED, f"relay {self.url}: connect aborted (client closed)")
        self.connected_at = time.monotonic()
        log.debug("connected to relay %s as %s (server key %s)", self.url, self.public_key, self.server_key)
        if start:
            self.start()
        return self

    def start(self) -> bool:
        """Start the reader thread (after `connect(start=False)`); False if close() came first."""
        with self._state_lock:
            if self._closing:
                return False
            if self._started or self._wire is None:
                raise RuntimeError("start() needs a connected, not yet started client")
            self._started = True
            t = threading.Thread(target=self._run, name=f"derpnet-reader-{self.public_key.b64()[:8]}", daemon=True)
            t.start()
            self._reader = t
        return True

    def send_packet(self, dst: PublicKeyLike, *parts: bytes, lock_timeout: float | None = None) -> None:
        """Send one SendPacket frame; `parts` are concatenated (at most 65,536 bytes in all).

        Blocks at most `lock_timeout` for other writers (then `TimeoutError`, nothing sent)
        and `write_timeout` for the relay to take the bytes. `ConnectionResetError` if the
        link is (or becomes) dead.
        """
        if type(dst) is not PublicKey:
            dst = PublicKey.coerce(dst)
        # The hot path encodes with the codec directly: no event object, parts joined once.
        self._write(F.encode_send_packet(dst, *parts), lock_timeout, packets=True)

    def send_packets(self, packets: Sequence[tuple[PublicKey, Sequence[bytes]]],
                     lock_timeout: float | None = None) -> None:
        """Send several SendPacket frames in one write (one syscall): [(dst, parts), ...]."""
        encode = F.encode_send_packet
        frames = [encode(dst, *parts) for dst, parts in packets]
        if frames:
            self._write(frames[0] if len(frames) == 1 else b"".join(frames), lock_timeout, packets=True)

    def send_ping(self, data: bytes) -> None:
        """Send a Ping (8 bytes); the relay's Pong arrives through `on_event`."""
        self._write(self._conn.send(F.Ping(data)), None)

    def note_preferred(self, preferred: bool) -> None:
        self._write(self._conn.send(F.NotePreferred(preferred)), None)

    def close(self) -> None:
        """Close the link (idempotent). Aborts a connect in progress; joins the reader thread
        unless called from it."""
        with self._state_lock:
            self._closing = True
            dialer = self._dialer
        if dialer is not None:  # connecting: connect() sees _closing and cleans up itself
            dialer.abort()
            return
        self._shutdown(None)
        with self._state_lock:
            t = self._reader
        if t is not None and t is not threading.current_thread():
            t.join()
        elif t is None and self._wire is not None:
            self._wire.close()

    # ------------------------------------------------------------ writing

    def _dead_error(self) -> ConnectionResetError:
        why = f": {self.error}" if self.error is not None else " (closed)"
        return ConnectionResetError(errno.ECONNRESET, f"relay link to {self.url} is down{why}")

    def _write(self, data: bytes, lock_timeout: float | None, *, packets: bool = False) -> None:
        """Write frames; only packets mark the link in use (Liveness): Pings, Pongs never do."""
        wire = self._wire
        if self._dead or wire is None:
            raise self._dead_error()
        if packets:
            self.liveness.on_send(time.monotonic())
        try:
            wire.write(data, lock_timeout)
        except WireBroken as e:
            if e.cause is not None:
                self._shutdown(e.cause)
            raise self._dead_error() from e.cause

    def _shutdown(self, err: BaseException | None) -> None:
        """Mark the link dead and wake the reader (the reader closes the socket)."""
        with self._state_lock:
            if not self._dead:
                self._dead = True
                if err is not None and self.error is None:
                    self.error = err
            wire = self._wire
        if wire is not None:
            wire.shutdown()

    # ------------------------------------------------------------ the reader thread

    def _run(self) -> None:
        err: BaseException | None = None
        try:
            if self._early and not self._dead:
                early, self._early = self._early, []
                self._dispatch(early)
            self._loop()
        except BaseException as e:  # the link is dead either way; report why
            err = e
        with self._state_lock:
            closing = self._closing
            if err is not None and not closing and self.error is None:
                self.error = err
            err = None if closing else self.error
        self._shutdown(err)
        if self._wire is not None:
            self._wire.close()
        if err is not None:
            log.debug("relay link %s ended: %s", self.url, err)  # the owner (RelayLink) says it once
        _call("on_close", self.on_close, self, err)

    def _loop(self) -> None:
        wire = self._wire
        if wire is None:  # closed between connect() and start()
            return
        conn, live = self._conn, self.liveness
        live.reset(time.monotonic())
        while not self._dead:
            try:
                data = wire.recv()
            except WireBroken as e:  # sending a TLS record the reader produced failed
                raise e.cause or ConnectionResetError(errno.ECONNRESET, "relay link shut down") from None
            if data is None:  # a quiet period: is the relay still there?
                self._act(live.poll(time.monotonic()))
                continue
            live.on_receive(time.monotonic())
            if data:
                self._dispatch(conn.receive_data(data))
            if wire.eof is not None:
                if self._dead:
                    return
                raise ConnectionResetError(errno.ECONNRESET, f"relay {self.url} closed the {wire.eof}")

    def _act(self, action: SendPing | Dead | None) -> None:
        """Carry out what the liveness rules ask for after a silent period."""
        if isinstance(action, SendPing):
            log.debug("relay %s silent while the link is in use: pinging it", self.url)
            self._aside.send([self._conn.send(F.Ping(action.data))])
        elif isinstance(action, Dead):
            raise _dead_link_error(self.url, action)

    def _dispatch(self, events: list[Event]) -> None:
        on_packet, pongs = self.on_packet, []
        for ev in events:
            match ev:
                case F.RecvPacket(src=src, data=data):
                    _call("on_packet", on_packet, src, data)
                    continue
                case F.KeepAlive():
                    continue
                case F.Ping():
                    pongs.append(self._conn.send(ev.response()))
                    continue
                case F.UnknownFrame(type=ftype, length=length):
                    self.frames_skipped += 1
                    log.debug("skipped unknown frame type 0x%02x (%d bytes)", ftype, length)
                    continue
                case F.Restarting():
                    self.restarting = ev
                case F.Pong(data=data):
                    self.liveness.on_pong(data, time.monotonic())
            _call("on_event", self.on_event, ev)
        if pongs:
            self._aside.send(pongs)


class HandshakeIO(Protocol):
    """What the DERP handshake needs from the connection being set up (a `Dialer`)."""

    def send(self, data: bytes) -> None: ...

    def read(self) -> bytes: ...


def derp_handshake(conn: ClientConnection, io: HandshakeIO, *, upgrade: bool = True) -> tuple[Connected, list[Event]]:
    """Upgrade, ServerKey, ClientInfo, ServerInfo (derp_client.go's NewClient): the relay's
    `Connected`, and the events that arrived with it. `upgrade=False`: the connection is
    already upgraded (WebSocket), the relay starts with its ServerKey."""
    if upgrade:
        io.send(conn.send(Upgrade()))
    pending: deque[Event] = deque()
    while True:
        while pending:
            match pending.popleft():
                case F.ServerKey():
                    io.send(conn.send(Hello()))
                    pending.extend(conn.receive_data(b""))
                case Connected() as connected:
                    return connected, list(pending)
        data = io.read()
        if not data:
            conn.receive_eof()  # raises HandshakeError
            raise HandshakeError("relay closed the connection during the handshake")
        pending.extend(conn.receive_data(data))


def _establish(client: DerpClient, dialer: Dialer) -> tuple[Dialer, ClientWebSocket | None]:
    """Reach the relay and do the handshakes: raw DERP, or WebSocket when asked or when the relay
    refuses the plain upgrade (then on a new dialer). The dialer used and the WebSocket framing."""
    try:
        return dialer, _handshake(client, dialer, client.websocket is True)
    except UpgradeError as e:
        if client.websocket is not None or e.status is None:
            raise
        # A plain upgrade refused (a front that passes only WebSockets?): try WebSocket.
        log.info("relay %s refused the DERP upgrade (HTTP %d); trying WebSocket", client.url, e.status)
        dialer = _redial(client, dialer)
        try:
            return dialer, _handshake(client, dialer, True)
        except (OSError, DerpError) as ws_error:
            log.info("relay %s: WebSocket failed too: %s", client.url, ws_error)
            raise e from None


def _handshake(client: DerpClient, dialer: Dialer, websocket: bool) -> ClientWebSocket | None:
    """Connect, TLS, (the WebSocket upgrade,) the DERP handshake: the WebSocket framing, if any."""
    dialer.connect()
    if client.relay.tls:
        dialer.start_tls(client.ssl_context)
    io: HandshakeIO = dialer
    framing = None
    if websocket:
        dialer.phase = "in the WebSocket upgrade"
        framing, leftover = ws_upgrade(dialer, client.relay.host_header, client._user_agent)
        io = WsHandshakeIO(dialer, framing, leftover)
    dialer.phase = "in the DERP handshake"
    connected, client._early = derp_handshake(client._conn, io, upgrade=not websocket)
    client.server_key, client.server_info = connected.server_key, connected.server_info
    return framing


def _redial(client: DerpClient, old: Dialer) -> Dialer:
    """A fresh attempt within what is left of the connect deadline (close() still aborts it)."""
    old.close_socket()
    left = None if old.deadline is None else max(old.deadline - time.monotonic(), 0.001)
    new = Dialer(client.relay, left)
    with client._state_lock:
        client._dialer = new
        if client._closing:
            new.abort()
    old.close()
    client._conn = ClientConnection(client.key, client.relay.host_header, user_agent=client._user_agent)
    return new


def _call(what: str, callback: Callable[..., None] | None, *args: object) -> None:
    """Run a user callback from the reader thread; its failures are logged, never raised."""
    if callback is not None:
        try:
            callback(*args)
        except Exception:
            log.exception("%s callback failed", what)


def _dead_link_error(url: str, dead: Dead) -> TimeoutError:
    if dead.reason is DeadReason.IDLE:
        return TimeoutError(errno.ETIMEDOUT, f"no frames from relay {url} for {dead.limit:g}s")
    return TimeoutError(errno.ETIMEDOUT, f"relay {url} did not answer a ping within {dead.limit:g}s "
                        f"(silent for {dead.silent_for:.1f}s while the link was in use)")


class _AsideWriter:
    """Control frames the reader wants sent (our liveness Ping, Pongs), written from a
    short-lived thread: the reader must never wait for the send lock, which a writer stuck in
    a full socket buffer holds for up to write_timeout, as the reader alone can call the
    link dead. One thread at a time (it ends with the write or the link); at most
    `MAX_ASIDE` frames wait, the oldest dropped: a relay pinging faster than we can answer
    gets best-effort Pongs, as from Tailscale's client."""

    def __init__(self, client: DerpClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._frames: deque[bytes] = deque(maxlen=MAX_ASIDE)
        self._busy = False  # a thread is writing

    def send(self, frames: list[bytes]) -> None:
        """Queue frames and make sure a thread writes them (never blocks)."""
        with self._lock:
            self._frames.extend(frames)
            if self._busy:
                return
            self._busy = True
        threading.Thread(target=self._run, name=f"derpnet-aside-{self._client.public_key.b64()[:8]}",
                         daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                frames = list(self._frames)
                self._frames.clear()
                self._busy = bool(frames)
            if not frames:
                return
            try:
                self._client._write(b"".join(frames), None)
            except (ConnectionError, TimeoutError) as e:  # the link is dead: the reader reports it
                log.debug("relay %s: %d control frame(s) not sent: %s", self._client.url, len(frames), e)
