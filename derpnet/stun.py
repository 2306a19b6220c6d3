"""STUN Binding (RFC 5389): the request a node sends to learn its public address, and the answer.

Protocol layer, sans-IO (no sockets, no clocks), like `frames.py`. Model: Tailscale's
`net/stun/stun.go`, the smallest correct STUN codec:

- `binding_request` is Tailscale's request byte for byte: header, SOFTWARE "tailnode",
  FINGERPRINT.
- `parse_binding_request` (the relay's side) accepts any Binding request, not only
  Tailscale's; a FINGERPRINT, when present, must be the last attribute and must match.
  Other attributes (MESSAGE-INTEGRITY, USERNAME, ...) are ignored.
- `binding_response` is derper's answer: a success response with one XOR-MAPPED-ADDRESS.
- `parse_response` takes XOR-MAPPED-ADDRESS (also under the out-of-range type 0x8020 some
  servers send), else MAPPED-ADDRESS; bytes past the header's length are ignored, and a
  FINGERPRINT is not checked (the caller matches the 96-bit random transaction id, a far
  stronger filter), as in stun.go.

Header: type (2) ‖ length of the attributes (2) ‖ magic cookie 0x2112A442 (4) ‖ tx id (12);
attributes: type (2) ‖ length (2) ‖ value, padded to 4 bytes. All big-endian.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

from .udpaddr import Addr, ip_text, normalize, parse_ip

__all__ = ["StunError", "HEADER_LEN", "TX_ID_LEN", "MAGIC_COOKIE", "SOFTWARE", "new_tx_id",
           "binding_request", "is_stun", "parse_binding_request", "binding_response", "parse_response"]

HEADER_LEN = 20
TX_ID_LEN = 12
MAGIC_COOKIE = b"\x21\x12\xa4\x42"
SOFTWARE = b"tailnode"  # 8 bytes: no padding

_BINDING_REQUEST = 0x0001
_BINDING_SUCCESS = 0x0101
_ATTR_MAPPED_ADDRESS = 0x0001
_ATTR_XOR_MAPPED_ADDRESS = 0x0020
_ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
_ATTR_SOFTWARE = 0x8022
_ATTR_FINGERPRINT = 0x8028
_FINGERPRINT_XOR = 0x5354554E
_FINGERPRINT_LEN = 8  # attribute header + CRC-32
_FAMILY_LEN = {0x01: 4, 0x02: 16}

_HEADER = struct.Struct(">HH4s12s")
_ATTR = struct.Struct(">HH")


class StunError(ValueError):
    """Not a STUN message, or not the one expected (malformed, wrong type, bad fingerprint)."""


def new_tx_id() -> bytes:
    """A random transaction id."""
    return os.urandom(TX_ID_LEN)


def _fingerprint(data: bytes) -> bytes:
    return struct.pack(">I", zlib.crc32(data) ^ _FINGERPRINT_XOR)


def _check_tx_id(tx_id: bytes) -> None:
    if not isinstance(tx_id, bytes) or len(tx_id) != TX_ID_LEN:
        raise ValueError(f"STUN transaction id must be {TX_ID_LEN} bytes")


def binding_request(tx_id: bytes) -> bytes:
    """A Binding request, as Tailscale's `stun.Request`: SOFTWARE "tailnode" + FINGERPRINT (40 bytes)."""
    _check_tx_id(tx_id)
    software = _ATTR.pack(_ATTR_SOFTWARE, len(SOFTWARE)) + SOFTWARE
    head = _HEADER.pack(_BINDING_REQUEST, len(software) + _FINGERPRINT_LEN, MAGIC_COOKIE, tx_id) + software
    return head + _ATTR.pack(_ATTR_FINGERPRINT, 4) + _fingerprint(head)


def is_stun(data: bytes) -> bool:
    """Cheap check: at least a header, the top two bits zero, the magic cookie at [4:8]."""
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and data[4:8] == MAGIC_COOKIE


