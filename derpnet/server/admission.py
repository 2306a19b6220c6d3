"""The handshake phase of one relay connection: the HTTP request, the upgrade, the hello.

Layer: relay server. An `Admission` runs from `connection_made` until the client is
registered (or dropped): it answers plain HTTP requests, switches `GET /derp` to DERP,
admits a client whose ClientInfo opened, and bounds each step by its deadline
(`handshake_timeout` for the TLS handshake and the request head, `client_info_timeout`
from the ServerKey to the ClientInfo). It works through the connection's public methods.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .. import websocket
from ..connection import ServerConnection
from ..errors import UpgradeError
from ..events import AcceptClient, AcceptUpgrade, ClientHello, Event, HttpRequest, UpgradeRequest
from . import http_routes
from .wsserve import ServerWebSocket

if TYPE_CHECKING:  # pragma: no cover
    from .conn import ClientProtocol

__all__ = ["Admission"]

log = logging.getLogger(__name__)


class Admission:
    """Gets one connection through its handshake, or drops it when a deadline passes."""

    __slots__ = ("conn", "_timer")

    def __init__(self, conn: ClientProtocol) -> None:
        self.conn = conn
        self._timer: asyncio.TimerHandle | None = None
        self._arm("HTTP request", conn.options.handshake_timeout)

    def stop(self) -> None:
        """Cancel the deadline (the client was admitted, or the connection is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def handle(self, proto: ServerConnection, ev: Event) -> None:
        """One event of the handshake phase."""
        conn = self.conn
        match ev:
            case HttpRequest(request=req):
                status, response = http_routes.respond(req)
                conn.server.http_requests += 1
                log.debug("relay: %s %s %s -> %d", conn.peer, req.method, req.target[:100], status)
                conn.send(response)
                conn.finish()
            case UpgradeRequest(request=req, fast_start=fast_start):
                if proto.websocket_leftover is not None:  # DERP in WebSocket messages, as derper
                    try:
                        conn.send(websocket.server_response(req))
                    except UpgradeError as e:
                        conn.send(http_routes.bad_websocket(req, e.status or 400, str(e)))
                        conn.finish()
                        return
                    conn.ws = ServerWebSocket(conn)  # DERP in WebSocket messages from now on
                conn.ideal_node = req.get("Ideal-Node") or None
                conn.fast_start = fast_start
                # Like derper, send the ServerKey before judging bytes pipelined behind the
                # request (a fast-start ClientInfo, or garbage): decoded after AcceptUpgrade.
                conn.send(proto.send(AcceptUpgrade()))
                self._arm("ClientInfo", conn.options.client_info_timeout)
                if proto.websocket_leftover:  # messages sent right behind the upgrade request
                    conn.on_plaintext(proto.websocket_leftover)
                conn.dispatch_all(proto.receive_data(b""))
            case ClientHello(key=key, info=info):
                self.stop()
                mesh = conn.server.mesh_check.judge(key, info, conn.peer)
                if mesh is False:  # logged once per key by judge()
                    conn.server.handshake_failures += 1
                    conn.abort("wrong mesh key", level=logging.DEBUG)
                    return
                conn.can_mesh = bool(mesh)
                access = conn.server.access
                if access.active and not conn.can_mesh:  # mesh peers skip access control, as in derper
                    access.judge(conn, key, lambda: self._admit(proto, ev))
                else:
                    self._admit(proto, ev)

    def _admit(self, proto: ServerConnection, hello: ClientHello) -> None:
        conn = self.conn
        conn.send(proto.send(AcceptClient()))  # ServerInfo: the first frame after ServerKey
        conn.admit(hello)
        conn.dispatch_all(proto.receive_data(b""))  # frames pipelined behind the ClientInfo

    def _arm(self, what: str, seconds: float) -> None:
        self.stop()
        self._timer = self.conn.loop.call_later(seconds, self._timed_out, what, seconds)

    def _timed_out(self, what: str, seconds: float) -> None:
        # DEBUG, not INFO: abandoned connections (scanners, dead NATs) are routine.
        self._timer = None
        conn = self.conn
        if conn.server.ssl_context is not None and not conn.tls_handshake_done:
            what = "TLS handshake"
        conn.server.handshake_timeouts += 1
        conn.abort(f"no {what} within {seconds:g}s", level=logging.DEBUG)
