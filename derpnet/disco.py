"""Disco messages: the byte layout of Tailscale's path-discovery packets and their NaCl boxes.

Protocol layer, sans-IO (no sockets, no clocks), like `frames.py`. Model: Tailscale's
`disco/disco.go`. A disco packet travels over UDP or inside a DERP packet:

    magic "TS💬" (6) ‖ sender public key (32) ‖ nonce (24) ‖ box(type (1) ‖ version (1) ‖ payload)

The box is NaCl's crypto_box (curve25519-xsalsa20-poly1305) between the two **node keys**
(Tailscale uses separate disco keys; derpnet peers are addressed by node keys only, so
these packets are not meant for Tailscale's magicsock). Payloads, version 0:

| type | message | payload |
|---|---|---|
| 0x01 | `Ping` | tx id (12) ‖ sender's node key (32) ‖ padding (zeros: path-MTU probes) |
| 0x02 | `Pong` | tx id (12) ‖ the ping's observed source: IP (16, IPv4-mapped) ‖ port (2) |
| 0x03 | `CallMeMaybe` | N × (IP (16) ‖ port (2)), N ≥ 0 |

Decoding is as liberal as disco.go: the version byte of pings and pongs is ignored,
bytes past a ping's key count as padding, bytes past a pong are ignored, and a
CallMeMaybe whose version is not 0 or whose length is not a multiple of 18 carries no
endpoints (not an error). Differences: a ping without a node key (Tailscale ≤ 1.16) is
refused, and `DiscoBox.open` refuses a ping whose node key is not the box's sender
(with node-key boxes the two are always equal). Types 0x04-0x09 (Tailscale's UDP relay
messages) are not supported and decode as errors.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import nacl.exceptions
import nacl.public

from .keys import KEY_LEN, PrivateKey, PublicKey
from .udpaddr import Addr, normalize, pack18, unpack18

__all__ = [
    "MAGIC", "HEADER_LEN", "NONCE_LEN", "TX_ID_LEN", "BOX_OVERHEAD", "PING_MIN_SIZE", "MAX_PACKET_SIZE",
    "TYPE_PING", "TYPE_PONG", "TYPE_CALL_ME_MAYBE",
    "DiscoError", "Ping", "Pong", "CallMeMaybe", "Message",
    "looks_like_disco", "packet_sender", "new_tx_id", "encode_message", "decode_message",
    "ping_padding_for", "DiscoBox",
]

MAGIC = "TS💬".encode()  # 54 53 f0 9f 92 ac
NONCE_LEN = 24
HEADER_LEN = len(MAGIC) + KEY_LEN + NONCE_LEN  # 62
TX_ID_LEN = 12
BOX_OVERHEAD = 16  # poly1305 tag
MAX_PACKET_SIZE = 0xFFFF  # no datagram is larger; bounds a ping's padding

TYPE_PING = 0x01
TYPE_PONG = 0x02
TYPE_CALL_ME_MAYBE = 0x03
_VERSION = 0
_MSG_HEADER_LEN = 2  # type, version
_EP_LEN = 18         # 16-byte IP + 2-byte port
_PING_LEN = TX_ID_LEN + KEY_LEN
_PONG_LEN = TX_ID_LEN + _EP_LEN
PING_MIN_SIZE = HEADER_LEN + BOX_OVERHEAD + _MSG_HEADER_LEN + _PING_LEN  # 124: an unpadded sealed ping
_MAX_PADDING = MAX_PACKET_SIZE - PING_MIN_SIZE

_UNSUPPORTED = {
    0x04: "bind-udp-relay-endpoint", 0x05: "bind-udp-relay-endpoint-challenge",
    0x06: "bind-udp-relay-endpoint-answer", 0x07: "call-me-maybe-via",
    0x08: "allocate-udp-relay-endpoint-request", 0x09: "allocate-udp-relay-endpoint-response",
}


class DiscoError(ValueError):
    """A disco packet or message that cannot be used: not disco, short, unopenable, malformed."""


def _check_tx_id(tx_id: object) -> None:
    if not isinstance(tx_id, bytes) or len(tx_id) != TX_ID_LEN:
        raise ValueError(f"tx_id must be {TX_ID_LEN} bytes")


@dataclass(frozen=True)
class Ping:
    """A probe of one path ("are you there?"); `padding` zero bytes make it a path-MTU probe."""

    tx_id: bytes
    node_key: PublicKey
    padding: int = 0

    def __post_init__(self) -> None:
        _check_tx_id(self.tx_id)
        if not isinstance(self.node_key, PublicKey):
            raise ValueError("node_key must be a PublicKey")
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or \
                not 0 <= self.padding <= _MAX_PADDING:
            raise ValueError(f"padding must be an int in 0..{_MAX_PADDING}")


@dataclass(frozen=True)
class Pong:
    """The answer to a `Ping` (same tx id), with the address the ping was seen from."""

    tx_id: bytes
    src: Addr

    def __post_init__(self) -> None:
        _check_tx_id(self.tx_id)
        object.__setattr__(self, "src", normalize(self.src))


@dataclass(frozen=True)
class CallMeMaybe:
    """A request to ping us on these endpoints (sent over the relay, after pinging them ourselves)."""

    endpoints: tuple[Addr, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(normalize(ep) for ep in self.endpoints))


Message = Ping | Pong | CallMeMaybe


def looks_like_disco(data: bytes) -> bool:
    """True when `data` starts like a disco packet (cheap: length and magic, no crypto)."""
    return len(data) >= HEADER_LEN and data.startswith(MAGIC)


def packet_sender(packet: bytes) -> PublicKey | None:
    """The claimed (not yet authenticated) sender key of a disco packet, or None when it is
    not one: lets the caller drop packets from unknown peers before spending any crypto."""
    if not looks_like_disco(packet):
        return None
    return PublicKey(bytes(packet[len(MAGIC):len(MAGIC) + KEY_LEN]))


def new_tx_id() -> bytes:
    """A random transaction id for a ping."""
    return os.urandom(TX_ID_LEN)


def encode_message(msg: Message) -> bytes:
    """The plaintext of a message: type ‖ version (0) ‖ payload."""
    if isinstance(msg, Ping):
        return bytes((TYPE_PING, _VERSION)) + msg.tx_id + msg.node_key.raw + bytes(msg.padding)
    if isinstance(msg, Pong):
        return bytes((TYPE_PONG, _VERSION)) + msg.tx_id + pack18(msg.src)
    if isinstance(msg, CallMeMaybe):
        return bytes((TYPE_CALL_ME_MAYBE, _VERSION)) + b"".join(pack18(ep) for ep in msg.endpoints)
    raise TypeError(f"not a disco message: {type(msg).__name__}")


def decode_message(plain: bytes) -> Message:
    """The message in a box's plaintext. DiscoError when short or of an unknown type."""
    if len(plain) < _MSG_HEADER_LEN:
        raise DiscoError("short disco message")
    t, ver, p = plain[0], plain[1], bytes(plain[_MSG_HEADER_LEN:])
    if t == TYPE_PING:
        if len(p) < TX_ID_LEN:
            raise DiscoError("short disco ping")
        if len(p) < _PING_LEN:
            raise DiscoError("disco ping without a node key")
        return Ping(p[:TX_ID_LEN], PublicKey(p[TX_ID_LEN:_PING_LEN]), len(p) - _PING_LEN)
    if t == TYPE_PONG:
        if len(p) < _PONG_LEN:
            raise DiscoError("short disco pong")
        return Pong(p[:TX_ID_LEN], unpack18(p[TX_ID_LEN:_PONG_LEN]))
    if t == TYPE_CALL_ME_MAYBE:
        if ver != _VERSION or len(p) % _EP_LEN:
            return CallMeMaybe(())
        return CallMeMaybe(tuple(unpack18(p[i:i + _EP_LEN]) for i in range(0, len(p), _EP_LEN)))
    name = _UNSUPPORTED.get(t)
    raise DiscoError(f"unsupported disco message type 0x{t:02x} ({name})" if name
                     else f"unknown disco message type 0x{t:02x}")


