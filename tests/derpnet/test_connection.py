"""The sans-IO client and server connections against each other, and against bad peers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from derpnet import frames as F
from derpnet.connection import (ClientConnection, ClientHello, Connected, HttpRequest, ServerConnection, State,
                                UpgradeRequest)
from derpnet.errors import HandshakeError, ProtocolError, RemoteProtocolError, UpgradeError
from derpnet.handshake import seal_client_info
from derpnet.keys import PrivateKey

SERVER = PrivateKey.generate()
CLIENT = PrivateKey.generate()


def handshake(fast_start: bool = False):
    c, s = ClientConnection(CLIENT, "relay.example"), ServerConnection(SERVER)
    [up] = s.receive_data(c.initiate())
    assert isinstance(up, UpgradeRequest) and up.request.path == "/derp"
    out, evs = s.accept_upgrade(fast_start)
    assert evs == [] and c.receive_data(out) == []
    [hello] = s.receive_data(c.data_to_send())
    assert hello == ClientHello(CLIENT.public_key, {"version": 2, "canackpings": True})
    [connected] = c.receive_data(s.accept())
    assert connected == Connected(SERVER.public_key, {"version": 2})
    return c, s


def test_full_hello_and_packets_both_ways():
    c, s = handshake()
    assert c.state is State.CONNECTED and s.state is State.CONNECTED
    [sp] = s.receive_data(c.send_packet(CLIENT.public_key, b"\x00", b"payload"))
    assert sp == F.SendPacket(CLIENT.public_key, b"\x00payload")
    evs = c.receive_data(F.encode_recv_packet(SERVER.public_key, b"x") + F.encode_ping(b"pingpong"))
    assert evs == [F.RecvPacket(SERVER.public_key, b"x"), F.Ping(b"pingpong")]
    assert c.data_to_send() == F.encode_pong(b"pingpong")  # pings are answered


def test_101_response_is_exact_and_frames_follow_in_same_write():
    c, s = ClientConnection(CLIENT, "h"), ServerConnection(SERVER)
    s.receive_data(c.initiate())
    out, _ = s.accept_upgrade(fast_start=False)
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: DERP", b"Connection: Upgrade",
                                   b"Derp-Version: 2", b"Derp-Public-Key: " + SERVER.public_key.hex().encode()]
    assert rest == F.encode_server_key(SERVER.public_key)


def test_fast_start_sends_only_the_40_byte_server_key():
    s = ServerConnection(SERVER)
    req = (b"GET /derp HTTP/1.1\r\nHost: localhost\r\nUser-Agent: ntnj/derpnet\r\nUpgrade: DERP\r\n"
           b"Connection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n")
    # Go sends ClientInfo right behind the request in the same segment.
    ci = F.encode_client_info(CLIENT.public_key, seal_client_info(CLIENT, SERVER.public_key))
    [up] = s.receive_data(req + ci)
    assert up.fast_start
    out, evs = s.accept_upgrade(True)
    assert out[:5] == bytes.fromhex("0100000028") and len(out) == 45
    assert evs == [ClientHello(CLIENT.public_key, {"version": 2, "canackpings": True})]


@pytest.mark.parametrize("reply, status", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>hello</html>", 200),
    (b"HTTP/1.0 404 Not Found\r\n\r\nnope", 404),
    (b"HTTP/1.1 426 Upgrade Required\r\n\r\nDERP requires connection upgrade", 426),
])
def test_client_reports_non_101(reply, status):
    c = ClientConnection(CLIENT, "h")
    with pytest.raises(UpgradeError, match=f"HTTP {status}") as info:
        c.receive_data(reply)
    assert info.value.status == status and c.state is State.CLOSED


def test_client_rejects_html_without_http_and_truncation():
    c = ClientConnection(CLIENT, "h")
    with pytest.raises(HandshakeError, match="neither an HTTP response nor a DERP ServerKey"):
        c.receive_data(b"<html><body>hi</body></html>")
    c = ClientConnection(CLIENT, "h")
    c.receive_data(F.encode_server_key(SERVER.public_key)[:20])
    with pytest.raises(HandshakeError, match="during the handshake"):
        c.receive_eof()


def test_client_rejects_server_info_that_does_not_open():
    c = ClientConnection(CLIENT, "h")
    c.receive_data(F.encode_server_key(SERVER.public_key))
    bogus = F.encode_server_info(seal_client_info(PrivateKey.generate(), CLIENT.public_key))
    with pytest.raises(HandshakeError, match="does not open"):
        c.receive_data(bogus)


def test_server_rejects_first_frame_not_client_info_and_foreign_box():
    s = ServerConnection(SERVER)
    s.receive_data(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n")
    s.accept_upgrade(False)
    with pytest.raises(RemoteProtocolError, match="not ClientInfo"):
        s.receive_data(F.encode_send_packet(CLIENT.public_key, b"x"))
    # ClientInfo claiming CLIENT's key but sealed by someone else: the box does not open.
    s = ServerConnection(SERVER)
    s.receive_data(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: derp\r\n\r\n")
    s.accept_upgrade(False)
    forged = F.encode_client_info(CLIENT.public_key, seal_client_info(PrivateKey.generate(), SERVER.public_key))
    with pytest.raises(HandshakeError, match="does not open"):
        s.receive_data(forged)
    assert s.state is State.CLOSED


def test_server_classifies_plain_http_and_garbage():
    [ev] = ServerConnection(SERVER).receive_data(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(ev, HttpRequest) and ev.request.path == "/derp/probe"
    [ev] = ServerConnection(SERVER).receive_data(b"GET /derp HTTP/1.1\r\nUpgrade: h2c\r\n\r\n")
    assert isinstance(ev, HttpRequest)  # the relay answers 426
    with pytest.raises(RemoteProtocolError):
        ServerConnection(SERVER).receive_data(b"\x16\x03\x01\x02\x00")  # TLS to a plain port
    s = ServerConnection(SERVER)
    with pytest.raises(RemoteProtocolError, match="larger than"):
        for _ in range(20):
            s.receive_data(b"GET / HTTP/1.1\r\nX: " + b"a" * 1000)


def test_mesh_key_rules():
    s = ServerConnection(SERVER)
    s.receive_data(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n")
    s.accept_upgrade(False)
    sealed = seal_client_info(CLIENT, SERVER.public_key, {"version": 2, "meshKey": "abc"})
    with pytest.raises(HandshakeError, match="meshKey"):
        s.receive_data(F.encode_client_info(CLIENT.public_key, sealed))
    # An empty meshKey is never sent.
    c = ClientConnection(CLIENT, "h", client_info={"version": 2, "meshKey": ""})
    c.receive_data(F.encode_server_key(SERVER.public_key))
    s = ServerConnection(SERVER)
    s.receive_data(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n")
    s.accept_upgrade(False)
    [hello] = s.receive_data(c.data_to_send())
    assert "meshkey" not in hello.info


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_arbitrary_bytes_into_either_handshake_raise_only_derp_errors(data, chunk):
    for conn in (ClientConnection(CLIENT, "h"), ServerConnection(SERVER)):
        try:
            for i in range(0, len(data), chunk):
                conn.receive_data(data[i:i + chunk])
                if isinstance(conn, ServerConnection) and conn.state is State.AWAIT_ACCEPT:
                    conn.accept_upgrade(False)
                if conn.state is State.CLOSED:
                    break
        except ProtocolError:
            pass
        except HandshakeError:
            pass
