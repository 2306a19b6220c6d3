"""HTTP proxies on the way to a relay, chosen from the environment as Go's net/http does.

Layer: protocol (pure functions, no sockets). Tailscale's client reaches a relay through
the proxy its environment names (tshttpproxy, Go's httpproxy.FromEnvironment) with an
HTTP CONNECT; `proxy_for()` applies the same rules: HTTPS_PROXY (or https_proxy) for
https:// and wss:// relays, HTTP_PROXY (or http_proxy) for http:// and ws://, a proxy
without a scheme is http://, and NO_PROXY (or no_proxy) lists hosts reached directly:
`*` (all), IPs and CIDR prefixes, domain names (the name and its subdomains), `.domain`
(subdomains only), each optionally with `:port`. localhost and loopback addresses are
never proxied. `connect_request()` and `connect_response()` are the CONNECT exchange.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .http11 import Response, build_request

__all__ = ["ProxyURL", "proxy_for", "no_proxy_matches", "parse_proxy_url", "connect_request", "check_connect_response"]


@dataclass(frozen=True)
class ProxyURL:
    """An HTTP proxy: where it is and the credentials from its URL."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        """The proxy's URL without its credentials (for messages)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def authorization(self) -> str | None:
        """The Proxy-Authorization value (Basic) when the URL had credentials."""
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def parse_proxy_url(text: str) -> ProxyURL:
    """`http://[user:pass@]host[:port]` (no scheme: http://); ValueError for others (https://, socks5://)."""
    s = text.strip()
    if "://" not in s:
        s = "http://" + s
    parts = urlsplit(s)
    if parts.scheme.lower() != "http":
        raise ValueError(f"proxy {_redact(text)!r}: only http:// proxies are supported (CONNECT over plain HTTP)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"proxy {_redact(text)!r}: invalid port") from None
    if not parts.hostname:
        raise ValueError(f"proxy {_redact(text)!r}: no host")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return ProxyURL(parts.hostname, port or 80, user, password)


def _redact(text: str) -> str:
    """A proxy URL for a message, without its password."""
    head, at, tail = text.rpartition("@")
    return f"{head.split(':')[0]}:***@{tail}" if at and ":" in head.split("//")[-1] else text


def _env(environ: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return ""


def proxy_for(scheme: str, host: str, port: int, environ: Mapping[str, str] | None = None) -> ProxyURL | None:
    """The proxy to reach `host:port` over `scheme` (https/http), or None for a direct connection."""
    env = os.environ if environ is None else environ
    if _is_local(host):
        return None
    text = _env(env, "HTTPS_PROXY", "https_proxy") if scheme == "https" else _env(env, "HTTP_PROXY", "http_proxy")
    if not text or no_proxy_matches(_env(env, "NO_PROXY", "no_proxy"), host, port):
        return None
    return parse_proxy_url(text)


def _is_local(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def no_proxy_matches(no_proxy: str, host: str, port: int) -> bool:
    """Whether NO_PROXY's list says to reach `host:port` directly (Go's httpproxy rules)."""
    host = host.lower().rstrip(".")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if ip is not None and "/" in entry:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name, want_port = _entry_port(entry)
        if want_port is not None and want_port != port:
            continue
        if ip is not None:
            try:
                if ipaddress.ip_address(name) == ip:
                    return True
            except ValueError:
                pass
            continue
        name = name.rstrip(".")
        if name.startswith("*."):
            name = name[1:]
        if name.startswith("."):
            if host.endswith(name):
                return True
        elif host == name or host.endswith("." + name):
            return True
    return False


def _entry_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        name, _, rest = entry[1:].partition("]")
        return name, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        name, _, p = entry.partition(":")
        return (name, int(p)) if p.isdigit() else (entry, None)
    return entry, None


def connect_request(host: str, port: int, proxy: ProxyURL) -> bytes:
    """`CONNECT host:port HTTP/1.1` with Host (and Proxy-Authorization), as derphttp sends it."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = [("Host", target)]
    auth = proxy.authorization()
    if auth:
        headers.append(("Proxy-Authorization", auth))
    return build_request("CONNECT", target, headers)


def check_connect_response(resp: Response, proxy: ProxyURL, host: str, port: int) -> None:
    """ConnectionRefusedError unless the proxy answered the CONNECT with a 2xx."""
    if not 200 <= resp.status < 300:
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"HTTP proxy {proxy.url} refused CONNECT to {host}:{port}: "
                                     f"{resp.status} {resp.reason}".rstrip())
