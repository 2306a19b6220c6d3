"""UDP endpoint addresses as `(host text, port)` tuples: checking, normalising, 16-byte wire forms.

Protocol layer helpers (pure, no sockets), shared by the disco and STUN codecs and the path
layer. One normal form everywhere: the host is `ipaddress`'s text of the address, an
IPv4-mapped IPv6 address (`::ffff:1.2.3.4`, what a dual-stack socket reports) becomes
plain IPv4 text, as Go's `netip.Addr.Unmap` does. Wire forms never carry an IPv6 zone.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import Any

__all__ = ["Addr", "IPAddress", "parse_ip", "normalize", "pack18", "unpack18", "ip_text", "host_port"]

Addr = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_PORT = struct.Struct(">H")


def parse_ip(host: str, *, keep_zone: bool = False) -> IPAddress:
    """An IP literal (hostnames are refused) → its address, IPv4-mapped IPv6 unmapped.
    ValueError when `host` is not an IP literal."""
    if not isinstance(host, str):
        raise ValueError(f"IP address must be text, not {type(host).__name__}")
    ip = _unmap(ipaddress.ip_address(host))
    if not keep_zone and ip.version == 6 and ip.scope_id is not None:
        return ipaddress.IPv6Address(ip.packed)
    return ip


def _unmap(ip: IPAddress) -> IPAddress:
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad UDP port {port!r}")
    return port


def normalize(addr: Sequence[Any], *, keep_zone: bool = False) -> Addr:
    """`(host, port)` or a socket's `(host, port, flowinfo, scope_id)` → `(ip text, port)` in the
    normal form. ValueError for anything else."""
    if not isinstance(addr, (tuple, list)) or len(addr) not in (2, 4):
        raise ValueError(f"expected (host, port), got {addr!r}")
    return str(parse_ip(addr[0], keep_zone=keep_zone)), _port(addr[1])


def ip_text(raw: bytes) -> str:
    """4 or 16 address bytes → the normal text form (IPv4-mapped unmapped)."""
    return str(_unmap(ipaddress.ip_address(bytes(raw))))


def host_port(host: str, port: int) -> str:
    """`HOST:PORT` text, IPv6 hosts in brackets (`[::1]:3478`), for logs and messages."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def pack18(addr: Addr) -> bytes:
    """The 18-byte wire form of an endpoint: 16-byte IP (IPv4 as IPv4-mapped IPv6) ‖ port (big-endian)."""
    ip = parse_ip(addr[0])
    raw = ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed
    return raw + _PORT.pack(_port(addr[1]))


def unpack18(raw: bytes) -> Addr:
    """The inverse of `pack18` (exactly 18 bytes)."""
    if len(raw) != 18:
        raise ValueError(f"endpoint: expected 18 bytes, got {len(raw)}")
    return ip_text(raw[:16]), _PORT.unpack_from(raw, 16)[0]
