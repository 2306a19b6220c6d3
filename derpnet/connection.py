"""DERP connections as sans-IO state machines (in the manner of h11 and wsproto).

Layer: protocol. `ClientConnection` and `ServerConnection` combine the HTTP upgrade,
the hello and the frame codec. One way in, one way out, on both sides:
`receive_data(bytes) -> list[Event]` and `send(Event) -> bytes`. Nothing is answered
behind the caller's back: a `Ping` is answered by sending `ping.response()`, a
`ServerKey` by sending `Hello()`, an `UpgradeRequest` by `AcceptUpgrade()`, a
`ClientHello` by `AcceptClient()`. A connection stops decoding at a step that waits
for such an answer; after sending it, call `receive_data(b"")` for what was buffered
behind it. They never touch sockets, threads or clocks.

Failures before the connection is up raise `HandshakeError` (a `RemoteProtocolError`),
after it `RemoteProtocolError`; sending what the state does not allow raises
`LocalProtocolError`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from . import frames as F
from .errors import HandshakeError, LocalProtocolError, RemoteProtocolError, UpgradeError
from .events import (
    AcceptClient,
    AcceptUpgrade,
    ClientHello,
    Connected,
    Event,
    Hello,
    HttpRequest,
    Reject,
    Upgrade,
    UpgradeRequest,
)
from .handshake import (
    DEFAULT_CLIENT_INFO,
    DEFAULT_SERVER_INFO,
    open_client_info,
    open_server_info,
    seal_client_info,
    seal_server_info,
)
from .http11 import build_request, build_response, parse_request_head, parse_response_head
from .keys import PrivateKey, PublicKey
from .websocket import is_derp_websocket

__all__ = ["ClientConnection", "ServerConnection", "State", "Connected", "ClientHello", "UpgradeRequest",
           "HttpRequest", "Upgrade", "Hello", "AcceptUpgrade", "Reject", "AcceptClient"]


class State(enum.Enum):
    AWAIT_HTTP = "await-http"  # client: response or first frame; server: request head
    AWAIT_SERVER_KEY = "await-server-key"
    SEND_HELLO = "send-hello"  # client: ServerKey received, waiting for send(Hello())
    AWAIT_CLIENT_INFO = "await-client-info"
    AWAIT_SERVER_INFO = "await-server-info"
    AWAIT_ACCEPT = "await-accept"  # server: upgrade request received, waiting for send(AcceptUpgrade())
    CONNECTED = "connected"
    CLOSED = "closed"


def _handshake_error(e: RemoteProtocolError) -> HandshakeError:
    """A protocol error before the connection is up is a handshake failure, on both sides."""
    return e if isinstance(e, HandshakeError) else HandshakeError(f"during the handshake: {e}")


class _Connection:
    """What both sides share: the state, the frame decoder, and error bookkeeping."""

    def __init__(self, key: PrivateKey, role: F.Role) -> None:
        self.key = key
        self.state = State.AWAIT_HTTP
        self._buf = bytearray()  # only before frames start
        self._decoder = F.FrameDecoder(role)

    @property
    def decoder(self) -> F.FrameDecoder:
        return self._decoder

    @property
    def buffered(self) -> int:
        """Bytes received and held, not yet turned into events (the HTTP head, partial frames)."""
        return len(self._buf) + self._decoder.buffered

    def _check_open(self) -> None:
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")

    def _decode(self, step: Callable[[F.Frame, list[Event]], bool]) -> list[Event]:
        """Decode buffered frames through `step(frame, events)` while it returns True.

        Errors close the connection; before CONNECTED they are HandshakeErrors."""
        events: list[Event] = []
        try:
            while (ev := self._decoder.next_event()) is not None:
                if not step(ev, events):
                    break
        except RemoteProtocolError as e:
            connected = self.state is State.CONNECTED
            self.state = State.CLOSED
            if connected:
                raise
            raise _handshake_error(e) from None
        return events

    def _send_frame(self, ev: Event) -> bytes:
        if not isinstance(ev, F.Frame):
            raise LocalProtocolError(f"cannot send {type(ev).__name__} in state {self.state.value}")
        if self.state is not State.CONNECTED:
            raise LocalProtocolError(f"cannot send {type(ev).__name__} before the connection is up "
                                     f"(state {self.state.value})")
        return F.encode(ev)


class ClientConnection(_Connection):
    """The client side of one DERP connection to a relay."""

    def __init__(self, key: PrivateKey, host: str, *, path: str = "/derp",
                 user_agent: str = "derpnet-python", client_info: dict[str, Any] | None = None) -> None:
        super().__init__(key, F.Role.CLIENT)
        self.host = host
        self.path = path
        self.user_agent = user_agent
        self.client_info = dict(client_info if client_info is not None else DEFAULT_CLIENT_INFO)
        self.server_key: PublicKey | None = None
        self.server_info: dict[str, Any] = {}

    def send(self, event: Event) -> bytes:
        """The bytes for `event`: `Upgrade()` first, `Hello()` after ServerKey, then frames."""
        self._check_open()
        match event:
            case Upgrade(fast_start=fast_start):
                if self.state is not State.AWAIT_HTTP:
                    raise LocalProtocolError(f"Upgrade in state {self.state.value}")
                headers = [("Host", self.host), ("User-Agent", self.user_agent),
                           ("Connection", "Upgrade"), ("Upgrade", "DERP")]
                if fast_start:
                    headers.append(("Derp-Fast-Start", "1"))
                return build_request("GET", self.path, headers)
            case Hello():
                if self.state is not State.SEND_HELLO or self.server_key is None:
                    raise LocalProtocolError(f"Hello in state {self.state.value} (send it after ServerKey)")
                self.state = State.AWAIT_SERVER_INFO
                sealed = seal_client_info(self.key, self.server_key, self.client_info)
                return F.encode_client_info(self.key.public_key, sealed)
        return self._send_frame(event)

    def receive_eof(self) -> None:
        """The relay closed its side: an error unless we had already closed."""
        was = self.state
        self.state = State.CLOSED
        if was is not State.CONNECTED and was is not State.CLOSED:
            raise HandshakeError(f"relay closed the connection during the handshake ({was.value})")

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; return events: the ServerKey frame, Connected, then frames."""
        self._check_open()
        if self.state is State.AWAIT_HTTP:
            self._buf += data
            if not self._take_http():
                return []
            data, self._buf = bytes(self._buf), bytearray()
        try:
            self._decoder.feed(data)
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise
        if self.state is State.SEND_HELLO:
            return []
        return self._decode(self._step)

    def _take_http(self) -> bool:
        """Consume a 101 response if there is one; True once frames may follow."""
        buf = self._buf
        if len(buf) < 5:
            return False
        if bytes(buf[:5]) != b"HTTP/":
            if buf[0] != F.FrameType.SERVER_KEY:
                self.state = State.CLOSED
                raise HandshakeError(f"relay sent neither an HTTP response nor a DERP ServerKey frame "
                                     f"(first bytes {bytes(buf[:16])!r}); is this a DERP server?")
            self.state = State.AWAIT_SERVER_KEY  # fast start, or the relay skipped the 101
            return True
        try:
            parsed = parse_response_head(buf)
        except RemoteProtocolError as e:
            self.state = State.CLOSED
            raise UpgradeError(f"relay sent a malformed HTTP response: {e}") from None
        if parsed is None:
            return False
        resp, used = parsed
        if resp.status != 101:
            self.state = State.CLOSED
            body = bytes(buf[used:used + 200]).decode("utf-8", "replace").strip()
            hint = f": {body!r}" if body else ""
            raise UpgradeError(f"relay answered HTTP {resp.status} {resp.reason} instead of switching to DERP{hint}",
                               status=resp.status)
        del buf[:used]
        self.state = State.AWAIT_SERVER_KEY
        return True

    def _step(self, ev: F.Frame, events: list[Event]) -> bool:
        state = self.state
        if state is State.CONNECTED:
            events.append(ev)
        elif state is State.AWAIT_SERVER_KEY:
            if not isinstance(ev, F.ServerKey):
                raise HandshakeError(f"relay's first frame is {type(ev).__name__}, not ServerKey "
                                     "(is this a DERP server?)")
            self.server_key = ev.key
            self.state = State.SEND_HELLO
            events.append(ev)
            return False  # the rest waits for send(Hello())
        elif state is State.AWAIT_SERVER_INFO and not isinstance(ev, F.UnknownFrame):
            if isinstance(ev, F.Health) and ev.problem:
                # derpnet's relay says why it refuses a client (access control) before closing.
                raise HandshakeError(f"relay refused the connection: {ev.problem}")
            if not isinstance(ev, F.ServerInfo):
                raise HandshakeError(f"expected ServerInfo from the relay, got {type(ev).__name__}")
            assert self.server_key is not None
            self.server_info = open_server_info(self.key, self.server_key, ev.sealed)
            self.state = State.CONNECTED
            events.append(Connected(self.server_key, self.server_info))
        return True


