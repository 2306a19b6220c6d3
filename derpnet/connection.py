"""DERP connections as sans-IO state machines (in the manner of h11 and wsproto).

`ClientConnection` and `ServerConnection` combine the HTTP upgrade, the hello and the
frame codec. Feed them received bytes with `receive_data()`, get events back, and send
whatever `data_to_send()` returns. They never touch sockets, threads or clocks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from . import frames as F
from .errors import HandshakeError, LocalProtocolError, RemoteProtocolError, UpgradeError
from .handshake import (DEFAULT_CLIENT_INFO, DEFAULT_SERVER_INFO, open_client_info,
                        open_server_info, seal_client_info, seal_server_info)
from .http11 import Request, build_request, build_response, parse_request_head, parse_response_head
from .keys import PrivateKey, PublicKey

__all__ = ["ClientConnection", "ServerConnection", "Connected", "ClientHello", "UpgradeRequest",
           "HttpRequest", "State"]


class State(enum.Enum):
    AWAIT_HTTP = "await-http"  # client: response or first frame; server: request head
    AWAIT_SERVER_KEY = "await-server-key"
    AWAIT_CLIENT_INFO = "await-client-info"
    AWAIT_SERVER_INFO = "await-server-info"
    AWAIT_ACCEPT = "await-accept"  # server: ClientInfo opened, app decides
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True)
class Connected:
    """Client: the relay's ServerInfo opened; the connection is up."""

    server_key: PublicKey
    server_info: Dict[str, Any]


@dataclass(frozen=True)
class UpgradeRequest:
    """Server: a `GET /derp` asking to switch to DERP; call accept_upgrade() or reject."""

    request: Request
    fast_start: bool


@dataclass(frozen=True)
class HttpRequest:
    """Server: any other HTTP request (probes, /generate_204, a browser); answer and close."""

    request: Request


@dataclass(frozen=True)
class ClientHello:
    """Server: a client proved its key (its ClientInfo box opened); call accept() or close."""

    key: PublicKey
    info: Dict[str, Any] = field(default_factory=dict)


