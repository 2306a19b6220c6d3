"""DERP framing, sans-IO: constants, frame events, encoders and an incremental decoder.

Layer: protocol. Every frame is `type(1) ‖ length(4, big-endian) ‖ payload(length)`.
This module is the only place that knows a frame's byte layout; it never touches a
socket or a clock. See shared/derp-protocol.md §2.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from .errors import LocalProtocolError, RemoteProtocolError
from .events import Event
from .keys import KEY_LEN, PublicKey

__all__ = [
    "MAGIC", "FRAME_HEADER_LEN", "NONCE_LEN", "MAX_PACKET_SIZE", "PROTOCOL_VERSION",
    "KEEPALIVE_INTERVAL", "FrameType", "PeerGoneReason", "PeerPresentFlags",
    "Frame", "ServerKey", "ClientInfo", "ServerInfo", "SendPacket", "RecvPacket",
    "KeepAlive", "NotePreferred", "PeerGone", "PeerPresent", "ForwardPacket",
    "WatchConns", "ClosePeer", "Ping", "Pong", "Health", "Restarting", "UnknownFrame",
    "Role", "FrameLimits", "FrameDecoder", "encode_frame", "encode", "CLIENT_LIMITS", "SERVER_LIMITS",
]

MAGIC = b"DERP\xf0\x9f\x94\x91"  # "DERP🔑"
FRAME_HEADER_LEN = 5
NONCE_LEN = 24
MAX_PACKET_SIZE = 64 << 10  # largest SendPacket/RecvPacket payload
MAX_INFO_LEN = 1 << 20
PROTOCOL_VERSION = 2
KEEPALIVE_INTERVAL = 60.0
PING_LEN = 8

_HEADER = struct.Struct(">BI")


class FrameType(enum.IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


_TYPE_NAMES = {t.value: t.name for t in FrameType}
_RECV_PACKET = int(FrameType.RECV_PACKET)  # a plain int packs faster than the enum


class PeerGoneReason(enum.IntEnum):
    DISCONNECTED = 0x00
    NOT_HERE = 0x01
    MESH_CONN_BROKE = 0xF0


class PeerPresentFlags(enum.IntFlag):
    IS_REGULAR = 0x01
    IS_MESH_PEER = 0x02
    IS_PROBER = 0x04
    NOT_IDEAL = 0x08


# ---------------------------------------------------------------- events (decoded frames)

class Frame(Event):
    """Base class of frame events (decoded, or to be encoded by `encode`)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ServerKey(Frame):
    key: PublicKey


@dataclass(frozen=True, slots=True)
class ClientInfo(Frame):
    key: PublicKey
    sealed: bytes  # nonce ‖ box; opened by handshake.open_client_info


@dataclass(frozen=True, slots=True)
class ServerInfo(Frame):
    sealed: bytes  # nonce ‖ box


@dataclass(frozen=True, slots=True)
class SendPacket(Frame):
    dst: PublicKey
    data: bytes


@dataclass(frozen=True, slots=True)
class RecvPacket(Frame):
    src: PublicKey
    data: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive(Frame):
    pass


@dataclass(frozen=True, slots=True)
class NotePreferred(Frame):
    preferred: bool


@dataclass(frozen=True, slots=True)
class PeerGone(Frame):
    key: PublicKey
    reason: int = PeerGoneReason.DISCONNECTED


@dataclass(frozen=True, slots=True)
class PeerPresent(Frame):
    key: PublicKey
    ip: bytes | None = None  # 16 bytes, IPv4 as ::ffff:a.b.c.d
    port: int | None = None
    flags: int = 0


@dataclass(frozen=True, slots=True)
class ForwardPacket(Frame):
    src: PublicKey
    dst: PublicKey
    data: bytes


@dataclass(frozen=True, slots=True)
class WatchConns(Frame):
    pass


@dataclass(frozen=True, slots=True)
class ClosePeer(Frame):
    key: PublicKey


@dataclass(frozen=True, slots=True)
class Ping(Frame):
    data: bytes

    def response(self) -> Pong:
        """The Pong that answers this Ping."""
        return Pong(self.data)


@dataclass(frozen=True, slots=True)
class Pong(Frame):
    data: bytes


