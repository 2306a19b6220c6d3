"""The sans-IO WebSocket codec (derpnet.websocket): handshake, framing, masking, control
frames and the limits, without sockets."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpnet import websocket as W
from derpnet.errors import UpgradeError
from derpnet.http11 import parse_request_head, parse_response_head


def pair(max_message: int = 1 << 20):
    return W.WebSocket(client=True), W.WebSocket(client=False, max_message=max_message)


def test_accept_key_is_the_rfc_example():
    assert W.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_round_trip():
    key = W.new_key()
    req, used = parse_request_head(W.client_request("relay:443", key))
    assert W.is_derp_websocket(req)
    resp, _ = parse_response_head(W.server_response(req))
    W.check_response(resp, key)  # no error
    with pytest.raises(UpgradeError, match="Sec-WebSocket-Accept"):
        W.check_response(resp, W.new_key())


@pytest.mark.parametrize("header, value, status", [
    ("Sec-WebSocket-Key", "not base64!", 400),
    ("Sec-WebSocket-Key", "c2hvcnQ=", 400),  # 5 bytes, not 16
    ("Sec-WebSocket-Version", "8", 426),
])
def test_server_refuses_bad_handshakes(header, value, status):
    raw = W.client_request("h", W.new_key()).replace(
        (header + ": ").encode(), (header + ": " + value + "\r\nX-Old: ").encode())
    req, _ = parse_request_head(raw)
    with pytest.raises(UpgradeError) as e:
        W.server_response(req)
    assert e.value.status == status


def test_old_clients_bare_websocket_upgrade_is_raw_derp():
    req, _ = parse_request_head(b"GET /derp HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\n\r\n")
    assert not W.is_derp_websocket(req)


def test_client_frames_are_masked_and_split_at_32k():
    client, server = pair()
    data = os.urandom(100_000)
    wire = client.send_data(data)
    assert wire[1] & 0x80  # masked
    assert data[:1000] not in wire
    got, controls = server.receive_data(wire)
    assert got == data and controls == []
    assert server.max_message == 1 << 20 and len(wire) == 100_000 + 4 * (2 + 2 + 4)  # 4 messages of ≤ 32 KiB


def test_stream_bytes_survive_any_split():
    client, server = pair()
    data = os.urandom(70_000)
    wire = client.send_data(data) + client.send_data(b"tail")
    out = bytearray()
    for i in range(0, len(wire), 997):
        got, _ = server.receive_data(wire[i:i + 997])
        out += got
    assert bytes(out) == data + b"tail"


def test_server_frames_unmasked_and_large():
    client, server = pair()
    server.max_send = 1 << 17
    data = os.urandom(1 << 17)
    wire = server.send_data(data)
    assert not wire[1] & 0x80 and wire[1] & 0x7F == 127  # one message, 64-bit length
    assert client.receive_data(wire) == (data, [])


def test_masking_rules_are_enforced():
    client, server = pair()
    with pytest.raises(W.WebSocketError, match="not masked"):
        server.receive_data(W.WebSocket(client=False).send_data(b"x"))
    with pytest.raises(W.WebSocketError, match="masked"):
        client.receive_data(W.WebSocket(client=True).send_data(b"x"))


def test_ping_pong_and_close():
    client, server = pair()
    _, (ping,) = server.receive_data(client.send(W.WsPing(b"12345678")))
    assert ping == W.WsPing(b"12345678")
    _, (pong,) = client.receive_data(server.send(ping.response()))
    assert pong == W.WsPong(b"12345678")
    data, (close,) = server.receive_data(client.send_data(b"last") + client.close(1001, "bye"))
    assert data == b"last" and close == W.WsClose(1001, "bye") and server.closed
    _, (bare,) = W.WebSocket(client=False).receive_data(bytes([0x88, 0x80]) + b"\0\0\0\0")
    assert bare.code == 1005


def _frame(b0: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    head = bytes([b0]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 127]) + struct.pack(">Q", n))
    return head + b"\0\0\0\0" + payload  # zero mask: payload as is


@pytest.mark.parametrize("wire, code, match", [
    (_frame(0x81, b"text"), W.CLOSE_UNSUPPORTED, "text message"),
    (_frame(0x82, b"", length=1 << 40), W.CLOSE_TOO_BIG, "message over"),  # judged on the header alone
    (_frame(0xC2, b"x"), W.CLOSE_PROTOCOL, "reserved bits"),
    (_frame(0x80, b"x"), W.CLOSE_PROTOCOL, "continuation frame outside"),
    (_frame(0x02, b"x") + _frame(0x82, b"y"), W.CLOSE_PROTOCOL, "before the last one ended"),
    (_frame(0x89, b"p" * 126), W.CLOSE_PROTOCOL, "control frame"),
    (_frame(0x09, b"p"), W.CLOSE_PROTOCOL, "control frame"),
    (_frame(0x8B, b""), W.CLOSE_PROTOCOL, "unknown control opcode"),
    (_frame(0x83, b""), W.CLOSE_PROTOCOL, "unknown data opcode"),
    (_frame(0x88, b"\x03"), W.CLOSE_PROTOCOL, "1-byte"),
])
def test_broken_frames_close_with_the_rfc_code(wire, code, match):
    server = W.WebSocket(client=False, max_message=32768)
    with pytest.raises(W.WebSocketError, match=match) as e:
        server.receive_data(wire)
    assert e.value.code == code


def test_fragmented_message_counts_against_the_limit():
    server = W.WebSocket(client=False, max_message=10)
    assert server.receive_data(_frame(0x02, b"12345") + _frame(0x80, b"678")) == (b"12345678", [])
    with pytest.raises(W.WebSocketError) as e:
        server.receive_data(_frame(0x02, b"12345") + _frame(0x00, b"678") + _frame(0x80, b"abc"))
    assert e.value.code == W.CLOSE_TOO_BIG


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=3000), max_size=8), max_send=st.integers(1, 2048),
       cuts=st.lists(st.integers(1, 500), max_size=30), from_client=st.booleans())
def test_any_writes_any_reads_same_stream(chunks, max_send, cuts, from_client):
    """Whatever the writes, the message size and the read boundaries: the same byte stream."""
    sender = W.WebSocket(client=from_client, max_send=max_send)
    receiver = W.WebSocket(client=not from_client)
    wire = b"".join(sender.send_data(c) for c in chunks)
    out, pos = bytearray(), 0
    for n in [*cuts, len(wire)]:
        got, controls = receiver.receive_data(wire[pos:pos + n])
        assert controls == []
        out += got
        pos += n
    assert bytes(out) == b"".join(chunks) and receiver.buffered == 0


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), cut=st.integers(1, 64), client=st.booleans())
def test_any_bytes_only_websocket_errors(data, cut, client):
    """Arbitrary input: data, control events or a WebSocketError, never another exception,
    and never more held than was given."""
    ws = W.WebSocket(client=client, max_message=256)
    try:
        for i in range(0, len(data), cut):
            got, controls = ws.receive_data(data[i:i + cut])
            assert isinstance(got, bytes)
            assert all(isinstance(c, (W.WsPing, W.WsPong, W.WsClose)) for c in controls)
            assert ws.buffered <= len(data)
    except W.WebSocketError as e:
        assert e.code in (W.CLOSE_PROTOCOL, W.CLOSE_UNSUPPORTED, W.CLOSE_TOO_BIG)
