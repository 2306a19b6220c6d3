"""DERP over WebSocket end to end: our client (ws://, wss://) with our relay and with
Tailscale's derper, the fallback to WebSocket behind a front that refuses plain upgrades,
and our relay's answers to a misbehaving WebSocket client."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from derpnet import derpmap
from derpnet import websocket as W
from derpnet.client import DerpClient
from derpnet.errors import UpgradeError
from derpnet.http11 import parse_response_head
from derpnet.keys import PrivateKey
from tests.conftest import missing_go_peer
from tests.httpfront import WebSocketOnlyFront
from tests.interop_peers import GoDerper, derper_path, skip_reason
from tests.rawderp import read_to_eof, wait_closed
from tests.relays import OurRelay


class Sink:
    def __init__(self, want: int) -> None:
        self.got: list[bytes] = []
        self.want = want
        self.done = threading.Event()

    def __call__(self, src, data: bytes) -> None:
        self.got.append(data)
        if len(self.got) >= self.want:
            self.done.set()


def exchange(url: str, ssl_context=None, **opts) -> tuple[DerpClient, DerpClient]:
    """Two clients over `url`; a 64 KiB packet, a small one and a 40 KB one from a to b, in order."""
    packets = [os.urandom(65536), b"small", os.urandom(40000)]
    sink = Sink(len(packets))
    b = DerpClient(url, PrivateKey.generate(), ssl_context=ssl_context, on_packet=sink, **opts).connect()
    a = DerpClient(url, PrivateKey.generate(), ssl_context=ssl_context, **opts).connect()
    try:
        for p in packets:
            a.send_packet(b.public_key, p)
        assert sink.done.wait(10), f"got {len(sink.got)} of {len(packets)}"
        assert sink.got == packets
    finally:
        a.close()
        b.close()
    return a, b


def test_ws_and_wss_with_our_relay(tmp_path):
    with OurRelay(workdir=str(tmp_path / "plain")) as r:
        a, _ = exchange(r.url.replace("http://", "ws://"))
        assert a.url.startswith("ws://") and a.websocket is True
    with OurRelay(tls=True, workdir=str(tmp_path / "tls")) as r:
        exchange(r.url.replace("https://", "wss://"), ssl_context=r.ssl_context())
        exchange(r.url, ssl_context=r.ssl_context(), websocket=True)  # the option, same thing


@pytest.mark.interop
def test_our_client_over_websocket_to_derper(tmp_path):
    if derper_path() is None:
        missing_go_peer(skip_reason("derper"))
    with GoDerper(tmp_path) as d:
        exchange(d.url.replace("http://", "ws://"))


def test_falls_back_to_websocket_when_the_plain_upgrade_is_refused(tmp_path):
    with OurRelay(workdir=str(tmp_path)) as r, WebSocketOnlyFront(("127.0.0.1", r.port)) as front:
        exchange(front.url)  # default: raw DERP first, then WebSocket
        assert front.refused == 2  # each client's plain upgrade was refused once
        with pytest.raises(UpgradeError, match="403") as e:
            DerpClient(front.url, PrivateKey.generate(), websocket=False).connect()
        assert e.value.status == 403


def test_refused_both_ways_reports_the_plain_refusal(tmp_path):
    with OurRelay(workdir=str(tmp_path)) as r:
        # a path that is not DERP at all: the relay's 426 for GET /derp without an upgrade is
        # not reachable by a client; use a front that refuses everything instead
        srv = socket.create_server(("127.0.0.1", 0))
        port = srv.getsockname()[1]

        def refuse_all():
            for _ in range(2):
                c, _ = srv.accept()
                with c:
                    c.recv(4096)
                    c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        t = threading.Thread(target=refuse_all, name="refuse-all", daemon=True)
        t.start()
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(UpgradeError, match="HTTP 404") as e:
            DerpClient(f"http://127.0.0.1:{port}", PrivateKey.generate()).connect()
        assert "instead of switching to DERP" in str(e.value)  # the plain attempt's error, not the WebSocket one
        t.join(10)
        assert len(os.listdir("/proc/self/fd")) == fds  # both attempts' sockets closed
        srv.close()
        assert r.proc.poll() is None


def _ws_connect(port: int) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), 5)
    key = W.new_key()
    s.sendall(W.client_request("127.0.0.1", key))
    buf = b""
    while (parsed := parse_response_head(buf)) is None:
        buf += s.recv(4096)
    resp, used = parsed
    W.check_response(resp, key)
    return s, buf[used:]


def test_relay_sends_server_key_in_a_binary_message_and_answers_pings(tmp_path):
    with OurRelay(workdir=str(tmp_path)) as r:
        s, rest = _ws_connect(r.port)
        with s:
            ws = W.WebSocket(client=True)
            got = b""
            while len(got) < 45:
                data, _ = ws.receive_data(rest or s.recv(4096))
                rest = b""
                got += data
            assert got[:5] == b"\x01\x00\x00\x00\x28" and got[5:45] == b"DERP\xf0\x9f\x94\x91" + r.public_key.raw[:32]
            s.sendall(ws.send(W.WsPing(b"hello")))
            controls: list = []
            while not controls:
                _, controls = ws.receive_data(s.recv(4096))
            assert controls == [W.WsPong(b"hello")]


@pytest.mark.parametrize("bad, code", [
    (bytes([0x81, 0x84]) + b"\0\0\0\0" + b"text", W.CLOSE_UNSUPPORTED),
    (bytes([0x82, 0xFE]) + (32769).to_bytes(2, "big") + b"\0\0\0\0", W.CLOSE_TOO_BIG),  # derper's limit
    (W.WebSocket(client=False).send_data(b"unmasked"), W.CLOSE_PROTOCOL),
])
def test_relay_closes_a_broken_websocket_with_its_code(tmp_path, bad, code):
    with OurRelay(workdir=str(tmp_path)) as r:
        s, rest = _ws_connect(r.port)
        with s:
            s.sendall(bad)
            data, controls = W.WebSocket(client=True).receive_data(rest + read_to_eof(s))
            assert data[:1] == b"\x01"  # the ServerKey came first
            assert controls == [W.WsClose(code)]


def test_cli_relay_urls_may_be_websocket():
    assert derpmap.resolve("wss://relay.example:8443").hosts == ("wss://relay.example:8443",)
    assert derpmap.resolve("ws://127.0.0.1:3340/derp").hosts == ("ws://127.0.0.1:3340",)


def test_packet_conn_over_websocket(tmp_path):
    import derpnet

    with OurRelay(workdir=str(tmp_path)) as r:
        with derpnet.listen_packet(r.url, websocket=True, direct=False) as a, \
                derpnet.listen_packet(r.url.replace("http://", "ws://"), direct=False) as b:
            a.write_to(b"over websocket", b.local_addr())
            b.settimeout(10)
            data, src = b.read_from()
            assert (data, src) == (b"over websocket", a.local_addr())


def test_partial_websocket_frames_count_against_the_pre_hello_budget():
    """Bytes of an unfinished WebSocket frame before the hello are held like a partial ClientInfo:
    past the relay's shared pre-hello budget such connections are dropped."""
    from derpnet.server import DerpServer

    with DerpServer(preauth_buffer_limit=64 << 10) as srv:
        socks = []
        try:
            for _ in range(4):
                s, _ = _ws_connect(srv.port)
                socks.append(s)
                # a binary frame announcing 30,000 bytes (masked), of which 20,000 are sent
                s.sendall(bytes([0x82, 0xFE]) + (30000).to_bytes(2, "big") + b"\0\0\0\0" + bytes(20000))
            closed = [_closed_within(s, 2) for s in socks]
            assert any(closed) and not all(closed), closed
            assert srv.stats()["preauth_drops"] >= 1
        finally:
            for s in socks:
                s.close()


def _closed_within(s: socket.socket, seconds: float) -> bool:
    try:
        return wait_closed(s, seconds)
    except TimeoutError:
        return False
