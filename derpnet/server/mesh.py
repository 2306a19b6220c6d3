"""The relay's side of a derper mesh: the mesh key, who may watch, and where remote keys live.

Layer: relay server, on the event loop, no sockets of its own (derper's derpserver mesh
parts, shared/derp-protocol.md §4.8). A client whose ClientInfo carries our mesh key is a
trusted mesh peer: it may send WatchConns (then it is told PeerPresent for every client
connected here and PeerPresent/PeerGone as they come and go), ForwardPacket (delivered
to our local client, never forwarded again) and ClosePeer. `MeshRoutes` keeps, for keys
connected to other members, which of our outgoing mesh links (meshclient.py) reaches
them: several links may know one key, the first one heard stays preferred, as derper's
multiForwarder. A client presenting a wrong mesh key is refused at its hello and logged
once per key (`MeshKeyCheck`).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from .. import frames as F
from ..keys import PublicKey

if TYPE_CHECKING:  # pragma: no cover
    from .conn import ClientProtocol
    from .relay import Endpoint, Relay

__all__ = ["load_mesh_key", "parse_mesh_key", "MeshTarget", "parse_mesh_with", "Forwarder", "MeshRoutes",
           "MeshHub", "MeshKeyCheck", "MESH_WRITE_TIMEOUT"]

log = logging.getLogger(__name__)

#: derper's write timeout for mesh peers (privilegedWriteTimeout).
MESH_WRITE_TIMEOUT = 30.0
_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_mesh_key(text: str) -> bytes:
    """The 32-byte mesh key from its text: 64 lowercase hex characters, whitespace trimmed (derper's rule)."""
    s = text.strip()
    if not _HEX64.fullmatch(s):
        raise ValueError("a mesh key must be 64 lowercase hexadecimal characters")
    return bytes.fromhex(s)


def load_mesh_key(path: str) -> bytes:
    """Read `--mesh-psk-file`; ValueError (without the file's content) if it is not a mesh key."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(4096)
    try:
        return parse_mesh_key(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


@dataclass(frozen=True)
class MeshTarget:
    """One `--mesh-with` member: the name in its URL, where to dial it, and the URL."""

    host: str       # HOST or HOST:PORT, as in derper's https://HOST/derp
    dial_host: str  # the `HOST/DIALHOST` form's second part, else `host` without its port
    scheme: str     # https (derper's), http (TS_DEBUG_USE_DERP_HTTP=1 or an http:// entry)
    default_port: int = 0  # without a port in `host`: 0 = the scheme's (derper's debug HTTP keeps 443)

    @property
    def port(self) -> int:
        _, port = _split_host_port(self.host)
        if port is not None:
            return port
        return self.default_port or (443 if self.scheme == "https" else 80)

    @property
    def name(self) -> str:
        """The host without a port (TLS server name)."""
        return _split_host_port(self.host)[0]

    @property
    def url(self) -> str:
        explicit = _split_host_port(self.host)[1] is not None
        host = self.host if explicit or not self.default_port else f"{self.host}:{self.default_port}"
        return f"{self.scheme}://{host}/derp"


def _split_host_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, None


def parse_mesh_with(text: str, *, use_http: bool = False) -> list[MeshTarget]:
    """derper's `--mesh-with host1,host2[/dialhost]` (plus `http://host:port` entries). `use_http`:
    derper's TS_DEBUG_USE_DERP_HTTP, plain HTTP to every member. ValueError for a bad entry."""
    out = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        scheme, default_port = ("http", 443) if use_http else ("https", 0)  # derper: still port 443
        for prefix in ("http://", "https://"):
            if entry.lower().startswith(prefix):
                scheme, default_port = prefix[:-3], 0
                entry = entry[len(prefix):].rstrip("/").removesuffix("/derp")
        parts = entry.split("/")
        if len(parts) > 2 or not parts[0] or (len(parts) == 2 and not parts[1]):
            raise ValueError(f"bad --mesh-with entry {raw.strip()!r}: expected HOST[:PORT][/DIALHOST]")
        try:
            name, port = _split_host_port(parts[0])
        except ValueError:
            raise ValueError(f"bad port in --mesh-with entry {raw.strip()!r}") from None
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port out of range in --mesh-with entry {raw.strip()!r}")
        out.append(MeshTarget(parts[0], parts[1] if len(parts) == 2 else name, scheme, default_port))
    if not out:
        raise ValueError("--mesh-with names no hosts")
    return out


class Forwarder(Protocol):
    """An outgoing mesh link that can carry packets for keys connected to its member."""

    def forward_packet(self, src: PublicKey, dst: PublicKey, data: bytes) -> None:
        """Send ForwardPacket(src, dst, data); never blocks (drops when it cannot)."""


class MeshRoutes:
    """Keys connected to other mesh members and the links that reach them (no I/O)."""

    def __init__(self) -> None:
        self._routes: dict[PublicKey, list[Forwarder]] = {}

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, key: object) -> bool:
        return key in self._routes

    def add(self, key: PublicKey, fwd: Forwarder) -> None:
        """`fwd`'s member has `key` (PeerPresent); the first link heard stays preferred."""
        links = self._routes.setdefault(key, [])
        if fwd not in links:
            links.append(fwd)

    def remove(self, key: PublicKey, fwd: Forwarder) -> bool:
        """`fwd`'s member lost `key` (PeerGone, or the link broke). True if no link knows it any more."""
        links = self._routes.get(key)
        if links is None or fwd not in links:
            return False
        links.remove(fwd)
        if links:
            return False
        del self._routes[key]
        return True

    def lookup(self, key: PublicKey) -> Forwarder | None:
        """The preferred link for `key`, None if no member has it."""
        links = self._routes.get(key)
        return links[0] if links else None


