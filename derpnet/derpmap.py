"""DERP maps: Tailscale's list of relay regions, and turning a `--derp` value into a relay.

A DERP map is the JSON Tailscale serves at `https://login.tailscale.com/derpmap/default`
(shape: shared/derp-protocol.md §7.2). derpnet ships a snapshot of it
(`derpnet/data/derpmap.json`, see the README beside it) so that a relay can be named by its
region code (`nyc`) or id (`1`). Nothing here touches the network implicitly: the map is
read from the package, from the user's cached copy written by `refresh()`, or from a file
the caller names; only `refresh(url)` and `probe()` open connections, and only when asked.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ._files import write_atomic

__all__ = [
    "DEFAULT_MAP_URL", "DerpNode", "DerpRegion", "DerpMap", "RelayTarget", "DerpMapError",
    "parse", "snapshot", "user_cache_path", "load", "refresh", "resolve", "probe_node",
    "probe", "ProbeResult",
]

DEFAULT_MAP_URL = "https://login.tailscale.com/derpmap/default"
MAX_MAP_BYTES = 4 << 20  # a real map is ~20 KB; refuse anything absurd
_MAX_SAFE_INT = 2 ** 53 - 1


class DerpMapError(ValueError):
    """A DERP map that is not valid, or a `--derp` value that names no relay."""


@dataclass(frozen=True)
class DerpNode:
    """One relay server of a region (`DERPNode`)."""

    name: str
    region_id: int
    host_name: str
    ipv4: str = ""
    ipv6: str = ""
    derp_port: int = 0  # 0 = 443
    stun_only: bool = False
    insecure_for_tests: bool = False
    cert_name: str = ""

    @property
    def port(self) -> int:
        return self.derp_port or 443

    @property
    def host(self) -> str:
        """What to hand to `listen_packet`/`derpquic`: the bare host name when the port is
        the default 443 (the form the Go derpconnect also accepts), else an https URL."""
        if self.port == 443:
            return self.host_name
        return f"https://{_bracket(self.host_name)}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{_bracket(self.host_name)}:{self.port}"


@dataclass(frozen=True)
class DerpRegion:
    """A region (`DERPRegion`): one or more meshed relay nodes in one place."""

    region_id: int
    code: str
    name: str
    nodes: tuple[DerpNode, ...] = ()
    latitude: float = 0.0
    longitude: float = 0.0
    avoid: bool = False
    no_measure_no_home: bool = False

    def derp_nodes(self) -> list[DerpNode]:
        """Nodes that relay DERP traffic (not STUN-only), in priority order."""
        return [n for n in self.nodes if not n.stun_only]


@dataclass
class DerpMap:
    """A parsed DERP map. `raw` keeps the original JSON object (re-serialisable)."""

    regions: dict[int, DerpRegion] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    source: str = ""

    def __iter__(self) -> Iterator[DerpRegion]:
        for rid in sorted(self.regions):
            yield self.regions[rid]

    def __len__(self) -> int:
        return len(self.regions)

    def region(self, ident: int | str) -> DerpRegion | None:
        """The region with this numeric id, or this region code (case-insensitive)."""
        if isinstance(ident, int):
            return self.regions.get(ident)
        s = ident.strip()
        if s.isdigit():
            return self.regions.get(int(s))
        low = s.lower()
        for r in self:
            if r.code.lower() == low:
                return r
        return None

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=1, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------
# Parsing


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _get(obj: dict[str, Any], key: str, typ: type, default: Any, where: str) -> Any:
    v = obj.get(key, default)
    if v is None:
        return default
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if typ is int and isinstance(v, bool) or not isinstance(v, typ):
        raise DerpMapError(f"{where}: {key} must be {typ.__name__}, not {type(v).__name__}")
    return v


def parse(data: str | bytes | dict[str, Any], source: str = "") -> DerpMap:
    """Parse and validate a DERP map (JSON text or an already decoded object)."""
    what = source or "DERP map"
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise DerpMapError(f"{what}: not UTF-8 text") from None
    if isinstance(data, str):
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise DerpMapError(f"{what}: not JSON ({e})") from None
    else:
        obj = data
    if not isinstance(obj, dict):
        raise DerpMapError(f"{what}: expected a JSON object with \"Regions\"")
    regions_obj = obj.get("Regions")
    if not isinstance(regions_obj, dict) or not regions_obj:
        raise DerpMapError(f"{what}: no \"Regions\" object (is this a DERP map?)")
    regions: dict[int, DerpRegion] = {}
    for key, r in regions_obj.items():
        where = f"{what}: region {key!r}"
        if not (isinstance(key, str) and key.isdigit() and 0 < int(key) <= _MAX_SAFE_INT):
            raise DerpMapError(f"{where}: region keys must be positive decimal ids")
        if r is None:  # a control-plane patch deleting a default region
            continue
        if not isinstance(r, dict):
            raise DerpMapError(f"{where}: expected an object")
        rid = int(key)
        if _get(r, "RegionID", int, rid, where) != rid:
            raise DerpMapError(f"{where}: RegionID {r.get('RegionID')} does not match its key")
        nodes = []
        for i, n in enumerate(_get(r, "Nodes", list, [], where)):
            nwhere = f"{where} node {i}"
            if not isinstance(n, dict):
                raise DerpMapError(f"{nwhere}: expected an object")
            host = _get(n, "HostName", str, "", nwhere).strip()
            if not host:
                raise DerpMapError(f"{nwhere}: HostName is required")
            port = _get(n, "DERPPort", int, 0, nwhere)
            if not 0 <= port <= 65535:
                raise DerpMapError(f"{nwhere}: DERPPort {port} out of range")
            nodes.append(DerpNode(
                name=_get(n, "Name", str, "", nwhere),
                region_id=_get(n, "RegionID", int, rid, nwhere),
                host_name=host,
                ipv4=_get(n, "IPv4", str, "", nwhere),
                ipv6=_get(n, "IPv6", str, "", nwhere),
                derp_port=port,
                stun_only=_get(n, "STUNOnly", bool, False, nwhere),
                insecure_for_tests=_get(n, "InsecureForTests", bool, False, nwhere),
                cert_name=_get(n, "CertName", str, "", nwhere),
            ))
        regions[rid] = DerpRegion(
            region_id=rid,
            code=_get(r, "RegionCode", str, "", where),
            name=_get(r, "RegionName", str, "", where),
            nodes=tuple(nodes),
            latitude=_get(r, "Latitude", float, 0.0, where),
            longitude=_get(r, "Longitude", float, 0.0, where),
            avoid=_get(r, "Avoid", bool, False, where),
            no_measure_no_home=_get(r, "NoMeasureNoHome", bool, False, where),
        )
    if not regions:
        raise DerpMapError(f"{what}: no regions")
    return DerpMap(regions=regions, raw=obj, source=source)


# --------------------------------------------------------------------------
# Where maps come from


def snapshot() -> DerpMap:
    """The map shipped inside the package (see derpnet/data/README.md for its date)."""
    text = resources.files("derpnet").joinpath("data/derpmap.json").read_text(encoding="utf-8")
    return parse(text, source="built-in snapshot")


def user_cache_path() -> Path:
    """`$XDG_CACHE_HOME/derpnet/derpmap.json` (default `~/.cache/derpnet/derpmap.json`)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "derpnet" / "derpmap.json"


