"""`--metrics-listen`: a small HTTP server, on the relay's loop, for `/metrics` and `/debug/`.

Layer: relay server, the I/O edge of metrics.py. Separate from the DERP port (off by
default; bind it to loopback or a private address): `GET /metrics` (and derper's name
for it, `/debug/varz`) answers the Prometheus text, `GET /debug/` a landing page with
links, anything else 404. One request per connection; a request head must arrive within
10 s and fit in 16 KiB (http11.MAX_HEAD_SIZE).
"""

from __future__ import annotations

import asyncio
import html
import logging
from typing import TYPE_CHECKING, cast

from ..errors import RemoteProtocolError
from ..http11 import Request, build_response, parse_request_head
from . import metrics

if TYPE_CHECKING:  # pragma: no cover
    from .server import RelayServer

__all__ = ["MetricsServer", "metrics_text"]

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0


def metrics_text(server: RelayServer) -> str:
    """The Prometheus text for `server` now (call on its loop)."""
    deepest = max((c.queued()[0] for c in server.connections()), default=0)
    rates = server.rate_config
    allowed = server.access.allowed
    extra = {
        "derp_queue_depth_max": float(deepest),
        "derp_rate_limit_per_client_bytes_per_second": float(rates.default.rate or 0),
        "derp_rate_limit_per_client_burst_bytes": float(rates.default.burst if rates.default.rate else 0),
        "derp_rate_limit_overrides": float(len(rates.per_key)),
        "derp_allowed_keys": float(-1 if allowed is None else len(allowed)),
        "derp_draining": float(server.draining),
    }
    return metrics.render(server.stats(), metrics.process_stats(), extra)


def _landing(server: RelayServer) -> str:
    items = [("Server key", server.public_key.short()), ("Clients", str(server.relay.connections)),
             ("Allow list", "off" if server.access.allowed is None else f"{len(server.access.allowed)} keys"),
             ("Admission URL", "set" if server.access.verify_url else "off"),
             ("Rate limit", server.rate_config.describe())]
    rows = "".join(f"<li>{html.escape(k)}: <b>{html.escape(v)}</b></li>" for k, v in items)
    return ("<!DOCTYPE html><html><head><title>derpnet relay debug</title></head><body>"
            "<h1>derpnet relay</h1><ul>" + rows + "</ul><ul>"
            '<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>'
            '<li><a href="/debug/varz">/debug/varz</a>: the same, under derper\'s name</li>'
            "</ul></body></html>\n")


class _MetricsProtocol(asyncio.Protocol):
    """One metrics HTTP connection: read a request head, answer, close."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        self.timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.buf += data
        try:
            parsed = parse_request_head(self.buf)
        except RemoteProtocolError:
            self._reply(400, "text/plain; charset=utf-8", "bad request\n")
            return
        if parsed is not None:
            self._answer(parsed[0])

    def _answer(self, req: Request) -> None:
        if req.method not in ("GET", "HEAD"):
            self._reply(405, "text/plain; charset=utf-8", "method not allowed\n", req)
        elif req.path in ("/metrics", "/debug/varz"):
            self._reply(200, metrics.CONTENT_TYPE, metrics_text(self.server), req)
        elif req.path in ("/debug", "/debug/"):
            self._reply(200, "text/html; charset=utf-8", _landing(self.server), req)
        else:
            self._reply(404, "text/plain; charset=utf-8", "404 page not found\n", req)

    def _reply(self, status: int, ctype: str, body: str, req: Request | None = None) -> None:
        assert self.transport is not None
        data = body.encode()
        head = build_response(status, [("Content-Type", ctype), ("Content-Length", str(len(data))),
                                       ("Connection", "close")])
        self.transport.write(head + (b"" if req is not None and req.method == "HEAD" else data))
        self.transport.close()


class MetricsServer:
    """Serves `/metrics` and `/debug/` for a RelayServer on its loop."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self._listener: asyncio.Server | None = None

    async def start(self, host: str | None, port: int) -> None:
        """Bind and listen (raises OSError)."""
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(lambda: _MetricsProtocol(self.server), host or None, port,
                                                  reuse_address=True)
        log.info("relay: metrics on http://%s/metrics", self.address)

    @property
    def address(self) -> str:
        if self._listener is None or not self._listener.sockets:
            return ""
        h, p = self._listener.sockets[0].getsockname()[:2]
        return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