class ClientConnection:
    """The client side of one DERP connection to a relay."""

    def __init__(self, key: PrivateKey, host: str, *, path: str = "/derp",
                 user_agent: str = "derpnet-python", client_info: Optional[Dict[str, Any]] = None) -> None:
        self.key = key
        self.host = host
        self.path = path
        self.user_agent = user_agent
        self.client_info = dict(client_info if client_info is not None else DEFAULT_CLIENT_INFO)
        self.state = State.AWAIT_HTTP
        self.server_key: Optional[PublicKey] = None
        self.server_info: Dict[str, Any] = {}
        self._buf = bytearray()  # only before frames start
        self._decoder = F.FrameDecoder("client")
        self._out: List[bytes] = []

    # -- sending
    def initiate(self) -> bytes:
        """The HTTP upgrade request to write first."""
        return build_request("GET", self.path, [
            ("Host", self.host), ("User-Agent", self.user_agent),
            ("Connection", "Upgrade"), ("Upgrade", "DERP"),
        ])

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send_packet(self, dst: PublicKey, *data: bytes) -> bytes:
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        return F.encode_send_packet(dst, *data)

    def ping(self, data: bytes) -> bytes:
        return F.encode_ping(data)

    def note_preferred(self, preferred: bool) -> bytes:
        return F.encode_note_preferred(preferred)

    # -- receiving
    def receive_eof(self) -> None:
        """The relay closed its side: an error unless we had already closed."""
        was = self.state
        self.state = State.CLOSED
        if was is not State.CONNECTED and was is not State.CLOSED:
            raise HandshakeError(f"relay closed the connection during the handshake ({was.value})")

    def receive_data(self, data: bytes) -> List[object]:
        """Feed received bytes; return events (Connected and decoded frames).

        Pings are answered automatically: the Pong is queued in data_to_send().
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        if self.state is State.AWAIT_HTTP:
            self._buf += data
            if not self._take_http():
                return []
            data, self._buf = bytes(self._buf), bytearray()
        try:
            self._decoder.feed(data)
            return self._frames()
        except (RemoteProtocolError, HandshakeError):
            self.state = State.CLOSED
            raise

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

    def _frames(self) -> List[object]:
        events: List[object] = []
        for ev in self._decoder.events():
            if self.state is State.CONNECTED:
                if isinstance(ev, F.Ping):
                    self._out.append(F.encode_pong(ev.data))
                events.append(ev)
            elif self.state is State.AWAIT_SERVER_KEY:
                if not isinstance(ev, F.ServerKey):
                    raise HandshakeError(f"relay's first frame is {type(ev).__name__}, not ServerKey "
                                         "(is this a DERP server?)")
                self.server_key = ev.key
                sealed = seal_client_info(self.key, ev.key, self.client_info)
                self._out.append(F.encode_client_info(self.key.public_key, sealed))
                self.state = State.AWAIT_SERVER_INFO
            elif self.state is State.AWAIT_SERVER_INFO:
                if isinstance(ev, F.UnknownFrame):
                    continue
                if not isinstance(ev, F.ServerInfo):
                    raise HandshakeError(f"expected ServerInfo from the relay, got {type(ev).__name__}")
                assert self.server_key is not None
                self.server_info = open_server_info(self.key, self.server_key, ev.sealed)
                self.state = State.CONNECTED
                events.append(Connected(self.server_key, self.server_info))
        return events


class ServerConnection:
    """The relay side of one client connection: HTTP request, hello, then frames."""

    def __init__(self, key: PrivateKey, *, server_info: Optional[Dict[str, Any]] = None) -> None:
        self.key = key
        self.server_info = dict(server_info if server_info is not None else DEFAULT_SERVER_INFO)
        self.state = State.AWAIT_HTTP
        self.client_key: Optional[PublicKey] = None
        self.client_info: Dict[str, Any] = {}
        self._buf = bytearray()
        self._decoder = F.FrameDecoder("server")

    def receive_data(self, data: bytes) -> List[object]:
        """Feed received bytes; return events: HttpRequest/UpgradeRequest, ClientHello, frames."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        if self.state is State.AWAIT_HTTP:
            self._buf += data
            try:
                parsed = parse_request_head(self._buf)
            except RemoteProtocolError:
                self.state = State.CLOSED
                raise
            if parsed is None:
                return []
            req, used = parsed
            rest = bytes(self._buf[used:])
            self._buf = bytearray()
            upgrade = (req.get("Upgrade") or "").lower()
            if req.path == "/derp" and upgrade in ("derp", "websocket"):
                self.state = State.AWAIT_ACCEPT
                self._decoder.feed(rest)  # pipelined ClientInfo (fast start)
                return [UpgradeRequest(req, fast_start=req.get("Derp-Fast-Start") == "1")]
            self.state = State.CLOSED
            return [HttpRequest(req)]
        self._decoder.feed(data)
        if self.state is State.AWAIT_ACCEPT:
            return []  # buffered until accept_upgrade()
        return self._frames()

    def accept_upgrade(self, fast_start: bool) -> Tuple[bytes, List[object]]:
        """Switch to DERP: the 101 (none for fast start) and ServerKey to send, plus any
        events already buffered (a pipelined ClientInfo)."""
        if self.state is not State.AWAIT_ACCEPT:
            raise LocalProtocolError(f"accept_upgrade() in state {self.state.value}")
        out = b""
        if not fast_start:
            out = build_response(101, [
                ("Upgrade", "DERP"), ("Connection", "Upgrade"), ("Derp-Version", str(F.PROTOCOL_VERSION)),
                ("Derp-Public-Key", self.key.public_key.hex()),
            ])
        out += F.encode_server_key(self.key.public_key)
        self.state = State.AWAIT_CLIENT_INFO
        return out, self._frames()

    def reject(self, status: int, body: str) -> bytes:
        """An HTTP error response; the connection is then finished."""
        self.state = State.CLOSED
        return build_response(status, {"Content-Type": "text/plain; charset=utf-8", "Connection": "close"},
                              body.encode())

    def accept(self) -> bytes:
        """Admit the client that sent ClientHello: the ServerInfo frame to send."""
        if self.state is not State.AWAIT_SERVER_INFO or self.client_key is None:
            raise LocalProtocolError(f"accept() in state {self.state.value}")
        self.state = State.CONNECTED
        return F.encode_server_info(seal_server_info(self.key, self.client_key, self.server_info))

    def _frames(self) -> List[object]:
        events: List[object] = []
        try:
            for ev in self._decoder.events():
                if self.state is State.AWAIT_CLIENT_INFO:
                    if not isinstance(ev, F.ClientInfo):
                        name = type(ev).__name__ if not isinstance(ev, F.UnknownFrame) else f"frame type 0x{ev.type:02x}"
                        raise RemoteProtocolError(f"first frame from the client is {name}, not ClientInfo")
                    self.client_info = open_client_info(self.key, ev.key, ev.sealed)
                    self.client_key = ev.key
                    self.state = State.AWAIT_SERVER_INFO
                    events.append(ClientHello(ev.key, self.client_info))
                elif isinstance(ev, F.ClientInfo):
                    raise RemoteProtocolError("a second ClientInfo")
                else:
                    events.append(ev)
        except (RemoteProtocolError, HandshakeError):
            self.state = State.CLOSED
            raise
        return events

    @property
    def decoder(self) -> F.FrameDecoder:
        return self._decoder