class ServerConnection(_Connection):
    """The relay side of one client connection: HTTP request, hello, then frames."""

    def __init__(self, key: PrivateKey, *, server_info: dict[str, Any] | None = None) -> None:
        super().__init__(key, F.Role.SERVER)
        self.server_info = dict(server_info if server_info is not None else DEFAULT_SERVER_INFO)
        self.client_key: PublicKey | None = None
        self.client_info: dict[str, Any] = {}
        self.fast_start = False
        #: After a DERP WebSocket upgrade request: the bytes that came behind it (WebSocket
        #: frames, for the caller to unwrap); None for raw DERP.
        self.websocket_leftover: bytes | None = None

    def send(self, event: Event) -> bytes:
        """The bytes for `event`: `AcceptUpgrade()` or `Reject()`, `AcceptClient()`, then frames."""
        self._check_open()
        match event:
            case AcceptUpgrade():
                if self.state is not State.AWAIT_ACCEPT:
                    raise LocalProtocolError(f"AcceptUpgrade in state {self.state.value}")
                out = b""
                if not self.fast_start:
                    out = build_response(101, [
                        ("Upgrade", "DERP"), ("Connection", "Upgrade"),
                        ("Derp-Version", str(F.PROTOCOL_VERSION)), ("Derp-Public-Key", self.key.public_key.hex()),
                    ])
                self.state = State.AWAIT_CLIENT_INFO
                return out + F.encode_server_key(self.key.public_key)
            case Reject(status=status, body=body):
                self.state = State.CLOSED
                return build_response(status, {"Content-Type": "text/plain; charset=utf-8", "Connection": "close"},
                                      body.encode())
            case AcceptClient():
                if self.state is not State.AWAIT_SERVER_INFO or self.client_key is None:
                    raise LocalProtocolError(f"AcceptClient in state {self.state.value}")
                self.state = State.CONNECTED
                return F.encode_server_info(seal_server_info(self.key, self.client_key, self.server_info))
        return self._send_frame(event)

    def receive_data(self, data: bytes | memoryview) -> list[Event]:
        """Feed received bytes (copied); return events: HttpRequest/UpgradeRequest, ClientHello, frames."""
        state = self.state
        if state is State.CONNECTED:
            return self._receive_frames(data)
        self._check_open()
        if state is State.AWAIT_HTTP:
            return self._receive_head(data)
        try:
            self._decoder.feed(data)
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise
        if self.state is State.AWAIT_ACCEPT or self.state is State.AWAIT_SERVER_INFO:
            return []  # buffered until send(AcceptUpgrade()) / send(AcceptClient())
        if self.state is State.AWAIT_CLIENT_INFO:
            self._check_first_frame()
        return self._decode(self._step)

    def _receive_frames(self, data: bytes | memoryview) -> list[Event]:
        """receive_data once connected (the relay's hot path): every frame is an event."""
        client_info = F.ClientInfo
        try:
            events: list[Event] = list(self._decoder.decode(data))
            for ev in events:
                if type(ev) is client_info:
                    raise RemoteProtocolError("a second ClientInfo")
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise
        return events

    def _check_first_frame(self) -> None:
        """Refuse anything but a ClientInfo on its header, as derper does, before its payload is
        buffered: an unauthenticated client never makes us hold more than one ClientInfo."""
        head = self._decoder.next_header()
        if head is None or head[0] == F.FrameType.CLIENT_INFO:
            return
        self.state = State.CLOSED
        ftype, length = head
        try:
            name = F.FrameType(ftype).name
        except ValueError:
            name = f"type 0x{ftype:02x}"
        raise HandshakeError(f"first frame from the client is {name} ({length} bytes), not ClientInfo")

    def _receive_head(self, data: bytes | memoryview) -> list[Event]:
        self._buf += data
        try:
            parsed = parse_request_head(self._buf)
        except RemoteProtocolError as e:
            self.state = State.CLOSED
            raise _handshake_error(e) from None
        if parsed is None:
            return []
        req, used = parsed
        rest = bytes(self._buf[used:])
        self._buf = bytearray()
        upgrade = (req.get("Upgrade") or "").lower()
        if req.path == "/derp" and upgrade in ("derp", "websocket"):
            self.state = State.AWAIT_ACCEPT
            if is_derp_websocket(req):
                # DERP in WebSocket messages: the caller unwraps them, and no 101 of ours
                # (the WebSocket 101 is the caller's) goes before the ServerKey.
                self.websocket_leftover = rest
                self.fast_start = True
                return [UpgradeRequest(req, fast_start=False)]
            self.fast_start = req.get("Derp-Fast-Start") == "1"
            self._decoder.feed(rest)  # a pipelined ClientInfo (fast start), judged after AcceptUpgrade
            return [UpgradeRequest(req, fast_start=self.fast_start)]
        self.state = State.CLOSED
        return [HttpRequest(req)]

    def _step(self, ev: F.Frame, events: list[Event]) -> bool:
        if self.state is State.AWAIT_CLIENT_INFO:
            if not isinstance(ev, F.ClientInfo):
                name = type(ev).__name__ if not isinstance(ev, F.UnknownFrame) else f"frame type 0x{ev.type:02x}"
                raise HandshakeError(f"first frame from the client is {name}, not ClientInfo")
            self.client_info = open_client_info(self.key, ev.key, ev.sealed)
            self.client_key = ev.key
            self.state = State.AWAIT_SERVER_INFO
            events.append(ClientHello(ev.key, self.client_info))
            return False  # the rest waits for send(AcceptClient())
        if isinstance(ev, F.ClientInfo):
            raise RemoteProtocolError("a second ClientInfo")
        events.append(ev)
        return True