def load(path: str | os.PathLike[str] | None = None) -> DerpMap:
    """The map to use: `path` if given (errors are raised), else the user's refreshed copy
    if present and valid, else the built-in snapshot."""
    if path is not None:
        return _read_file(Path(path))
    cached = user_cache_path()
    if cached.is_file():
        try:
            return _read_file(cached)
        except (OSError, DerpMapError):
            pass  # a damaged cache never breaks the tool: fall back to the snapshot
    return snapshot()


def _read_file(path: Path) -> DerpMap:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MAP_BYTES + 1)
    except OSError as e:
        raise DerpMapError(f"{path}: {e.strerror or e}") from None
    if len(data) > MAX_MAP_BYTES:
        raise DerpMapError(f"{path}: larger than {MAX_MAP_BYTES} bytes")
    return parse(data, source=str(path))


def unverified_context() -> ssl.SSLContext:
    """A client context that checks no certificate (an InsecureForTests node)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def refresh(source: str = DEFAULT_MAP_URL, *, dest: str | os.PathLike[str] | None = None,
            timeout: float = 15.0, ssl_context: ssl.SSLContext | None = None,
            insecure: bool = False) -> tuple[DerpMap, Path]:
    """Fetch a map from an http(s) URL, or read it from a file, validate it, and write it
    atomically to `dest` (default: `user_cache_path()`). Returns the map and where it went.
    A plain http:// URL is refused unless `insecure`: whoever is on the path could rewrite
    the map (point a region at its own relay, mark nodes InsecureForTests)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
        scheme = urllib.parse.urlsplit(source).scheme.lower()
        if scheme == "http" and not insecure:
            raise DerpMapError(f"{source}: refusing to fetch a DERP map over plain http (anyone on the "
                               f"path could rewrite it); use https or a file, or --insecure")
        if scheme == "file":
            m = _read_file(Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path)))
        elif scheme in ("http", "https"):
            req = urllib.request.Request(source, headers={"User-Agent": "derpnet", "Accept": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout, context=ssl_context) as resp:
                    data = resp.read(MAX_MAP_BYTES + 1)
            except urllib.error.HTTPError as e:
                raise DerpMapError(f"cannot fetch {source}: HTTP {e.code} {e.reason}") from None
            except (OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise DerpMapError(f"cannot fetch {source}: {reason}") from None
            if len(data) > MAX_MAP_BYTES:
                raise DerpMapError(f"{source}: larger than {MAX_MAP_BYTES} bytes")
            m = parse(data, source=source)
        else:
            raise DerpMapError(f"{source}: only http, https and file URLs are supported")
    else:
        m = _read_file(Path(source))
    out = Path(dest) if dest is not None else user_cache_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, m.to_json().encode("utf-8"), 0o644)  # a public document, like any cache file
    m.source = str(out)
    return m, out


# --------------------------------------------------------------------------
# --derp values


@dataclass(frozen=True)
class RelayTarget:
    """What a `--derp` value names: candidate relays in priority order (one for a host or a
    URL, each DERP node of a region), and how to describe them to a user."""

    hosts: tuple[str, ...]
    region: DerpRegion | None = None
    #: The hosts whose map node is InsecureForTests (no certificate check for that node only,
    #: and only when no CA was given explicitly).
    insecure_hosts: frozenset[str] = frozenset()

    @property
    def host(self) -> str:
        return self.hosts[0]

    @property
    def insecure(self) -> bool:
        """Some node of this target is marked InsecureForTests."""
        return bool(self.insecure_hosts)

    def describe(self) -> str:
        if self.region is not None:
            return f"region {self.region.region_id} ({self.region.code}, {self.region.name})"
        return self.hosts[0]


_HOSTNAME_RX = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$")


def resolve(spec: str, derpmap: DerpMap | None = None) -> RelayTarget:
    """Interpret a `--derp` value: a URL (`https://host:port`, `http://host:port`, `wss://`, `ws://`), a
    `host[:port]`, a region id (`1`) or a region code (`nyc`) looked up in `derpmap`
    (default: `load()`). A single word that is not a known region code is an error
    (`localhost` excepted): name a host by its dotted name or a URL."""
    s = (spec or "").strip()
    if not s:
        raise DerpMapError("empty relay name")
    if "://" in s:
        u = urllib.parse.urlsplit(s)
        if u.scheme.lower() not in ("http", "https", "ws", "wss"):
            raise DerpMapError(f"relay URL {s!r}: scheme must be https or http (wss or ws: DERP over WebSocket)")
        try:
            host, port = u.hostname, u.port
        except ValueError as e:
            raise DerpMapError(f"relay URL {s!r}: {e}") from None
        if not host:
            raise DerpMapError(f"relay URL {s!r}: no host")
        if u.path not in ("", "/", "/derp") or u.query or u.fragment:
            raise DerpMapError(f"relay URL {s!r}: give only scheme://host[:port] (the path is always /derp)")
        netloc = _bracket(host) + (f":{port}" if port else "")
        return RelayTarget(hosts=(f"{u.scheme.lower()}://{netloc}",))
    if s.isdigit() or re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", s) and s.lower() != "localhost":
        m = derpmap if derpmap is not None else load()
        region = m.region(s)
        if region is None:
            known = ", ".join(r.code for r in m if r.code)
            kind = "region id" if s.isdigit() else "region code"
            raise DerpMapError(
                f"unknown {kind} {s!r} (known: {known}); for a host give its full name or a URL")
        nodes = region.derp_nodes()
        if not nodes:
            raise DerpMapError(f"region {region.region_id} ({region.code}) has no DERP nodes")
        return RelayTarget(hosts=tuple(n.host for n in nodes), region=region,
                           insecure_hosts=frozenset(n.host for n in nodes if n.insecure_for_tests))
    host, port = _split_host_port(s)
    if port is None or port == 443:
        return RelayTarget(hosts=(host if ":" not in host else f"https://[{host}]:443",))
    return RelayTarget(hosts=(f"https://{_bracket(host)}:{port}",))


def _split_host_port(s: str) -> tuple[str, int | None]:
    port: int | None = None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise DerpMapError(f"relay {s!r}: unbalanced '['")
        host, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise DerpMapError(f"relay {s!r}: expected :port after ]")
            port = _port(rest[1:], s)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DerpMapError(f"relay {s!r}: {host!r} is not an IPv6 address") from None
        return host, port
    if s.count(":") > 1:
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            raise DerpMapError(f"relay {s!r}: not a host name, host:port or URL") from None
        return s, None
    host = s
    if ":" in s:
        host, p = s.split(":", 1)
        port = _port(p, s)
    if not _HOSTNAME_RX.match(host):
        raise DerpMapError(f"relay {s!r}: not a valid host name")
    return host, port


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise DerpMapError(f"relay {spec!r}: bad port {text!r}")
    return int(text)


# --------------------------------------------------------------------------
# Latency probes (HTTPS GET /derp/latency-check, shared/derp-protocol.md §6.3)


@dataclass(frozen=True)
class ProbeResult:
    region: DerpRegion
    node: DerpNode | None
    latency: float | None  # seconds: the best sample; None when every sample failed
    error: str = ""


def probe_node(node: DerpNode, *, samples: int = 3, timeout: float = 2.0,
               ssl_context: ssl.SSLContext | None = None, deadline: float | None = None,
               default_context: ssl.SSLContext | None = None) -> float:
    """The best of `samples` round trips of `GET /derp/latency-check` to one node, each on
    a fresh TLS connection, timing only the request after the TLS handshake (so one
    network round trip). Each sample may take `timeout`, all of them end by `deadline`
    (time.monotonic(); default `samples * timeout` from now). Raises OSError (or
    TimeoutError) when no sample succeeds."""
    if ssl_context is not None:  # an explicit CA always wins over the map's InsecureForTests
        ctx = ssl_context
    elif node.insecure_for_tests:
        ctx = unverified_context()
    else:  # loading the system's CAs takes a while: probe() does it once for all regions
        ctx = default_context or ssl.create_default_context()
    best: float | None = None
    last: BaseException | None = None
    if deadline is None:
        deadline = time.monotonic() + timeout * samples
    request = (f"GET /derp/latency-check HTTP/1.1\r\nHost: {_bracket(node.host_name)}\r\n"
               f"User-Agent: derpnet\r\nConnection: close\r\n\r\n").encode()
    for _ in range(samples):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((node.host_name, node.port), timeout=min(timeout, left)) as raw:
                with ctx.wrap_socket(raw, server_hostname=node.host_name) as s:
                    t0 = time.monotonic()
                    s.sendall(request)
                    head = b""
                    while b"\r\n" not in head:
                        chunk = s.recv(1024)
                        if not chunk:
                            raise ConnectionError("connection closed before a response")
                        head += chunk
                    rtt = time.monotonic() - t0
            status_line = head.split(b"\r\n", 1)[0]
            status = status_line.split()
            if len(status) < 2 or status[1] != b"200":
                raise ConnectionError(f"HTTP status {status_line.decode(errors='replace')!r}")
            best = rtt if best is None else min(best, rtt)
        except (OSError, ssl.SSLError) as e:
            last = e
    if best is None:
        if isinstance(last, BaseException):
            raise last
        raise TimeoutError("no sample within the time limit")
    return best


def probe(derpmap: DerpMap, *, regions: Iterable[DerpRegion] | None = None, samples: int = 3,
          timeout: float = 3.0, ssl_context: ssl.SSLContext | None = None,
          on_result: Callable[[ProbeResult, int, int], None] | None = None) -> list[ProbeResult]:
    """Probe every region (except `NoMeasureNoHome` ones) at once, a thread each: the first
    DERP node of each region, then the next when it fails. Returns within `timeout` seconds
    whatever happens, DNS included (a lookup cannot be interrupted: its thread is left
    behind, a daemon); a region without an answer by then is "timed out". `on_result(result,
    done, total)` is called in the caller's thread as results come. Results in region order."""
    todo = [r for r in (regions if regions is not None else derpmap) if not r.no_measure_no_home]
    deadline = time.monotonic() + timeout
    default_context = ssl.create_default_context() if ssl_context is None else None
    results: dict[int, ProbeResult] = {}
    arrived: list[ProbeResult] = []  # in the order they came, for on_result
    cond = threading.Condition()

    def one(i: int, region: DerpRegion) -> None:
        res = ProbeResult(region, None, None, "no DERP nodes")
        for node in region.derp_nodes()[:2]:
            if time.monotonic() >= deadline:
                break
            try:
                res = ProbeResult(region, node, probe_node(node, samples=samples, timeout=timeout,
                                                           ssl_context=ssl_context, deadline=deadline,
                                                           default_context=default_context))
                break
            except (OSError, ssl.SSLError) as e:
                res = ProbeResult(region, None, None, _describe_error(e))
        with cond:
            results[i] = res
            arrived.append(res)
            cond.notify_all()

    for i, region in enumerate(todo):
        threading.Thread(target=one, args=(i, region), name=f"derp-probe-{region.code or region.region_id}",
                         daemon=True).start()
    reported = 0
    while True:
        with cond:
            left = deadline - time.monotonic()
            if len(arrived) == reported and len(results) < len(todo) and left > 0:
                cond.wait(left)
            new = arrived[reported:]
            finished = len(results) == len(todo) or deadline <= time.monotonic()
        for r in new:
            reported += 1
            if on_result is not None:
                on_result(r, reported, len(todo))
        if finished:
            break
    with cond:
        return [results.get(i) or ProbeResult(region, None, None, "timed out") for i, region in enumerate(todo)]


def _describe_error(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.verify_message or e}"
    if isinstance(e, socket.gaierror):
        return f"DNS: {e.strerror or e}"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