@dataclass(frozen=True, slots=True)
class Health(Frame):
    problem: str  # empty = healthy again


@dataclass(frozen=True, slots=True)
class Restarting(Frame):
    reconnect_in: float  # seconds
    try_for: float  # seconds


@dataclass(frozen=True, slots=True)
class UnknownFrame(Frame):
    """A frame this side skips: an unassigned type, or one not meant for this role."""

    type: int
    length: int


# ---------------------------------------------------------------- encoding

def encode_frame(ftype: int, *parts: bytes) -> bytes:
    """One frame: header plus the concatenated parts."""
    return b"".join((_HEADER.pack(ftype, sum(map(len, parts))), *parts))


def _key(k: PublicKey | bytes) -> bytes:
    if type(k) is PublicKey:
        return k.raw
    raw = bytes(k)
    if len(raw) != KEY_LEN:
        raise LocalProtocolError(f"key must be {KEY_LEN} bytes, got {len(raw)}")
    return raw


def encode_server_key(key: PublicKey) -> bytes:
    return encode_frame(FrameType.SERVER_KEY, MAGIC, _key(key))


def encode_client_info(key: PublicKey, sealed: bytes) -> bytes:
    return encode_frame(FrameType.CLIENT_INFO, _key(key), sealed)


def encode_server_info(sealed: bytes) -> bytes:
    return encode_frame(FrameType.SERVER_INFO, sealed)


def _check_packet(*parts: bytes) -> None:
    n = sum(map(len, parts))
    if n > MAX_PACKET_SIZE:
        raise LocalProtocolError(f"packet of {n} bytes exceeds the DERP limit of {MAX_PACKET_SIZE}")


def encode_send_packet(dst: PublicKey, *data: bytes) -> bytes:
    """SendPacket; `data` parts are concatenated (lets callers prepend a framing byte without a copy)."""
    _check_packet(*data)
    return encode_frame(FrameType.SEND_PACKET, _key(dst), *data)


def encode_recv_packet_header(src: PublicKey, n: int) -> bytes:
    """The first bytes of a RecvPacket of `n` payload bytes, for a writer that sends the payload
    behind it as a separate piece (a relay forwarding large packets without joining them)."""
    if n > MAX_PACKET_SIZE:
        raise LocalProtocolError(f"packet of {n} bytes exceeds the DERP limit of {MAX_PACKET_SIZE}")
    return _HEADER.pack(_RECV_PACKET, KEY_LEN + n) + _key(src)


def encode_recv_packet(src: PublicKey, data: bytes) -> bytes:
    """RecvPacket (the relay's hot path: one join, no generic helpers)."""
    n = len(data)
    if n > MAX_PACKET_SIZE:
        raise LocalProtocolError(f"packet of {n} bytes exceeds the DERP limit of {MAX_PACKET_SIZE}")
    return b"".join((_HEADER.pack(_RECV_PACKET, KEY_LEN + n), _key(src), data))


def encode_forward_packet(src: PublicKey, dst: PublicKey, data: bytes) -> bytes:
    _check_packet(data)
    return encode_frame(FrameType.FORWARD_PACKET, _key(src), _key(dst), data)


def encode_keep_alive() -> bytes:
    return encode_frame(FrameType.KEEP_ALIVE)


def encode_note_preferred(preferred: bool) -> bytes:
    return encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def encode_peer_gone(key: PublicKey, reason: int = PeerGoneReason.DISCONNECTED) -> bytes:
    return encode_frame(FrameType.PEER_GONE, _key(key), bytes([reason]))


def encode_peer_present(key: PublicKey, ip: bytes = bytes(16), port: int = 0,
                        flags: int = PeerPresentFlags.IS_REGULAR) -> bytes:
    if len(ip) != 16:
        raise LocalProtocolError("PeerPresent IP must be 16 bytes")
    return encode_frame(FrameType.PEER_PRESENT, _key(key), ip, struct.pack(">HB", port, flags))


def encode_watch_conns() -> bytes:
    return encode_frame(FrameType.WATCH_CONNS)


def encode_close_peer(key: PublicKey) -> bytes:
    return encode_frame(FrameType.CLOSE_PEER, _key(key))