def ping_padding_for(total_size: int) -> int:
    """The `Ping.padding` that makes the sealed packet exactly `total_size` bytes
    (`PING_MIN_SIZE`..`MAX_PACKET_SIZE`; ValueError outside)."""
    if not PING_MIN_SIZE <= total_size <= MAX_PACKET_SIZE:
        raise ValueError(f"a sealed disco ping is {PING_MIN_SIZE}..{MAX_PACKET_SIZE} bytes, not {total_size}")
    return total_size - PING_MIN_SIZE


_BOX_ERRORS = (nacl.exceptions.CryptoError, ValueError, TypeError, RuntimeError)


class DiscoBox:
    """Seals/opens disco packets with our node key; caches the NaCl Box per peer (bounded, LRU).

    Thread-safe. `open` caches a peer's box only once a packet from it opened, so packets
    under made-up sender keys cost one key agreement each but never evict real peers.
    """

    def __init__(self, private_key: PrivateKey, *, cache_size: int = 4096) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._private = private_key.nacl()
        self._prefix = MAGIC + private_key.public_key.raw
        self.public_key = private_key.public_key
        self._cache_size = cache_size
        self._boxes: OrderedDict[bytes, nacl.public.Box] = OrderedDict()
        self._lock = threading.Lock()

    def _cached(self, peer: bytes) -> nacl.public.Box | None:
        with self._lock:
            box = self._boxes.get(peer)
            if box is not None:
                self._boxes.move_to_end(peer)
            return box

    def _new_box(self, peer: bytes) -> nacl.public.Box:
        try:
            return nacl.public.Box(self._private, nacl.public.PublicKey(peer))
        except _BOX_ERRORS:  # e.g. a low-order point: no shared key
            raise DiscoError("unusable peer key") from None

    def _remember(self, peer: bytes, box: nacl.public.Box) -> nacl.public.Box:
        with self._lock:
            self._boxes[peer] = box
            while len(self._boxes) > self._cache_size:
                self._boxes.popitem(last=False)
        return box

    def seal(self, peer: PublicKey, msg: Message) -> bytes:
        """The whole packet for `peer`: magic, our public key, a random nonce, the box."""
        plain = encode_message(msg)
        box = self._cached(peer.raw) or self._remember(peer.raw, self._new_box(peer.raw))
        nonce = os.urandom(NONCE_LEN)
        return self._prefix + nonce + box.encrypt(plain, nonce).ciphertext

    def open(self, packet: bytes) -> tuple[PublicKey, Message]:
        """(authenticated sender, message). DiscoError, and only DiscoError, for anything unusable."""
        packet = bytes(packet)
        if packet[:len(MAGIC)] != MAGIC:
            raise DiscoError("not a disco packet")
        if len(packet) < HEADER_LEN + BOX_OVERHEAD:
            raise DiscoError("short disco packet")
        sender = packet[len(MAGIC):len(MAGIC) + KEY_LEN]
        box = self._cached(sender)
        fresh = box is None
        if box is None:
            box = self._new_box(sender)
        try:
            plain = box.decrypt(packet[HEADER_LEN:], packet[HEADER_LEN - NONCE_LEN:HEADER_LEN])
        except _BOX_ERRORS:
            raise DiscoError("disco box did not open") from None
        if fresh:
            self._remember(sender, box)
        msg = decode_message(plain)
        key = PublicKey(sender)
        if isinstance(msg, Ping) and msg.node_key != key:
            raise DiscoError("disco ping's node key is not its sender's")
        return key, msg
