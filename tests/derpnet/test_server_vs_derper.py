"""The same wire-level checks against our relay and Tailscale's Go derper, so a difference in
behaviour shows up as one failing parameter. The derper runs are marked `interop`."""

from __future__ import annotations

import contextlib

import pytest

from derpnet import frames as F
from derpnet.http11 import parse_response_head
from derpnet.keys import PrivateKey, PublicKey
from tests.conftest import missing_go_peer
from tests.interop_peers import GoDerper, derper_path, skip_reason
from tests.rawderp import RawDerpClient, dial, fast_start_request, http_get, read_exact, wait_closed
from tests.relays import OurRelay

KINDS = ["ours", pytest.param("go", marks=pytest.mark.interop)]


@contextlib.contextmanager
def relay_of(kind: str, tmp_path):
    """(url, server public key) of a running relay of `kind`."""
    if kind == "ours":
        with OurRelay(workdir=str(tmp_path)) as r:
            yield r.url, r.public_key
        return
    if derper_path() is None:
        missing_go_peer(skip_reason("derper"))
    with GoDerper(tmp_path) as d:
        with RawDerpClient(d.url) as probe:  # derper prints no key: learn it from the handshake
            key = probe.connected.server_key
        yield d.url, key


@pytest.fixture(params=KINDS)
def relay(request, tmp_path):
    with relay_of(request.param, tmp_path) as r:
        yield r


def test_101_head_and_server_key(relay):
    url, key = relay
    with dial(url) as s:
        s.sendall(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        head = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                f"Derp-Version: 2\r\nDerp-Public-Key: {key.hex()}\r\n\r\n").encode()
        assert read_exact(s, len(head) + 45) == head + b"\x01\x00\x00\x00\x28" + F.MAGIC + key.raw


def test_fast_start_begins_with_server_key(relay):
    url, key = relay
    with dial(url) as s:
        s.sendall(fast_start_request("127.0.0.1"))
        assert read_exact(s, 45) == b"\x01\x00\x00\x00\x28" + F.MAGIC + key.raw


def test_probe_and_generate_204(relay):
    url, _ = relay
    resp, used = parse_response_head(http_get(url, "/derp/probe"))
    assert resp.status == 200 and resp.get("Access-Control-Allow-Origin") == "*"
    resp, _ = parse_response_head(http_get(url, "/derp/latency-check", method="POST",
                                           headers=[("Content-Length", "0")]))
    assert resp.status == 405
    resp, _ = parse_response_head(http_get(url, "/generate_204", headers=[("X-Tailscale-Challenge", "ts_x:1")]))
    assert resp.status == 204 and resp.get("X-Tailscale-Response") == "response ts_x:1"


def test_426_without_upgrade(relay):
    url, _ = relay
    raw = http_get(url, "/derp")
    resp, used = parse_response_head(raw)
    assert resp.status == 426 and raw[used:].strip() == b"DERP requires connection upgrade"


def test_first_frame_not_client_info_closes(relay):
    url, _ = relay
    with dial(url) as s:
        s.sendall(fast_start_request("127.0.0.1") + F.encode_ping(b"12345678"))
        read_exact(s, 45)
        assert wait_closed(s)


def test_self_send_not_here_and_peer_gone(relay):
    url, _ = relay
    nobody = PublicKey(bytes(range(32)))
    with RawDerpClient(url) as a, RawDerpClient(url) as b:
        a.send(a.public_key, b"self")
        assert a.recv_packet().data == b"self"
        for _ in range(5):
            a.send(nobody, "TS💬".encode() + bytes(60))
        gone = a.sync()
        while len(gone) < 3:  # derper writes these from goroutines: they may trail the Pong
            gone.append(a.recv(F.PeerGone, timeout=5))
        gone += a.sync()
        assert all((g.key, g.reason) == (nobody, F.PeerGoneReason.NOT_HERE) for g in gone)
        assert 3 <= len(gone) <= 4  # burst of 3, plus 1 if a second passed (rate 1/s)
        a.send(b.public_key, b"hi")
        assert b.recv_packet().src == a.public_key
        a.close()
        assert b.recv(F.PeerGone) == F.PeerGone(a.public_key, F.PeerGoneReason.DISCONNECTED)


def test_duplicate_key_last_writer(relay):
    url, _ = relay
    key = PrivateKey.generate()
    with RawDerpClient(url) as x, RawDerpClient(url, key) as old, RawDerpClient(url, key) as new:
        x.send(key.public_key, b"1")
        assert new.recv_packet().data == b"1"
        assert old.sync() == []
        x.send(key.public_key, b"2")
        assert old.recv_packet().data == b"2"