class MeshKeyCheck:
    """Who is a mesh peer: a constant-time compare, and one log line per refused key."""

    MAX_REMEMBERED = 4096

    def __init__(self, mesh_key: bytes | None) -> None:
        self.mesh_key = mesh_key
        self.refused = 0
        self._logged: OrderedDict[PublicKey, None] = OrderedDict()

    def judge(self, key: PublicKey, info: dict[str, object], peer: str) -> bool | None:
        """True: a mesh peer; False: refuse (a mesh key that is not ours); None: a regular client."""
        presented = info.get("meshkey")
        if not isinstance(presented, str) or not presented.strip():
            return None
        if self.mesh_key is None:
            return None  # derper without a mesh key: a regular client
        try:
            theirs = bytes.fromhex(presented.strip())
        except ValueError:
            theirs = b""
        if hmac.compare_digest(theirs, self.mesh_key):
            return True
        self.refused += 1
        level = logging.DEBUG
        if key not in self._logged:
            level = logging.WARNING
            self._logged[key] = None
            while len(self._logged) > self.MAX_REMEMBERED:
                self._logged.popitem(last=False)
        log.log(level, "relay: refusing %s from %s: wrong mesh key (logged once per key)", key.short(), peer)
        return False


class MeshHub:
    """Server side of the mesh: the watchers and the routes, hooked into the `Relay`."""

    def __init__(self, relay: Relay, our_key: PublicKey, check: MeshKeyCheck) -> None:
        self.relay = relay
        self.our_key = our_key
        self.check = check
        self.routes = MeshRoutes()
        self.watchers: set[ClientProtocol] = set()
        self.forwarded_in = 0
        self.forwarded_out = 0
        self.forward_drops = 0
        self.closed_peers = 0

    # ------------------------------------------------------------ our clients, told to watchers

    def client_present(self, c: Endpoint) -> None:
        """A connection registered (every one, duplicates too, as derper): tell the watchers."""
        if self.watchers:
            frame = _present_frame(cast("ClientProtocol", c))
            self._broadcast(frame)

    def client_gone(self, key: PublicKey) -> None:
        """The last connection of `key` left: tell the watchers."""
        if self.watchers:
            frame = F.encode_peer_gone(key, F.PeerGoneReason.DISCONNECTED)
            self._broadcast(frame)

    def _broadcast(self, frame: bytes) -> None:
        for w in list(self.watchers):
            if w.closed:
                self.watchers.discard(w)  # a watcher that left
            else:
                _update(w, frame)

    # ------------------------------------------------------------ frames from mesh peers

    def handle(self, c: ClientProtocol, ev: F.Frame) -> None:
        """WatchConns, ForwardPacket or ClosePeer from a trusted mesh peer `c`."""
        match ev:
            case F.WatchConns():
                if c.key == self.our_key or c in self.watchers:
                    return  # a connection to ourselves (derper ignores it too)
                frames = [_present_frame(cast("ClientProtocol", a)) for a in self.relay.active_connections()]
                self.watchers.add(c)
                if frames:
                    _update(c, b"".join(frames))
            case F.ForwardPacket(src=src, dst=dst, data=data):
                self.forwarded_in += 1
                self.relay.packets_received += 1
                self.relay.bytes_received += len(data)
                target, n = self.relay.lookup(dst)
                if target is not None:
                    target.enqueue_packet(src, data)
                else:
                    self.relay.drop("dup_client" if n > 1 else "unknown_dest_on_fwd")
            case F.ClosePeer(key=key):
                conns = self.relay.connections_of(key)
                log.info("relay: mesh peer %s asks to close %s (%d connections)", c.name, key.short(), len(conns))
                for conn in conns:
                    self.closed_peers += 1
                    conn.close("closed by a mesh peer (ClosePeer)")

    # ------------------------------------------------------------ keys on other members

    def forward(self, src: PublicKey, dst: PublicKey, data: bytes) -> bool:
        """Send a packet for a key connected elsewhere in the mesh; False if no member has it."""
        fwd = self.routes.lookup(dst)
        if fwd is None:
            return False
        self.forwarded_out += 1
        fwd.forward_packet(src, dst, data)
        return True

    def add_route(self, key: PublicKey, fwd: Forwarder) -> None:
        self.routes.add(key, fwd)

    def remove_route(self, key: PublicKey, fwd: Forwarder) -> None:
        if self.routes.remove(key, fwd):
            self.relay.peer_gone_from_mesh(key)

    def stats(self) -> dict[str, int]:
        return {"watchers": sum(not w.closed for w in self.watchers), "remote_keys": len(self.routes),
                "forwarded_in": self.forwarded_in,
                "forwarded_out": self.forwarded_out, "forward_drops": self.forward_drops,
                "closed_peers": self.closed_peers, "wrong_mesh_key": self.check.refused}


def _update(w: ClientProtocol, frames: bytes) -> None:
    """Write PeerPresent/PeerGone frames to a mesh watcher now (derper's unbounded mesh update
    list; the 30 s mesh write timeout bounds a watcher that stops reading)."""
    if not w.closed and w.transport is not None:
        w.send(frames)


def _present_frame(c: ClientProtocol) -> bytes:
    ip, port = _ip16_port(c.peer)
    flags = F.PeerPresentFlags.IS_MESH_PEER if c.can_mesh else F.PeerPresentFlags.IS_REGULAR
    assert c.key is not None
    return F.encode_peer_present(c.key, ip, port, flags)


def _ip16_port(peer: str) -> tuple[bytes, int]:
    """`HOST:PORT` / `[V6]:PORT` → (16-byte IP, IPv4-mapped for v4; port); zeros if unparsable."""
    host, _, port = peer.rpartition(":")
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
        packed = addr.packed if addr.version == 6 else b"\0" * 10 + b"\xff\xff" + addr.packed
        return packed, int(port)
    except ValueError:
        return bytes(16), 0

