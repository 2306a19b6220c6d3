"""The relay's plain-HTTP endpoints (probes, captive-portal check, home page), as derper serves them.

Pure functions from a parsed request head to response bytes; the connection closes after
each response. See shared/derp-protocol.md §6.3.
"""

from __future__ import annotations

import re

from ..http11 import Request, build_response

__all__ = ["respond", "bad_websocket", "UPGRADE_REQUIRED_BODY", "HOME_PAGE"]

UPGRADE_REQUIRED_BODY = "DERP requires connection upgrade\n"
HOME_PAGE = (
    "derpnet relay\n"
    "\n"
    "This is a DERP relay (Tailscale's Designated Encrypted Relay for Packets protocol),\n"
    "run by derpnet. Clients connect to /derp; /derp/probe answers latency checks.\n"
)
_NO_CACHE = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
_CHALLENGE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TEXT = "text/plain; charset=utf-8"


def respond(req: Request) -> tuple[int, bytes]:
    """The (status, response bytes) for a non-upgrade request; HEAD gets headers only."""
    path = req.path
    if path in ("/derp/probe", "/derp/latency-check"):
        if req.method in ("GET", "HEAD"):
            return _reply(req, 200, [("Access-Control-Allow-Origin", "*")])
        return _reply(req, 405, [("Content-Type", _TEXT)], "bogus probe method\n")
    if path == "/derp":
        return _reply(req, 426, [("Content-Type", _TEXT)], UPGRADE_REQUIRED_BODY)
    if path == "/generate_204":
        headers = [("Cache-Control", _NO_CACHE)]
        challenge = req.get("X-Tailscale-Challenge")
        if challenge and _CHALLENGE.fullmatch(challenge):
            headers.append(("X-Tailscale-Response", "response " + challenge))
        return _reply(req, 204, headers)
    if path == "/robots.txt":
        return _reply(req, 200, [("Content-Type", _TEXT)], "User-agent: *\nDisallow: /\n")
    if path == "/" and req.method in ("GET", "HEAD"):
        return _reply(req, 200, [("Content-Type", _TEXT)], HOME_PAGE)
    if path == "/":
        return _reply(req, 405, [("Content-Type", _TEXT)], "method not allowed\n")
    return _reply(req, 404, [("Content-Type", _TEXT)], "404 page not found\n")


def bad_websocket(req: Request, status: int, why: str) -> bytes:
    """The response to a DERP WebSocket upgrade we cannot accept (no key, another version)."""
    headers = [("Content-Type", _TEXT)]
    if status == 426:
        headers.append(("Sec-WebSocket-Version", "13"))
    return _reply(req, status, headers, f"WebSocket upgrade refused: {why}\n")[1]


def _reply(req: Request, status: int, headers: list[tuple[str, str]], body: str = "",
           reason: str | None = None) -> tuple[int, bytes]:
    data = body.encode()
    headers = list(headers)
    if status != 204:
        headers.append(("Content-Length", str(len(data))))
    headers.append(("Connection", "close"))
    if req.method == "HEAD":
        data = b""
    return status, build_response(status, headers, data, reason=reason)
