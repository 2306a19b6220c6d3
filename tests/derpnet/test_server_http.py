"""The relay's plain-HTTP side: probe endpoints, /generate_204, 426, the home page, and
what happens to garbage, oversized and slow (slowloris) request heads."""

from __future__ import annotations

import time

import pytest

from derpnet.http11 import parse_response_head
from derpnet.server import DerpServer
from tests.rawderp import dial, http_get, wait_closed


@pytest.fixture(scope="module")
def relay():
    with DerpServer(handshake_timeout=0.5) as srv:
        yield srv


def parse(raw: bytes):
    resp, used = parse_response_head(raw)
    return resp, raw[used:]


@pytest.mark.parametrize("path", ["/derp/probe", "/derp/latency-check"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_probe_endpoints(relay, path, method):
    resp, body = parse(http_get(relay.url, path, method=method))
    assert resp.status == 200
    assert resp.get("Access-Control-Allow-Origin") == "*"
    assert body == b"" and resp.get("Content-Length") == "0"


@pytest.mark.parametrize("path", ["/derp/probe", "/derp/latency-check"])
def test_probe_other_methods_405(relay, path):
    resp, body = parse(http_get(relay.url, path, method="POST", headers=[("Content-Length", "0")]))
    assert resp.status == 405
    assert body == b"bogus probe method\n"


@pytest.mark.parametrize("challenge, answered", [
    ("ts_derp1.example.com:443", True),
    ("a-b_c.d:e" * 7 + "x", True),  # 64 characters
    ("a" * 65, False),
    ("bad char!", False),
    ("", False),
])
def test_generate_204_challenge(relay, challenge, answered):
    headers = [("X-Tailscale-Challenge", challenge)] if challenge else []
    resp, body = parse(http_get(relay.url, "/generate_204", headers=headers))
    assert resp.status == 204 and body == b""
    assert resp.get("Cache-Control") == "no-cache, no-store, must-revalidate, no-transform, max-age=0"
    assert resp.get("X-Tailscale-Response") == (f"response {challenge}" if answered else None)


def test_home_page(relay):
    resp, body = parse(http_get(relay.url, "/"))
    assert resp.status == 200 and b"DERP relay" in body
    assert resp.get("Content-Length") == str(len(body))


def test_unknown_path_404(relay):
    resp, _ = parse(http_get(relay.url, "/nope"))
    assert resp.status == 404


@pytest.mark.parametrize("upgrade", [None, "h2c", "tls/1.3"])
def test_derp_without_derp_upgrade_is_426(relay, upgrade):
    headers = [("Upgrade", upgrade), ("Connection", "Upgrade")] if upgrade else []
    resp, body = parse(http_get(relay.url, "/derp", headers=headers))
    assert resp.status == 426
    assert body == b"DERP requires connection upgrade\n"


def test_derp_subpath_is_not_the_upgrade_endpoint(relay):
    resp, _ = parse(http_get(relay.url, "/derp/", headers=[("Upgrade", "DERP"), ("Connection", "Upgrade")]))
    assert resp.status == 404


@pytest.mark.parametrize("headers, status", [
    ([("Sec-WebSocket-Version", "13")], 400),
    ([("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "short")], 400),
    ([("Sec-WebSocket-Version", "8"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")], 426),
])
def test_bad_websocket_upgrade_is_refused(relay, headers, status):
    resp, body = parse(http_get(relay.url, "/derp", headers=[
        ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Protocol", "derp"), *headers]))
    assert resp.status == status and b"WebSocket upgrade refused" in body


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello on the plain port
    b"\x00\x00\x00\x00",
    b"hello there\r\n\r\n",
    b"GET\r\n\r\n",
])
def test_garbage_instead_of_http_is_closed_without_a_response(relay, garbage):
    with dial(relay.url) as s:
        s.sendall(garbage)
        s.settimeout(5)
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b""


def test_oversized_head_is_closed(relay):
    with dial(relay.url) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        try:
            s.sendall(b"X-Pad: " + b"a" * (20 << 10) + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert wait_closed(s, timeout=5)


def test_slowloris_head_is_bounded_by_the_handshake_timeout(relay):
    with dial(relay.url) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /derp HTTP/1.1\r\n")
        closed = False
        for _ in range(200):  # one header byte at a time, never finishing the head
            try:
                s.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            s.settimeout(0.05)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except ConnectionResetError:
                closed = True
                break
        elapsed = time.monotonic() - t0
        assert closed, "the relay kept a never-finished request head open"
        assert 0.45 <= elapsed < 5


def test_abandoned_connections_are_closed_by_the_timer():
    with DerpServer(handshake_timeout=0.3) as srv:
        socks = [dial(srv.url) for _ in range(50)]
        try:
            for s in socks:
                assert wait_closed(s, timeout=5)
            assert srv.stats()["handshake_timeouts"] == 50
        finally:
            for s in socks:
                s.close()