def _message(data: bytes, want_type: int, what: str) -> tuple[bytes, bytes]:
    """(tx id, attribute bytes up to the header's length) of a STUN message of `want_type`."""
    if not is_stun(data):
        raise StunError("not a STUN message")
    msg_type, length, _, tx_id = _HEADER.unpack_from(data)
    if msg_type != want_type:
        raise StunError(f"STUN message type 0x{msg_type:04x} is not a {what}")
    if HEADER_LEN + length > len(data):
        raise StunError("STUN message shorter than its header says")
    return bytes(tx_id), bytes(data[HEADER_LEN:HEADER_LEN + length])


def _attributes(body: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(offset in body, type, value) of each attribute; StunError when one overruns."""
    i = 0
    while i < len(body):
        if len(body) - i < _ATTR.size:
            raise StunError("malformed STUN attributes")
        t, n = _ATTR.unpack_from(body, i)
        end = i + _ATTR.size + ((n + 3) & ~3)
        if end > len(body):
            raise StunError("malformed STUN attributes")
        yield i, t, body[i + _ATTR.size:i + _ATTR.size + n]
        i = end


def parse_binding_request(data: bytes) -> bytes:
    """The transaction id of a Binding request; StunError for anything else (a FINGERPRINT
    that is not last or does not match included)."""
    tx_id, body = _message(data, _BINDING_REQUEST, "Binding request")
    for off, t, value in _attributes(body):
        if t == _ATTR_FINGERPRINT:
            if off + _FINGERPRINT_LEN != len(body) or len(value) != 4:
                raise StunError("STUN FINGERPRINT is not the last attribute")
            if value != _fingerprint(bytes(data[:HEADER_LEN + off])):
                raise StunError("STUN FINGERPRINT does not match")
    return tx_id


def binding_response(tx_id: bytes, addr: Addr) -> bytes:
    """A Binding success response carrying `addr` in an XOR-MAPPED-ADDRESS (IPv4 or IPv6;
    IPv4-mapped IPv6 is answered as IPv4, as derper does)."""
    _check_tx_id(tx_id)
    host, port = normalize(addr)
    raw = parse_ip(host).packed
    family = 0x01 if len(raw) == 4 else 0x02
    xaddr = bytes(a ^ b for a, b in zip(raw, MAGIC_COOKIE + tx_id, strict=False))  # IPv4 uses the first 4
    attr = _ATTR.pack(_ATTR_XOR_MAPPED_ADDRESS, 4 + len(raw)) + struct.pack(">BBH", 0, family, port ^ 0x2112) + xaddr
    return _HEADER.pack(_BINDING_SUCCESS, len(attr), MAGIC_COOKIE, tx_id) + attr


def _address(value: bytes, xor_with: bytes | None) -> Addr:
    if len(value) < 4:
        raise StunError("malformed STUN address attribute")
    n = _FAMILY_LEN.get(value[1])
    if n is None or len(value) < 4 + n:
        raise StunError("malformed STUN address attribute")
    port = int.from_bytes(value[2:4], "big")
    raw = value[4:4 + n]
    if xor_with is not None:
        port ^= 0x2112
        raw = bytes(a ^ b for a, b in zip(raw, xor_with, strict=False))  # IPv4 uses the first 4
    return ip_text(raw), port


def parse_response(data: bytes) -> tuple[bytes, Addr]:
    """(transaction id, mapped address) of a Binding success response; StunError otherwise."""
    tx_id, body = _message(data, _BINDING_SUCCESS, "Binding success response")
    mapped: Addr | None = None
    fallback: Addr | None = None
    for _, t, value in _attributes(body):
        if t in (_ATTR_XOR_MAPPED_ADDRESS, _ATTR_XOR_MAPPED_ADDRESS_ALT):
            mapped = _address(value, MAGIC_COOKIE + tx_id)
        elif t == _ATTR_MAPPED_ADDRESS:
            fallback = _address(value, None)
    addr = mapped or fallback
    if addr is None:
        raise StunError("STUN response without a mapped address")
    return tx_id, addr