def encode_ping(data: bytes) -> bytes:
    if len(data) != PING_LEN:
        raise LocalProtocolError(f"ping payload must be {PING_LEN} bytes")
    return encode_frame(FrameType.PING, data)


def encode_pong(data: bytes) -> bytes:
    return encode_frame(FrameType.PONG, data[:PING_LEN])


def encode_health(problem: str) -> bytes:
    return encode_frame(FrameType.HEALTH, problem.encode())


def encode_restarting(reconnect_in: float, try_for: float) -> bytes:
    return encode_frame(FrameType.RESTARTING, struct.pack(">II", round(reconnect_in * 1000), round(try_for * 1000)))


def encode(frame: Frame) -> bytes:
    """The wire bytes of any frame event (the connections' `send()` uses this)."""
    match frame:
        case SendPacket(dst, data):
            return encode_send_packet(dst, data)
        case RecvPacket(src, data):
            return encode_recv_packet(src, data)
        case Ping(data):
            return encode_ping(data)
        case Pong(data):
            return encode_pong(data)
        case KeepAlive():
            return encode_keep_alive()
        case NotePreferred(preferred):
            return encode_note_preferred(preferred)
        case PeerGone(key, reason):
            return encode_peer_gone(key, reason)
        case PeerPresent(key, None, None, 0):
            return encode_frame(FrameType.PEER_PRESENT, _key(key))  # the old short form
        case PeerPresent(key, ip, port, flags):
            return encode_peer_present(key, bytes(16) if ip is None else ip, port or 0, flags)
        case ForwardPacket(src, dst, data):
            return encode_forward_packet(src, dst, data)
        case WatchConns():
            return encode_watch_conns()
        case ClosePeer(key):
            return encode_close_peer(key)
        case Health(problem):
            return encode_health(problem)
        case Restarting(reconnect_in, try_for):
            return encode_restarting(reconnect_in, try_for)
        case ServerKey(key):
            return encode_server_key(key)
        case ClientInfo(key, sealed):
            return encode_client_info(key, sealed)
        case ServerInfo(sealed):
            return encode_server_info(sealed)
    raise LocalProtocolError(f"cannot encode {type(frame).__name__}")


# ---------------------------------------------------------------- decoding

class Role(enum.Enum):
    """Which side's frames a decoder reads: a CLIENT decodes what a relay sends, and the reverse."""

    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class FrameLimits:
    """Largest frame (payload bytes) accepted per type, checked on the header before any
    payload is buffered; types absent from `per_type` use `default`. Frames longer than
    their limit are a protocol error, never an allocation."""

    per_type: Mapping[int, int]
    default: int = 1 << 20  # the Go client's receive-loop limit

    def limit(self, ftype: int) -> int:
        return self.per_type.get(ftype, self.default)


CLIENT_LIMITS = FrameLimits({
    FrameType.SERVER_KEY: 1 << 10,
    FrameType.SERVER_INFO: NONCE_LEN + MAX_INFO_LEN,
    FrameType.RECV_PACKET: KEY_LEN + MAX_PACKET_SIZE,
})
SERVER_LIMITS = FrameLimits({
    FrameType.CLIENT_INFO: 256 << 10,
    FrameType.SEND_PACKET: KEY_LEN + MAX_PACKET_SIZE,
    FrameType.FORWARD_PACKET: 2 * KEY_LEN + MAX_PACKET_SIZE,
    FrameType.PING: 1000,
})


def _min_len_error(ftype: int, length: int, minimum: int) -> RemoteProtocolError:
    name = FrameType(ftype).name
    return RemoteProtocolError(f"{name} frame of {length} bytes is shorter than {minimum}")


