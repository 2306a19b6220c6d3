"""The frame codec: exact bytes, limits checked before allocation, skipping, and properties."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpnet import frames as F
from derpnet.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from derpnet.keys import PrivateKey, PublicKey

K1 = PrivateKey.generate().public_key
K2 = PrivateKey.generate().public_key


def decode_all(role: F.Role, data: bytes, chunk: int = 0) -> list:
    d = F.FrameDecoder(role)
    out = []
    if chunk:
        for i in range(0, len(data), chunk):
            d.feed(data[i:i + chunk])
            out.extend(d.events())
    else:
        d.feed(data)
        out.extend(d.events())
    return out


def test_documented_hex_examples():
    assert F.encode_keep_alive() == bytes.fromhex("0600000000")
    assert F.encode_note_preferred(True) == bytes.fromhex("070000000101")
    assert F.encode_ping(b"12345678") == bytes.fromhex("1200000008") + b"12345678"
    assert F.encode_server_key(K1) == bytes.fromhex("0100000028") + bytes.fromhex("44455250F09F9491") + K1.raw
    assert F.encode_peer_gone(K1, F.PeerGoneReason.NOT_HERE) == bytes.fromhex("0800000021") + K1.raw + b"\x01"
    assert F.encode_restarting(1, 5) == bytes.fromhex("150000000800 0003E8 00001388".replace(" ", ""))
    assert F.encode_send_packet(K2, b"\x00", b"abc") == b"\x04" + struct.pack(">I", 36) + K2.raw + b"\x00abc"


def test_client_decodes_server_frames_byte_by_byte():
    stream = (F.encode_server_key(K1) + F.encode_recv_packet(K2, b"hello") + F.encode_keep_alive()
              + F.encode_peer_gone(K2) + F.encode_ping(b"abcdefgh") + F.encode_health("cloned key")
              + F.encode_restarting(1.5, 3) + F.encode_peer_present(K2, port=7, flags=3))
    got = decode_all(F.Role.CLIENT, stream, chunk=1)
    assert got == [F.ServerKey(K1), F.RecvPacket(K2, b"hello"), F.KeepAlive(), F.PeerGone(K2, 0),
                   F.Ping(b"abcdefgh"), F.Health("cloned key"), F.Restarting(1.5, 3.0),
                   F.PeerPresent(K2, bytes(16), 7, 3)]


def test_old_short_forms_are_tolerated():
    # PeerGone without reason (old servers), PeerPresent with key only, ServerKey with extra bytes.
    data = (F.encode_frame(F.FrameType.PEER_GONE, K1.raw) + F.encode_frame(F.FrameType.PEER_PRESENT, K1.raw)
            + F.encode_frame(F.FrameType.SERVER_KEY, F.MAGIC, K2.raw, b"future"))
    assert decode_all(F.Role.CLIENT, data) == [F.PeerGone(K1, 0), F.PeerPresent(K1), F.ServerKey(K2)]


def test_unknown_and_wrong_role_frames_are_skipped_without_buffering():
    d = F.FrameDecoder(F.Role.CLIENT)
    d.feed(F.encode_frame(0x0C, b"x" * 10)[:8])  # unknown type, partial payload
    assert list(d.events()) == [F.UnknownFrame(0x0C, 10)]
    assert d.buffered == 0
    d.feed(b"x" * 7 + F.encode_keep_alive())  # the rest of it, then a real frame
    assert list(d.events()) == [F.KeepAlive()]
    # A SendPacket is a client->server frame: a client skips it.
    assert decode_all(F.Role.CLIENT, F.encode_send_packet(K1, b"x")) == [F.UnknownFrame(F.FrameType.SEND_PACKET, 33)]


def test_oversized_length_rejected_on_header_before_allocation():
    d = F.FrameDecoder(F.Role.SERVER)
    d.feed(b"\x04\xff\xff\xff\xff")  # 4 GiB SendPacket
    with pytest.raises(RemoteProtocolError, match="exceeds limit"):
        list(d.events())
    with pytest.raises(RemoteProtocolError):
        d.feed(b"more")  # the decoder stays dead
    d = F.FrameDecoder(F.Role.CLIENT)
    d.feed(b"\x0c\xff\xff\xff\xff")  # unknown type, but absurd length
    with pytest.raises(RemoteProtocolError):
        list(d.events())


def test_packet_limits():
    assert decode_all(F.Role.SERVER, F.encode_send_packet(K1, b"\0" * F.MAX_PACKET_SIZE))[0].data == b"\0" * 65536
    with pytest.raises(LocalProtocolError, match="65537 bytes exceeds"):
        F.encode_send_packet(K1, b"\0", b"\0" * F.MAX_PACKET_SIZE)
    too_big = F.encode_frame(F.FrameType.SEND_PACKET, K1.raw, b"\0" * (F.MAX_PACKET_SIZE + 1))
    with pytest.raises(RemoteProtocolError):
        decode_all(F.Role.SERVER, too_big)


@pytest.mark.parametrize("role, frame, match", [
    (F.Role.CLIENT, F.encode_frame(F.FrameType.SERVER_KEY, b"NOTMAGIC" + K1.raw), "magic"),
    (F.Role.CLIENT, F.encode_frame(F.FrameType.SERVER_KEY, F.MAGIC), "shorter"),
    (F.Role.SERVER, F.encode_frame(F.FrameType.NOTE_PREFERRED, b"\x01\x01"), "expected 1"),
    (F.Role.SERVER, F.encode_frame(F.FrameType.SEND_PACKET, b"short"), "shorter"),
    (F.Role.SERVER, F.encode_frame(F.FrameType.PING, b"1234"), "shorter"),
    (F.Role.SERVER, F.encode_frame(F.FrameType.WATCH_CONNS, b"x"), "payload"),
    (F.Role.SERVER, F.encode_frame(F.FrameType.CLOSE_PEER, K1.raw + b"x"), "expected 32"),
])
def test_malformed_known_frames_raise(role, frame, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode_all(role, frame)


def test_short_recv_packet_dropped_like_go():
    d = F.FrameDecoder(F.Role.CLIENT)
    d.feed(F.encode_frame(F.FrameType.RECV_PACKET, b"tiny") + F.encode_keep_alive())
    assert list(d.events()) == [F.KeepAlive()]
    assert d.frames_dropped == 1


keys = st.binary(min_size=32, max_size=32).map(PublicKey)
client_frames = st.one_of(
    keys.map(F.ServerKey),
    st.binary(min_size=24, max_size=200).map(F.ServerInfo),
    st.builds(F.RecvPacket, keys, st.binary(max_size=2000)),
    st.just(F.KeepAlive()),
    st.builds(F.PeerGone, keys, st.sampled_from([0, 1])),
    st.binary(min_size=8, max_size=8).map(F.Ping),
    st.binary(min_size=8, max_size=8).map(F.Pong),
    st.text(max_size=50).map(F.Health),
    st.builds(F.Restarting, st.integers(0, 10**6).map(lambda x: x / 1000),
              st.integers(0, 10**6).map(lambda x: x / 1000)),
)


def encode_client_frame(ev) -> bytes:
    return {
        F.ServerKey: lambda e: F.encode_server_key(e.key),
        F.ServerInfo: lambda e: F.encode_server_info(e.sealed),
        F.RecvPacket: lambda e: F.encode_recv_packet(e.src, e.data),
        F.KeepAlive: lambda e: F.encode_keep_alive(),
        F.PeerGone: lambda e: F.encode_peer_gone(e.key, e.reason),
        F.Ping: lambda e: F.encode_ping(e.data),
        F.Pong: lambda e: F.encode_pong(e.data),
        F.Health: lambda e: F.encode_health(e.problem),
        F.Restarting: lambda e: F.encode_restarting(e.reconnect_in, e.try_for),
    }[type(ev)](ev)


@settings(max_examples=300, deadline=None)
@given(st.lists(client_frames, max_size=12), st.integers(1, 64))
def test_round_trip_any_chunking(evs, chunk):
    wire = b"".join(encode_client_frame(e) for e in evs)
    assert decode_all(F.Role.CLIENT, wire, chunk=chunk) == evs


server_frames = st.one_of(
    st.builds(F.SendPacket, keys, st.binary(max_size=2000)),
    st.builds(F.NotePreferred, st.booleans()),
    st.binary(min_size=8, max_size=8).map(F.Ping),
    st.builds(F.ClientInfo, keys, st.binary(min_size=24, max_size=100)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(server_frames, max_size=12))
def test_server_round_trip(evs):
    enc = {
        F.SendPacket: lambda e: F.encode_send_packet(e.dst, e.data),
        F.NotePreferred: lambda e: F.encode_note_preferred(e.preferred),
        F.Ping: lambda e: F.encode_ping(e.data),
        F.ClientInfo: lambda e: F.encode_client_info(e.key, e.sealed),
    }
    wire = b"".join(enc[type(e)](e) for e in evs)
    assert decode_all(F.Role.SERVER, wire, chunk=7) == evs


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(list(F.Role)), st.binary(max_size=3000), st.integers(1, 100))
def test_arbitrary_bytes_raise_only_protocol_errors(role, data, chunk):
    d = F.FrameDecoder(role)
    try:
        for i in range(0, len(data), chunk):
            d.feed(data[i:i + chunk])
            for ev in d.events():
                assert isinstance(ev, F.Frame)
    except ProtocolError:
        pass
    assert d.buffered <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(server_frames, st.binary(max_size=40).map(lambda b: ("unknown", b))), max_size=12),
       st.lists(st.integers(1, 300), min_size=1, max_size=8))
def test_decode_from_a_reused_view_equals_feed(items, cuts):
    """decode() reads whole frames straight out of the caller's buffer and keeps only the tail:
    the same frames as feed() + events(), however the bytes are cut, with the caller's buffer
    overwritten between calls (as the relay's shared receive buffer is)."""
    enc = {
        F.SendPacket: lambda e: F.encode_send_packet(e.dst, e.data),
        F.NotePreferred: lambda e: F.encode_note_preferred(e.preferred),
        F.Ping: lambda e: F.encode_ping(e.data),
        F.ClientInfo: lambda e: F.encode_client_info(e.key, e.sealed),
    }
    wire = b"".join(F.encode_frame(0x7E, e[1]) if isinstance(e, tuple) else enc[type(e)](e) for e in items)
    expected = decode_all(F.Role.SERVER, wire)
    d = F.FrameDecoder(F.Role.SERVER)
    scratch = bytearray(400)
    got, i, k = [], 0, 0
    while i < len(wire):
        n = min(cuts[k % len(cuts)], len(wire) - i)
        k += 1
        scratch[:n] = wire[i:i + n]
        got += d.decode(memoryview(scratch)[:n])
        scratch[:] = bytes(len(scratch))  # the caller reuses its buffer: nothing may point into it
        i += n
    assert got == expected
    assert d.buffered == 0


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(list(F.Role)), st.binary(max_size=3000), st.integers(1, 100))
def test_arbitrary_bytes_through_decode_raise_only_protocol_errors(role, data, chunk):
    d = F.FrameDecoder(role)
    try:
        for i in range(0, len(data), chunk):
            for ev in d.decode(memoryview(data)[i:i + chunk]):
                assert isinstance(ev, F.Frame)
    except ProtocolError:
        pass
    assert d.buffered <= len(data)
