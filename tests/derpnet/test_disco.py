"""The disco codec (derpnet.disco): exact plaintext bytes, disco.go's leniency, boxes that only
open for the right pair of node keys, and properties. Pure: no sockets, no threads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpnet import disco as D
from derpnet.disco import CallMeMaybe, DiscoBox, DiscoError, Ping, Pong
from derpnet.keys import PrivateKey, PublicKey

A, B, C = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
BOX_A, BOX_B, BOX_C = DiscoBox(A), DiscoBox(B), DiscoBox(C)

TX = bytes(range(12))
KEY = PublicKey(bytes(range(32, 64)))
V4_1234 = "00000000000000000000ffff01020304"

# curve25519 points of small order (and their non-canonical encodings): no shared key exists
LOW_ORDER = [bytes.fromhex(h) for h in (
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
)]


# ---------------------------------------------------------------- plaintext bytes, by hand

@pytest.mark.parametrize("msg, hex_", [
    (Ping(TX, KEY), "0100" + TX.hex() + bytes(range(32, 64)).hex()),
    (Ping(TX, KEY, padding=3), "0100" + TX.hex() + bytes(range(32, 64)).hex() + "000000"),
    (Pong(b"\xaa" * 12, ("1.2.3.4", 0x1234)), "0200" + "aa" * 12 + V4_1234 + "1234"),
    (Pong(b"\xaa" * 12, ("2001:db8::1", 443)), "0200" + "aa" * 12 + "20010db8000000000000000000000001" + "01bb"),
    (CallMeMaybe(()), "0300"),
    (CallMeMaybe((("10.0.0.1", 41641), ("::1", 1))),
     "0300" + "00000000000000000000ffff0a000001" + "a2a9" + "00000000000000000000000000000001" + "0001"),
])
def test_encode_exact_bytes_and_back(msg, hex_):
    assert D.encode_message(msg).hex() == hex_
    assert D.decode_message(bytes.fromhex(hex_)) == msg


def test_constants():
    assert D.MAGIC == b"TS\xf0\x9f\x92\xac" and D.HEADER_LEN == 62
    assert D.PING_MIN_SIZE == 62 + 16 + 2 + 12 + 32 == 124
    assert len(D.new_tx_id()) == 12 and D.new_tx_id() != D.new_tx_id()


# ---------------------------------------------------------------- decoding: as lenient as disco.go

def test_ping_version_ignored_and_trailing_bytes_are_padding():
    body = TX + KEY.raw + b"\x01\x02"
    assert D.decode_message(b"\x01\x07" + body) == Ping(TX, KEY, padding=2)


def test_pong_version_and_trailing_bytes_ignored():
    body = TX + bytes.fromhex(V4_1234) + b"\x00\x05" + b"more"
    assert D.decode_message(b"\x02\x09" + body) == Pong(TX, ("1.2.3.4", 5))


@pytest.mark.parametrize("plain", [
    b"\x03\x01" + bytes(18),          # version not 0
    b"\x03\x00" + bytes(17),          # not a multiple of 18
    b"\x03\x00" + bytes(18 * 2 + 1),
])
def test_call_me_maybe_odd_forms_carry_no_endpoints(plain):
    assert D.decode_message(plain) == CallMeMaybe(())


def test_ipv4_mapped_decodes_to_ipv4_and_constructors_normalise():
    assert D.decode_message(b"\x03\x00" + bytes.fromhex(V4_1234) + b"\x00\x07").endpoints == (("1.2.3.4", 7),)
    assert Pong(TX, ("::ffff:1.2.3.4", 7, 0, 0)).src == ("1.2.3.4", 7)  # a dual-stack socket's address
    assert Pong(TX, ("2001:DB8:0::1", 7)).src == ("2001:db8::1", 7)
    assert CallMeMaybe([("fe80::1%eth0", 7)]).endpoints == (("fe80::1", 7),)  # no zone on the wire


@pytest.mark.parametrize("plain, message", [
    (b"", "short"),
    (b"\x01", "short"),
    (b"\x01\x00" + bytes(11), "short disco ping"),
    (b"\x01\x00" + bytes(12), "without a node key"),      # Tailscale <= 1.16: refused here
    (b"\x01\x00" + bytes(43), "without a node key"),
    (b"\x02\x00" + bytes(29), "short disco pong"),
    (b"\x00\x00" + bytes(40), "unknown disco message type 0x00"),
    (b"\x04\x00" + bytes(72), "unsupported disco message type 0x04"),
    (b"\x07\x00" + bytes(200), "call-me-maybe-via"),
    (b"\xff\x00", "unknown disco message type 0xff"),
])
def test_decode_rejects(plain, message):
    with pytest.raises(DiscoError, match=message):
        D.decode_message(plain)


@pytest.mark.parametrize("make", [
    lambda: Ping(b"short", KEY),
    lambda: Ping(TX, KEY.raw),
    lambda: Ping(TX, KEY, padding=-1),
    lambda: Ping(TX, KEY, padding=65536),
    lambda: Pong(TX, ("example.com", 1)),
    lambda: Pong(TX, ("1.2.3.4", 65536)),
    lambda: Pong(TX, ("1.2.3.4",)),
    lambda: CallMeMaybe((("1.2.3.4", -1),)),
])
def test_constructors_refuse_bad_values(make):
    with pytest.raises(ValueError):
        make()


def test_looks_like_disco_and_packet_sender():
    packet = D.MAGIC + A.public_key.raw + bytes(24)
    assert D.looks_like_disco(packet) and not D.looks_like_disco(packet[:-1])
    assert not D.looks_like_disco(b"TS\xf0\x9f\x92\xad" + bytes(60))
    assert D.packet_sender(packet) == A.public_key and D.packet_sender(packet[:-1]) is None


def test_relay_uses_the_same_classifier():
    from derpnet.server import relay
    assert relay.looks_like_disco is D.looks_like_disco and relay.DISCO_MAGIC == D.MAGIC


# ---------------------------------------------------------------- boxes

def test_seal_open_round_trip_each_type():
    for msg in (Ping(D.new_tx_id(), A.public_key, 5), Pong(TX, ("192.0.2.1", 41641)),
                CallMeMaybe((("198.51.100.7", 1), ("2001:db8::2", 2)))):
        packet = BOX_A.seal(B.public_key, msg)
        assert packet[:6] == D.MAGIC and packet[6:38] == A.public_key.raw
        assert BOX_B.open(packet) == (A.public_key, msg)
        assert BOX_B.open(memoryview(packet)) == (A.public_key, msg)


def test_nonces_are_fresh():
    msg = Pong(TX, ("1.2.3.4", 5))
    p1, p2 = BOX_A.seal(B.public_key, msg), BOX_A.seal(B.public_key, msg)
    assert p1[38:62] != p2[38:62] and p1[62:] != p2[62:]


def test_box_for_another_key_does_not_open():
    packet = BOX_A.seal(B.public_key, Pong(TX, ("1.2.3.4", 5)))
    with pytest.raises(DiscoError, match="did not open"):
        BOX_C.open(packet)


def test_forged_sender_key_does_not_open():
    # C boxes for B but claims to be A: B opens with (B, A), which is not the key C used
    honest = BOX_C.seal(B.public_key, Pong(TX, ("1.2.3.4", 5)))
    forged = D.MAGIC + A.public_key.raw + honest[38:]
    with pytest.raises(DiscoError, match="did not open"):
        BOX_B.open(forged)


def test_ping_claiming_another_node_key_is_refused():
    packet = BOX_A.seal(B.public_key, Ping(TX, C.public_key))
    with pytest.raises(DiscoError, match="node key"):
        BOX_B.open(packet)


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_any_flipped_bit_is_refused(data):
    packet = BOX_A.seal(B.public_key, Ping(TX, A.public_key, padding=data.draw(st.integers(0, 40))))
    i = data.draw(st.integers(0, len(packet) - 1))
    bit = data.draw(st.integers(0, 7))
    tampered = packet[:i] + bytes([packet[i] ^ (1 << bit)]) + packet[i + 1:]
    with pytest.raises(DiscoError):
        BOX_B.open(tampered)


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_every_truncation_is_refused(data):
    packet = BOX_A.seal(B.public_key, CallMeMaybe((("1.2.3.4", 5),)))
    n = data.draw(st.integers(0, len(packet) - 1))
    with pytest.raises(DiscoError):
        BOX_B.open(packet[:n])


@pytest.mark.parametrize("raw", LOW_ORDER)
def test_low_order_keys_are_disco_errors(raw):
    packet = D.MAGIC + raw + bytes(24) + bytes(40)
    with pytest.raises(DiscoError):
        BOX_B.open(packet)
    with pytest.raises(DiscoError):
        BOX_B.seal(PublicKey(raw), Pong(TX, ("1.2.3.4", 5)))


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_garbage_is_only_ever_disco_error(data):
    for packet in (data, D.MAGIC + data, D.MAGIC + A.public_key.raw + data):
        with pytest.raises(DiscoError):
            BOX_B.open(packet)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decode_never_raises_anything_else(plain):
    try:
        msg = D.decode_message(plain)
    except DiscoError:
        return
    assert D.decode_message(D.encode_message(msg)) == msg


def test_authenticated_garbage_plaintext_is_disco_error():
    nonce = bytes(24)
    for plain in (b"", b"\x01", b"\x09\x00" + bytes(10)):
        ct = BOX_A._cached(B.public_key.raw).encrypt(plain, nonce).ciphertext  # type: ignore[union-attr]
        with pytest.raises(DiscoError):
            BOX_B.open(D.MAGIC + A.public_key.raw + nonce + ct)


# ---------------------------------------------------------------- properties

ADDRS = st.tuples(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), st.integers(0, 65535))
MESSAGES = st.one_of(
    st.builds(Ping, st.binary(min_size=12, max_size=12), st.binary(min_size=32, max_size=32).map(PublicKey),
              st.integers(0, 100)),
    st.builds(Pong, st.binary(min_size=12, max_size=12), ADDRS),
    st.builds(CallMeMaybe, st.lists(ADDRS, max_size=8).map(tuple)),
)


@given(MESSAGES)
def test_encode_decode_round_trip(msg):
    assert D.decode_message(D.encode_message(msg)) == msg


@given(MESSAGES)
@settings(deadline=None)
def test_seal_open_round_trip(msg):
    if isinstance(msg, Ping):
        msg = Ping(msg.tx_id, A.public_key, msg.padding)  # a ping names its sender
    assert BOX_B.open(BOX_A.seal(B.public_key, msg)) == (A.public_key, msg)


# ---------------------------------------------------------------- sizes, cache

@pytest.mark.parametrize("size", [124, 125, 1280, 1500, 9000, 65507, 65535])
def test_ping_padding_gives_exact_sizes(size):
    padding = D.ping_padding_for(size)
    packet = BOX_A.seal(B.public_key, Ping(TX, A.public_key, padding))
    assert len(packet) == size
    assert BOX_B.open(packet)[1].padding == padding


@pytest.mark.parametrize("size", [0, 123, 65536])
def test_ping_padding_out_of_range(size):
    with pytest.raises(ValueError):
        D.ping_padding_for(size)


def test_box_cache_is_bounded_and_unopened_senders_are_not_cached():
    box = DiscoBox(A, cache_size=3)
    peers = [PrivateKey.generate() for _ in range(5)]
    for p in peers:
        box.seal(p.public_key, CallMeMaybe(()))
    assert list(box._boxes) == [p.public_key.raw for p in peers[-3:]]
    stranger = PrivateKey.generate().public_key.raw
    with pytest.raises(DiscoError):
        box.open(D.MAGIC + stranger + bytes(24) + bytes(40))
    assert stranger not in box._boxes and len(box._boxes) == 3
    sealed = DiscoBox(peers[0]).seal(A.public_key, CallMeMaybe(()))
    assert box.open(sealed)[0] == peers[0].public_key and list(box._boxes)[-1] == peers[0].public_key.raw
    assert len(box._boxes) == 3