class FrameDecoder:
    """Incremental DERP frame parser: `feed()` bytes as they arrive, iterate `events()`.

    `role` says which side decodes (`Role.CLIENT` reads what a relay sends; the value
    strings "client"/"server" are coerced): frames a role never receives are reported as
    UnknownFrame and skipped, as both Go sides do. Malformed known frames raise
    RemoteProtocolError; the decoder is then dead.
    """

    def __init__(self, role: Role = Role.CLIENT, limits: FrameLimits | None = None) -> None:
        self.role = Role(role)
        self._known = _ROLE_TYPES[self.role]
        if limits is None:
            limits = CLIENT_LIMITS if self.role is Role.CLIENT else SERVER_LIMITS
        self.limits = limits
        self._limits = dict(limits.per_type)  # the hot path: one dict lookup per frame
        self._default_limit = limits.default
        # The packet frame this role receives, decoded inline (see next_event).
        server = self.role is Role.SERVER
        self._packet_type = int(FrameType.SEND_PACKET if server else FrameType.RECV_PACKET)
        self._packet_limit = self._limits.get(self._packet_type, self._default_limit)
        self._packet_cls: type[SendPacket] | type[RecvPacket] = SendPacket if server else RecvPacket
        self._set_key, self._set_data = (_DST, _SEND_DATA) if server else (_SRC, _RECV_DATA)
        self._buf = bytearray()
        self._src: bytearray | memoryview = self._buf  # what next_event reads: _buf, or the caller's view
        self._pos = 0  # frames before this offset of _src are decoded (dropped at the next feed)
        self._skip = 0  # bytes of an unknown frame still to discard
        self._error: RemoteProtocolError | None = None
        self._keys: dict[bytes, PublicKey] = {}  # recent packet keys: one PublicKey per peer, not per packet
        self.frames_skipped = 0
        self.frames_dropped = 0  # known frames too short to use, dropped as Go does

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_header(self) -> tuple[int, int] | None:
        """(type, length) of the next frame once its header is buffered, before its payload:
        a relay refuses a frame it does not want on the header (None: no header yet)."""
        if self._skip or len(self._buf) - self._pos < FRAME_HEADER_LEN:
            return None
        ftype, length = _HEADER.unpack_from(self._buf, self._pos)
        return ftype, length

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes (copied: the caller may reuse its buffer right away)."""
        if self._error is not None:
            raise self._error
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if data:
            if self._pos:
                del self._buf[:self._pos]  # one compaction per feed, not one per frame
                self._pos = 0
            self._buf += data

    def decode(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """feed(data), then every complete frame. When nothing is buffered, frames are decoded
        straight out of `data` and only an incomplete last frame is copied (a relay's reads
        are mostly whole frames). `data` need not outlive the call."""
        if self._error is not None:
            raise self._error
        if self._skip:  # rare: an unknown frame split across reads
            self.feed(data)
            return list(self.events())
        # Frames already complete in the buffer (pipelined behind a hello) come first; that
        # also judges the header of a frame begun there.
        view, out = memoryview(data), (list(self.events()) if self._pos < len(self._buf) else [])
        while self._pos < len(self._buf) and view:
            # Complete the frame begun in an earlier read with just the bytes it lacks.
            have = len(self._buf) - self._pos
            if have < FRAME_HEADER_LEN:
                need = FRAME_HEADER_LEN - have
            else:  # its header was judged (known type, within limits) by events() above
                need = FRAME_HEADER_LEN + _HEADER.unpack_from(self._buf, self._pos)[1] - have
            self.feed(view[:need])
            view = view[need:]
            out.extend(self.events())
        if self._skip:  # that frame was an unknown one, to skip
            self.feed(view)
            out.extend(self.events())
            return out
        if not view:
            return out
        self._buf.clear()
        self._src, self._pos = view, 0
        try:
            while (ev := self.next_event()) is not None:
                out.append(ev)
        finally:
            tail = self._src[self._pos:]
            self._src, self._pos = self._buf, 0
            if not self._skip:
                self._buf += tail
        return out

    def events(self) -> Iterator[Frame]:
        """Yield every complete frame now buffered."""
        while True:
            ev = self.next_event()
            if ev is None:
                return
            yield ev

    def next_event(self) -> Frame | None:
        """The next complete frame, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        buf = self._src
        while True:
            pos = self._pos
            have = len(buf) - pos
            if have < FRAME_HEADER_LEN:
                return None
            ftype, length = _HEADER.unpack_from(buf, pos)
            if ftype == self._packet_type and KEY_LEN <= length <= self._packet_limit:
                # The hot path (a relay forwards these by the thousand): no parser call, one
                # PublicKey per peer rather than one per packet, the event built through its slots.
                start = pos + FRAME_HEADER_LEN
                end = start + length
                if len(buf) < end:
                    return None
                self._pos = end
                raw = bytes(buf[start:start + KEY_LEN])
                key = self._keys.get(raw)
                if key is None:
                    key = self._intern(raw)
                packet = _new_object(self._packet_cls)
                self._set_key(packet, key)
                # The payload's one copy: out of the caller's memoryview (decode()), or through
                # a view of our own buffer (a bytearray slice would be a second copy).
                piece = buf[start + KEY_LEN:end] if type(buf) is memoryview else memoryview(buf)[start + KEY_LEN:end]
                self._set_data(packet, piece.tobytes())
                return packet
            limit = self._limits.get(ftype, self._default_limit)
            if length > limit:
                name = _TYPE_NAMES.get(ftype, f"type 0x{ftype:02x}")
                self._error = RemoteProtocolError(f"{name} frame length {length} exceeds limit {limit}")
                raise self._error
            if ftype not in self._known:
                # Skip without buffering the payload.
                have -= FRAME_HEADER_LEN
                self.frames_skipped += 1
                if have >= length:
                    self._pos = pos + FRAME_HEADER_LEN + length
                else:
                    self._skip = length - have
                    self._pos = len(buf)  # all consumed (the next feed compacts it away)
                return UnknownFrame(ftype, length)
            start = pos + FRAME_HEADER_LEN
            end = start + length
            if len(buf) < end:
                return None
            self._pos = end
            view = memoryview(buf)  # payloads are copied once, straight out of the buffer
            payload = view[start:end].tobytes()
            del view
            try:
                ev = _PARSERS[ftype](payload)
            except RemoteProtocolError as e:
                self._error = e
                raise
            if ev is None:
                self.frames_dropped += 1
                continue
            return ev

    def _intern(self, raw: bytes) -> PublicKey:
        if len(self._keys) >= _KEY_CACHE:
            self._keys.clear()  # bounded: a peer sending to ever new keys gets no reuse, nothing more
        key = self._keys[raw] = PublicKey(raw)
        return key


