"""WebSocket (RFC 6455) for DERP, sans-IO: the opening handshake and the framing.

Layer: protocol. DERP over WebSocket (shared/derp-protocol.md §1.6) is the same byte stream
carried in binary messages whose boundaries mean nothing, with the subprotocol `derp`.
`WebSocket` turns stream bytes into frames (`send_data`, masked from the client, split
into messages of at most `max_send` bytes: derper reads at most 32 KiB per message) and
received frames back into stream bytes (`receive_data`). Control frames come out as events
the caller answers (`Ping.response()`, a `Close` echoed with `close()`); a text message, an
oversized message, a frame masked the wrong way or reserved bits close the connection with
the RFC's code. No extensions (permessage-deflate is never negotiated), no sockets, no clocks.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RemoteProtocolError, UpgradeError
from .events import Event
from .http11 import Request, Response, build_request, build_response

__all__ = ["WebSocket", "WsClose", "WsPing", "WsPong", "WebSocketError", "SUBPROTOCOL", "accept_key",
           "client_request", "check_response", "is_derp_websocket", "server_response", "new_key",
           "DERP_MAX_MESSAGE", "CLOSE_NORMAL", "CLOSE_GOING_AWAY", "CLOSE_PROTOCOL", "CLOSE_UNSUPPORTED",
           "CLOSE_POLICY", "CLOSE_TOO_BIG"]

SUBPROTOCOL = "derp"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: derper's read limit per message (coder/websocket's default): what our client sends at most.
DERP_MAX_MESSAGE = 32768
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL, CLOSE_UNSUPPORTED = 1000, 1001, 1002, 1003
CLOSE_POLICY, CLOSE_TOO_BIG = 1008, 1009
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WebSocketError(RemoteProtocolError):
    """The peer broke RFC 6455 (or our limits); `code` is the close code to send it."""

    def __init__(self, message: str, code: int = CLOSE_PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class WsPing(Event):
    """A Ping frame: answer with `send(ping.response())`."""

    payload: bytes

    def response(self) -> WsPong:
        return WsPong(self.payload)


@dataclass(frozen=True)
class WsPong(Event):
    payload: bytes


@dataclass(frozen=True)
class WsClose(Event):
    """A Close frame (code 1005 when it had none). 1000 and 1001 are a clean end of stream."""

    code: int = CLOSE_NORMAL
    reason: str = ""


# ---------------------------------------------------------------- opening handshake


def new_key(rand: Callable[[int], bytes] = os.urandom) -> str:
    return base64.b64encode(rand(16)).decode()


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def client_request(host: str, key: str, path: str = "/derp", user_agent: str = "derpnet-python") -> bytes:
    """The client's upgrade request asking for the `derp` subprotocol."""
    return build_request("GET", path, [("Host", host), ("User-Agent", user_agent), ("Connection", "Upgrade"),
                                       ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
                                       ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Protocol", SUBPROTOCOL)])


def check_response(resp: Response, key: str) -> None:
    """UpgradeError unless `resp` accepts our WebSocket upgrade with the derp subprotocol."""
    if resp.status != 101:
        raise UpgradeError(f"relay answered HTTP {resp.status} {resp.reason} to the WebSocket upgrade",
                           status=resp.status)
    if (resp.get("Upgrade") or "").lower() != "websocket":
        raise UpgradeError("relay's 101 is not a WebSocket upgrade")
    if resp.get("Sec-WebSocket-Accept") != accept_key(key):
        raise UpgradeError("relay's Sec-WebSocket-Accept does not match our key")
    if (resp.get("Sec-WebSocket-Protocol") or "").strip() != SUBPROTOCOL:
        raise UpgradeError("relay did not select the derp WebSocket subprotocol")


def is_derp_websocket(req: Request) -> bool:
    """derper's rule: `Upgrade: websocket` and a Sec-WebSocket-Protocol containing `derp`
    (an old client's bare `Upgrade: WebSocket` speaks raw DERP)."""
    return (req.get("Upgrade") or "").lower() == "websocket" and SUBPROTOCOL in (
        req.get("Sec-WebSocket-Protocol") or "")


def server_response(req: Request) -> bytes:
    """The 101 accepting a DERP WebSocket upgrade; UpgradeError (status 400/426) for a bad request."""
    key = req.get("Sec-WebSocket-Key") or ""
    try:
        ok = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        ok = False
    if not ok:
        raise UpgradeError("missing or malformed Sec-WebSocket-Key", status=400)
    if (req.get("Sec-WebSocket-Version") or "").strip() != "13":
        raise UpgradeError("unsupported Sec-WebSocket-Version (13 is)", status=426)
    return build_response(101, [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                ("Sec-WebSocket-Accept", accept_key(key)),
                                ("Sec-WebSocket-Protocol", SUBPROTOCOL)])


# ---------------------------------------------------------------- framing


def _mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR with the 4-byte mask (as one big integer: C speed for any length)."""
    n = len(data)
    if not n:
        return b""
    m = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(m, "little")).to_bytes(n, "little")


def _header(opcode: int, n: int, mask: bytes | None, fin: bool = True) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack(">BB", b0, mbit | n)
    elif n < 1 << 16:
        head = struct.pack(">BBH", b0, mbit | 126, n)
    else:
        head = struct.pack(">BBQ", b0, mbit | 127, n)
    return head + mask if mask is not None else head


class WebSocket:
    """One WebSocket connection's framing (after the handshake). `client`: we mask and the
    peer must not; `max_message`: the most we accept in one message; `max_send`: the most we
    put in one message."""

    def __init__(self, *, client: bool, max_message: int = 1 << 20, max_send: int = DERP_MAX_MESSAGE,
                 rand: Callable[[int], bytes] = os.urandom) -> None:
        self.client = client
        self.max_message = max_message
        self.max_send = max_send
        self._rand = rand
        self._buf = bytearray()
        self._message = 0      # bytes of the data message in progress
        self._in_message = False
        self.closed = False    # a Close was sent or received

    @property
    def buffered(self) -> int:
        return len(self._buf)

    # ------------------------------------------------------------ sending

    def send_data(self, data: bytes) -> bytes:
        """DERP stream bytes as binary messages of at most `max_send` bytes each."""
        out = []
        view = memoryview(data)
        for i in range(0, len(view), self.max_send):
            out.append(self._frame(OP_BINARY, view[i:i + self.max_send]))
        return b"".join(out)

    def send(self, event: WsPing | WsPong | WsClose) -> bytes:
        """A control frame."""
        match event:
            case WsPing(payload=p):
                return self._frame(OP_PING, p[:125])
            case WsPong(payload=p):
                return self._frame(OP_PONG, p[:125])
            case WsClose(code=code, reason=reason):
                self.closed = True
                return self._frame(OP_CLOSE, struct.pack(">H", code) + reason.encode()[:123])
        raise TypeError(f"cannot send {type(event).__name__}")  # pragma: no cover

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
        return self.send(WsClose(code, reason))

    def _frame(self, opcode: int, payload: bytes | memoryview) -> bytes:
        if self.client:
            mask = self._rand(4)
            return _header(opcode, len(payload), mask) + _mask(payload, mask)
        return _header(opcode, len(payload), None) + bytes(payload)

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> tuple[bytes, list[WsPing | WsPong | WsClose]]:
        """(the stream bytes of the data frames received, the control frames). WebSocketError
        for anything RFC 6455 or our limits forbid (then send `close(e.code)` and hang up)."""
        self._buf += data
        out: list[bytes] = []
        controls: list[WsPing | WsPong | WsClose] = []
        while not self.closed:
            frame = self._next_frame()
            if frame is None:
                break
            opcode, fin, payload = frame
            if opcode >= OP_CLOSE:
                controls.append(self._control(opcode, payload))
            else:
                out.append(payload)
        return b"".join(out), controls

    def _next_frame(self) -> tuple[int, bool, bytes] | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin, opcode, masked, n = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        if b0 & 0x70:
            raise WebSocketError("reserved bits set (no extension was negotiated)")
        if masked == self.client:
            raise WebSocketError("frame from the server is masked" if self.client else "client frame is not masked")
        pos = 2
        if n == 126:
            if len(buf) < 4:
                return None
            (n,) = struct.unpack_from(">H", buf, 2)
            pos = 4
        elif n == 127:
            if len(buf) < 10:
                return None
            (n,) = struct.unpack_from(">Q", buf, 2)
            pos = 10
        self._check(opcode, fin, n)
        end = pos + (4 if masked else 0) + n
        if len(buf) < end:
            return None
        if masked:
            payload = _mask(memoryview(buf)[pos + 4:end], bytes(buf[pos:pos + 4]))
        else:
            payload = bytes(buf[pos:end])
        del buf[:end]
        if opcode < OP_CLOSE:
            self._message = 0 if fin else self._message + n
            self._in_message = not fin
        return opcode, fin, payload

    def _check(self, opcode: int, fin: bool, n: int) -> None:
        """Judge a frame on its header, before its payload is buffered."""
        if opcode >= OP_CLOSE:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise WebSocketError(f"unknown control opcode 0x{opcode:x}")
            if n > 125 or not fin:
                raise WebSocketError("control frame too long or fragmented")
            return
        if opcode == OP_TEXT:
            raise WebSocketError("text message: DERP is binary", CLOSE_UNSUPPORTED)
        if opcode not in (OP_CONT, OP_BINARY):
            raise WebSocketError(f"unknown data opcode 0x{opcode:x}")
        if (opcode == OP_CONT) != self._in_message:
            raise WebSocketError("continuation frame outside a message" if opcode == OP_CONT
                                 else "new message before the last one ended")
        if self._message + n > self.max_message:
            raise WebSocketError(f"message over {self.max_message} bytes", CLOSE_TOO_BIG)

    def _control(self, opcode: int, payload: bytes) -> WsPing | WsPong | WsClose:
        if opcode == OP_PING:
            return WsPing(payload)
        if opcode == OP_PONG:
            return WsPong(payload)
        self.closed = True
        if len(payload) == 1:
            raise WebSocketError("close frame with a 1-byte payload")
        if not payload:
            return WsClose(1005)
        (code,) = struct.unpack_from(">H", payload)
        return WsClose(code, payload[2:].decode("utf-8", "replace"))
