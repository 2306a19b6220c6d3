"""The sans-IO client and server connections against each other, and against bad peers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpnet import frames as F
from derpnet.connection import (
    AcceptClient,
    AcceptUpgrade,
    ClientConnection,
    ClientHello,
    Connected,
    Hello,
    HttpRequest,
    Reject,
    ServerConnection,
    State,
    Upgrade,
    UpgradeRequest,
)
from derpnet.errors import HandshakeError, LocalProtocolError, ProtocolError, RemoteProtocolError, UpgradeError
from derpnet.handshake import seal_client_info
from derpnet.keys import PrivateKey

SERVER = PrivateKey.generate()
CLIENT = PrivateKey.generate()


def handshake(fast_start: bool = False):
    c, s = ClientConnection(CLIENT, "relay.example"), ServerConnection(SERVER)
    [up] = s.receive_data(c.send(Upgrade(fast_start)))
    assert isinstance(up, UpgradeRequest) and up.request.path == "/derp" and up.fast_start == fast_start
    out = s.send(AcceptUpgrade())
    assert s.receive_data(b"") == [] and c.receive_data(out) == [F.ServerKey(SERVER.public_key)]
    [hello] = s.receive_data(c.send(Hello()))
    assert hello == ClientHello(CLIENT.public_key, {"version": 2, "canackpings": True})
    [connected] = c.receive_data(s.send(AcceptClient()))
    assert connected == Connected(SERVER.public_key, {"version": 2})
    return c, s


def test_full_hello_and_packets_both_ways():
    c, s = handshake()
    assert c.state is State.CONNECTED and s.state is State.CONNECTED
    [sp] = s.receive_data(c.send(F.SendPacket(CLIENT.public_key, b"\x00payload")))
    assert sp == F.SendPacket(CLIENT.public_key, b"\x00payload")
    evs = c.receive_data(F.encode_recv_packet(SERVER.public_key, b"x") + F.encode_ping(b"pingpong"))
    assert evs == [F.RecvPacket(SERVER.public_key, b"x"), F.Ping(b"pingpong")]
    assert c.send(evs[1].response()) == F.encode_pong(b"pingpong")  # pings are answered by the caller


def test_101_response_is_exact_and_frames_follow_in_same_write():
    c, s = ClientConnection(CLIENT, "h"), ServerConnection(SERVER)
    s.receive_data(c.send(Upgrade()))
    out = s.send(AcceptUpgrade())
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
    out = s.send(AcceptUpgrade())
    assert out[:5] == bytes.fromhex("0100000028") and len(out) == 45
    assert s.receive_data(b"") == [ClientHello(CLIENT.public_key, {"version": 2, "canackpings": True})]


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
    c.send(Hello())
    bogus = F.encode_server_info(seal_client_info(PrivateKey.generate(), CLIENT.public_key))
    with pytest.raises(HandshakeError, match="does not open"):
        c.receive_data(bogus)


def test_server_rejects_first_frame_not_client_info_and_foreign_box():
    s = ServerConnection(SERVER)
    s.receive_data(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n")
    s.send(AcceptUpgrade())
    with pytest.raises(HandshakeError, match="not ClientInfo"):
        s.receive_data(F.encode_send_packet(CLIENT.public_key, b"x"))
    # ClientInfo claiming CLIENT's key but sealed by someone else: the box does not open.
    s = ServerConnection(SERVER)
    s.receive_data(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: derp\r\n\r\n")
    s.send(AcceptUpgrade())
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
    s.send(AcceptUpgrade())
    sealed = seal_client_info(CLIENT, SERVER.public_key, {"version": 2, "meshKey": "abc"})
    with pytest.raises(HandshakeError, match="meshKey"):
        s.receive_data(F.encode_client_info(CLIENT.public_key, sealed))
    # An empty meshKey is never sent.
    c = ClientConnection(CLIENT, "h", client_info={"version": 2, "meshKey": ""})
    c.receive_data(F.encode_server_key(SERVER.public_key))
    s = ServerConnection(SERVER)
    s.receive_data(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n")
    s.send(AcceptUpgrade())
    [hello] = s.receive_data(c.send(Hello()))
    assert "meshkey" not in hello.info


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_arbitrary_bytes_into_either_handshake_raise_only_derp_errors(data, chunk):
    for conn in (ClientConnection(CLIENT, "h"), ServerConnection(SERVER)):
        try:
            for i in range(0, len(data), chunk):
                conn.receive_data(data[i:i + chunk])
                if isinstance(conn, ServerConnection) and conn.state is State.AWAIT_ACCEPT:
                    conn.send(AcceptUpgrade())
                if isinstance(conn, ClientConnection) and conn.state is State.SEND_HELLO:
                    conn.send(Hello())
                if conn.state is State.CLOSED:
                    break
        except ProtocolError:  # HandshakeError included
            pass


# ---------------------------------------------------------------- send(event) and the waiting steps

def upgraded_server(request=b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n"):
    s = ServerConnection(SERVER)
    s.receive_data(request)
    s.send(AcceptUpgrade())
    return s


def test_client_stops_at_server_key_until_hello_is_sent():
    c = ClientConnection(CLIENT, "h")
    s = upgraded_server()
    s.receive_data(F.encode_client_info(CLIENT.public_key, seal_client_info(CLIENT, SERVER.public_key)))
    # ServerKey and ServerInfo (and a packet) arrive in one read: only the ServerKey comes out.
    stream = (b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + F.encode_server_key(SERVER.public_key)
              + s.send(AcceptClient()) + F.encode_recv_packet(SERVER.public_key, b"early"))
    assert c.receive_data(stream) == [F.ServerKey(SERVER.public_key)]
    assert c.state is State.SEND_HELLO and c.receive_data(b"") == []
    c.send(Hello())
    assert c.receive_data(b"") == [Connected(SERVER.public_key, {"version": 2}),
                                   F.RecvPacket(SERVER.public_key, b"early")]


def test_server_stops_at_client_hello_until_accepted():
    c = ClientConnection(CLIENT, "h")
    s = ServerConnection(SERVER)
    req = c.send(Upgrade(fast_start=True))
    ci = F.encode_client_info(CLIENT.public_key, seal_client_info(CLIENT, SERVER.public_key))
    [up] = s.receive_data(req + ci + F.encode_send_packet(SERVER.public_key, b"pipelined"))
    assert up.fast_start and s.state is State.AWAIT_ACCEPT
    assert s.receive_data(b"") == []  # nothing is judged before AcceptUpgrade
    assert s.send(AcceptUpgrade()) == F.encode_server_key(SERVER.public_key)  # fast start: no 101
    [hello] = s.receive_data(b"")
    assert isinstance(hello, ClientHello) and s.state is State.AWAIT_SERVER_INFO
    assert s.receive_data(b"") == []
    s.send(AcceptClient())
    assert s.receive_data(b"") == [F.SendPacket(SERVER.public_key, b"pipelined")]


def test_upgrade_request_headers():
    c = ClientConnection(CLIENT, "relay.example:8443", user_agent="ua/1")
    head = c.send(Upgrade()).decode()
    assert head.startswith("GET /derp HTTP/1.1\r\n") and head.endswith("\r\n\r\n")
    assert "Host: relay.example:8443\r\n" in head and "User-Agent: ua/1\r\n" in head
    assert "Upgrade: DERP\r\n" in head and "Derp-Fast-Start" not in head
    assert "Derp-Fast-Start: 1\r\n" in ClientConnection(CLIENT, "h").send(Upgrade(fast_start=True)).decode()


@pytest.mark.parametrize("event", [Hello(), F.SendPacket(CLIENT.public_key, b"x"), F.Ping(b"12345678"),
                                   AcceptUpgrade(), ClientHello(CLIENT.public_key)])
def test_client_refuses_what_its_state_does_not_allow(event):
    with pytest.raises(LocalProtocolError):
        ClientConnection(CLIENT, "h").send(event)


def test_client_refuses_a_second_upgrade_and_a_second_hello():
    c = ClientConnection(CLIENT, "h")
    c.send(Upgrade())
    c.receive_data(F.encode_server_key(SERVER.public_key))
    with pytest.raises(LocalProtocolError):
        c.send(Upgrade())
    c.send(Hello())
    with pytest.raises(LocalProtocolError):
        c.send(Hello())


@pytest.mark.parametrize("event", [AcceptUpgrade(), AcceptClient(), F.RecvPacket(CLIENT.public_key, b"x"),
                                   Upgrade()])
def test_server_refuses_what_its_state_does_not_allow(event):
    with pytest.raises(LocalProtocolError):
        ServerConnection(SERVER).send(event)


def test_server_sends_frames_once_connected():
    c, s = handshake()
    frames = [F.RecvPacket(CLIENT.public_key, b"x"), F.KeepAlive(), F.PeerGone(CLIENT.public_key, 1),
              F.Health("ok"), F.Restarting(1.5, 3.0)]
    assert c.receive_data(b"".join(s.send(f) for f in frames)) == frames


def test_reject_answers_http_and_closes():
    s = ServerConnection(SERVER)
    s.receive_data(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n")
    out = s.send(Reject(403, "not you"))
    assert out.startswith(b"HTTP/1.1 403 ") and out.endswith(b"\r\n\r\nnot you") and s.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        s.send(AcceptUpgrade())


def test_websocket_upgrade_is_an_upgrade_request():
    [up] = ServerConnection(SERVER).receive_data(
        b"GET /derp HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Protocol: derp\r\n\r\n")
    assert isinstance(up, UpgradeRequest) and not up.fast_start


def test_errors_before_the_connection_is_up_are_handshake_errors_on_both_sides():
    c = ClientConnection(CLIENT, "h")
    with pytest.raises(HandshakeError, match="exceeds limit"):
        c.receive_data(F.encode_frame(F.FrameType.SERVER_KEY, bytes(2000))[:5])
    s = upgraded_server()
    with pytest.raises(HandshakeError, match="exceeds limit"):
        s.receive_data(F.encode_frame(F.FrameType.CLIENT_INFO, bytes(300 << 10))[:5])
    with pytest.raises(HandshakeError):
        ServerConnection(SERVER).receive_data(b"\x16\x03\x01\x02\x00")


def test_errors_after_the_connection_is_up_are_plain_remote_protocol_errors():
    c, s = handshake()
    with pytest.raises(RemoteProtocolError) as ei:
        c.receive_data(F.encode_frame(F.FrameType.PING, b"short"))
    assert not isinstance(ei.value, HandshakeError) and c.state is State.CLOSED
    with pytest.raises(RemoteProtocolError) as ei:
        s.receive_data(F.encode_client_info(CLIENT.public_key, bytes(40)))
    assert not isinstance(ei.value, HandshakeError) and "second ClientInfo" in str(ei.value)


def test_eof_after_connected_is_fine_and_then_closed():
    c, _ = handshake()
    c.receive_eof()
    assert c.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        c.receive_data(b"x")


def test_unknown_frames_before_server_info_are_skipped():
    c = ClientConnection(CLIENT, "h")
    c.receive_data(F.encode_server_key(SERVER.public_key))
    c.send(Hello())
    s = upgraded_server()
    s.receive_data(F.encode_client_info(CLIENT.public_key, seal_client_info(CLIENT, SERVER.public_key)))
    out = F.encode_frame(0x7F, b"future") + s.send(AcceptClient())
    assert c.receive_data(out) == [Connected(SERVER.public_key, {"version": 2})]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200), st.integers(1, 200), st.booleans())
def test_handshake_survives_any_chunking(c_chunk, s_chunk, fast_start):
    """Both sides fed in arbitrary pieces, answering what they must: they connect, then carry packets."""
    c, s = ClientConnection(CLIENT, "h"), ServerConnection(SERVER)
    to_server, to_client = bytearray(c.send(Upgrade(fast_start))), bytearray()
    connected = hello = None
    for _ in range(10_000):
        if connected and hello:
            break
        if to_server:
            piece, to_server[:] = bytes(to_server[:s_chunk]), to_server[s_chunk:]
            for e in s.receive_data(piece):
                if isinstance(e, UpgradeRequest):
                    to_client += s.send(AcceptUpgrade())
                    assert s.receive_data(b"") == []
                elif isinstance(e, ClientHello):
                    hello = e
                    to_client += s.send(AcceptClient())
        if to_client:
            piece, to_client[:] = bytes(to_client[:c_chunk]), to_client[c_chunk:]
            events = c.receive_data(piece)
            for e in events:
                if isinstance(e, F.ServerKey):
                    to_server += c.send(Hello())
                    events.extend(c.receive_data(b""))
                elif isinstance(e, Connected):
                    connected = e
    assert connected == Connected(SERVER.public_key, {"version": 2})
    assert hello.key == CLIENT.public_key
    assert s.receive_data(c.send(F.SendPacket(SERVER.public_key, b"hi"))) == [F.SendPacket(SERVER.public_key, b"hi")]