_KEY_CACHE = 256
_DST = SendPacket.__dict__["dst"].__set__
_SRC = RecvPacket.__dict__["src"].__set__
_SEND_DATA = SendPacket.__dict__["data"].__set__
_RECV_DATA = RecvPacket.__dict__["data"].__set__
_new_object = object.__new__  # with the slot setters above: half the cost of the frozen dataclass's __init__


def _p_server_key(p: bytes) -> Frame:
    if len(p) < len(MAGIC) + KEY_LEN:
        raise _min_len_error(FrameType.SERVER_KEY, len(p), len(MAGIC) + KEY_LEN)
    if p[: len(MAGIC)] != MAGIC:
        raise RemoteProtocolError("ServerKey frame without the DERP magic")
    return ServerKey(PublicKey(p[8:40]))


def _p_client_info(p: bytes) -> Frame:
    if len(p) < KEY_LEN + NONCE_LEN:
        raise _min_len_error(FrameType.CLIENT_INFO, len(p), KEY_LEN + NONCE_LEN)
    return ClientInfo(PublicKey(p[:KEY_LEN]), p[KEY_LEN:])


def _p_server_info(p: bytes) -> Frame:
    if len(p) < NONCE_LEN:
        raise _min_len_error(FrameType.SERVER_INFO, len(p), NONCE_LEN)
    return ServerInfo(p)


def _p_send_packet(p: bytes) -> Frame:
    if len(p) < KEY_LEN:
        raise _min_len_error(FrameType.SEND_PACKET, len(p), KEY_LEN)
    return SendPacket(PublicKey(p[:KEY_LEN]), p[KEY_LEN:])


def _p_recv_packet(p: bytes) -> Frame | None:
    if len(p) < KEY_LEN:
        return None  # the Go client drops these
    return RecvPacket(PublicKey(p[:KEY_LEN]), p[KEY_LEN:])


def _p_keep_alive(p: bytes) -> Frame:
    return KeepAlive()


def _p_note_preferred(p: bytes) -> Frame:
    if len(p) != 1:
        raise RemoteProtocolError(f"NotePreferred frame of {len(p)} bytes, expected 1")
    return NotePreferred(p[0] != 0)


def _p_peer_gone(p: bytes) -> Frame | None:
    if len(p) < KEY_LEN:
        return None
    reason = p[KEY_LEN] if len(p) > KEY_LEN else PeerGoneReason.DISCONNECTED
    return PeerGone(PublicKey(p[:KEY_LEN]), reason)


def _p_peer_present(p: bytes) -> Frame | None:
    if len(p) < KEY_LEN:
        return None
    ip: bytes | None = None
    port: int | None = None
    flags = 0
    if len(p) >= KEY_LEN + 18:
        ip = p[KEY_LEN:KEY_LEN + 16]
        port = int.from_bytes(p[KEY_LEN + 16:KEY_LEN + 18], "big")
    if len(p) >= KEY_LEN + 19:
        flags = p[KEY_LEN + 18]
    return PeerPresent(PublicKey(p[:KEY_LEN]), ip, port, flags)


def _p_forward_packet(p: bytes) -> Frame:
    if len(p) < 2 * KEY_LEN:
        raise _min_len_error(FrameType.FORWARD_PACKET, len(p), 2 * KEY_LEN)
    return ForwardPacket(PublicKey(p[:KEY_LEN]), PublicKey(p[KEY_LEN:2 * KEY_LEN]), p[2 * KEY_LEN:])


def _p_watch_conns(p: bytes) -> Frame:
    if p:
        raise RemoteProtocolError("WatchConns frame with a payload")
    return WatchConns()


def _p_close_peer(p: bytes) -> Frame:
    if len(p) != KEY_LEN:
        raise RemoteProtocolError(f"ClosePeer frame of {len(p)} bytes, expected {KEY_LEN}")
    return ClosePeer(PublicKey(p))


def _p_ping(p: bytes) -> Frame:
    if len(p) < PING_LEN:
        raise _min_len_error(FrameType.PING, len(p), PING_LEN)
    return Ping(p[:PING_LEN])


def _p_pong(p: bytes) -> Frame | None:
    if len(p) < PING_LEN:
        return None
    return Pong(p[:PING_LEN])


def _p_health(p: bytes) -> Frame:
    return Health(p.decode("utf-8", "replace"))


def _p_restarting(p: bytes) -> Frame | None:
    if len(p) < 8:
        return None
    a, b = struct.unpack_from(">II", p)
    return Restarting(a / 1000.0, b / 1000.0)


_PARSERS: dict[int, Callable[[bytes], Frame | None]] = {
    FrameType.SERVER_KEY: _p_server_key,
    FrameType.CLIENT_INFO: _p_client_info,
    FrameType.SERVER_INFO: _p_server_info,
    FrameType.SEND_PACKET: _p_send_packet,
    FrameType.RECV_PACKET: _p_recv_packet,
    FrameType.KEEP_ALIVE: _p_keep_alive,
    FrameType.NOTE_PREFERRED: _p_note_preferred,
    FrameType.PEER_GONE: _p_peer_gone,
    FrameType.PEER_PRESENT: _p_peer_present,
    FrameType.FORWARD_PACKET: _p_forward_packet,
    FrameType.WATCH_CONNS: _p_watch_conns,
    FrameType.CLOSE_PEER: _p_close_peer,
    FrameType.PING: _p_ping,
    FrameType.PONG: _p_pong,
    FrameType.HEALTH: _p_health,
    FrameType.RESTARTING: _p_restarting,
}

# What each role decodes; everything else is skipped like an unknown type.
_ROLE_TYPES: dict[Role, frozenset[int]] = {
    Role.CLIENT: frozenset({
        FrameType.SERVER_KEY, FrameType.SERVER_INFO, FrameType.RECV_PACKET, FrameType.KEEP_ALIVE,
        FrameType.PEER_GONE, FrameType.PEER_PRESENT, FrameType.PING, FrameType.PONG,
        FrameType.HEALTH, FrameType.RESTARTING,
    }),
    Role.SERVER: frozenset({
        FrameType.CLIENT_INFO, FrameType.SEND_PACKET, FrameType.NOTE_PREFERRED,
        FrameType.FORWARD_PACKET, FrameType.WATCH_CONNS, FrameType.CLOSE_PEER,
        FrameType.PING, FrameType.PONG,
    }),
}
