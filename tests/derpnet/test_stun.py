"""The STUN Binding codec (derpnet.stun): RFC 5769's test vectors, exact request and response
bytes, lenient parsing where stun.go is lenient, and garbage. Pure: no sockets."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpnet import stun as S
from derpnet.stun import StunError

# RFC 5769 §2.1-2.3 (the vectors' FINGERPRINTs check every byte)
RFC_TX = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC_SOFTWARE = "8022000b" + "7465737420766563746f7220"  # "test vector", padded with a space
RFC_REQUEST = bytes.fromhex(
    "000100582112a442" + RFC_TX.hex()
    + "802200105354554e207465737420636c69656e74"         # SOFTWARE "STUN test client"
    + "002400046e0001ff"                                 # PRIORITY
    + "80290008932ff9b151263b36"                         # ICE-CONTROLLED
    + "000600096576746a3a68367659202020"                 # USERNAME "evtj:h6vY"
    + "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"  # MESSAGE-INTEGRITY
    + "80280004e57a3bcf")                                # FINGERPRINT
RFC_XOR_V4 = "002000080001a147e112a643"
RFC_XOR_V6 = "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
RFC_RESPONSE_V4 = bytes.fromhex(
    "0101003c2112a442" + RFC_TX.hex() + RFC_SOFTWARE + RFC_XOR_V4
    + "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7" + "80280004c07d4c96")
RFC_RESPONSE_V6 = bytes.fromhex(
    "010100482112a442" + RFC_TX.hex() + RFC_SOFTWARE + RFC_XOR_V6
    + "00080014a382954e4be67bf11784c97c8292c275bfe3ed41" + "80280004c8fb0b4c")
RFC_V4 = ("192.0.2.1", 32853)
RFC_V6 = ("2001:db8:1234:5678:11:2233:4455:6677", 32853)


def response(tx: bytes, attrs_hex: str, msg_type: int = 0x0101) -> bytes:
    attrs = bytes.fromhex(attrs_hex)
    return struct.pack(">HH", msg_type, len(attrs)) + S.MAGIC_COOKIE + tx + attrs


# ---------------------------------------------------------------- known vectors

def test_rfc5769_responses():
    assert S.parse_response(RFC_RESPONSE_V4) == (RFC_TX, RFC_V4)
    assert S.parse_response(RFC_RESPONSE_V6) == (RFC_TX, RFC_V6)


def test_rfc5769_request_with_fingerprint_and_integrity():
    assert S.parse_binding_request(RFC_REQUEST) == RFC_TX


def test_binding_response_exact_bytes():
    assert S.binding_response(RFC_TX, RFC_V4).hex() == "0101000c2112a442" + RFC_TX.hex() + RFC_XOR_V4
    assert S.binding_response(RFC_TX, RFC_V6).hex() == "010100182112a442" + RFC_TX.hex() + RFC_XOR_V6
    # what a dual-stack socket reports for an IPv4 client is answered as IPv4, like derper
    assert S.binding_response(RFC_TX, ("::ffff:192.0.2.1", 32853, 0, 0)) == S.binding_response(RFC_TX, RFC_V4)


def test_binding_request_bytes():
    tx = bytes(range(12))
    req = S.binding_request(tx)
    assert len(req) == 40
    assert req[:20] == bytes.fromhex("000100142112a442") + tx
    assert req[20:32] == b"\x80\x22\x00\x08tailnode"
    assert req[32:36] == b"\x80\x28\x00\x04"
    assert req[36:] == struct.pack(">I", zlib.crc32(req[:32]) ^ 0x5354554E)
    assert S.is_stun(req) and S.parse_binding_request(req) == tx


# ---------------------------------------------------------------- parsing details

def test_mapped_address_fallback_and_xor_preferred():
    tx = bytes(12)
    mapped = "0001000800011f90c0000201"  # MAPPED-ADDRESS 192.0.2.1:8080
    assert S.parse_response(response(tx, mapped)) == (tx, ("192.0.2.1", 8080))
    assert S.parse_response(response(tx, mapped + RFC_XOR_V4)) == (tx, RFC_V4)
    assert S.parse_response(response(tx, RFC_XOR_V4 + mapped)) == (tx, RFC_V4)


def test_xor_mapped_address_under_0x8020():
    assert S.parse_response(response(bytes(12), "8020" + RFC_XOR_V4[4:])) == (bytes(12), RFC_V4)


def test_ipv6_family_carrying_ipv4_mapped_is_unmapped():
    # ::ffff:10.1.2.3 port 1, xored with the cookie and an all-zero transaction id
    attrs = "00200014" + "00022113" + "2112a442" + "00000000" + "0000ffff" + "0a010203"
    assert S.parse_response(response(bytes(12), attrs)) == (bytes(12), ("10.1.2.3", 1))


@pytest.mark.parametrize("software", ["8022000161000000", "8022000361626300"])  # 1 and 3 bytes + padding
def test_attribute_padding(software):
    assert S.parse_response(response(RFC_TX, software + RFC_XOR_V4)) == (RFC_TX, RFC_V4)


def test_bytes_past_the_header_length_are_ignored():
    assert S.parse_response(RFC_RESPONSE_V4 + b"trailing") == (RFC_TX, RFC_V4)
    assert S.parse_binding_request(S.binding_request(RFC_TX) + b"junk") == RFC_TX


def test_requests_without_attributes_or_fingerprint_are_answered():
    bare = bytes.fromhex("000100002112a442") + RFC_TX
    assert S.parse_binding_request(bare) == RFC_TX
    assert S.parse_binding_request(bare[:2] + b"\x00\x0c" + bare[4:] + b"\x80\x22\x00\x08tailnode") == RFC_TX


@pytest.mark.parametrize("data, message", [
    (b"", "not a STUN message"),
    (bytes(20), "not a STUN message"),
    (b"\x40" + RFC_REQUEST[1:], "not a STUN message"),                       # top bits
    (RFC_REQUEST[:4] + b"\x21\x12\xa4\x43" + RFC_REQUEST[8:], "not a STUN message"),
    (RFC_RESPONSE_V4, "not a Binding request"),
    (b"\x00\x11" + RFC_REQUEST[2:], "not a Binding request"),               # an indication
    (RFC_REQUEST[:-1] + bytes([RFC_REQUEST[-1] ^ 1]), "FINGERPRINT does not match"),
    (RFC_REQUEST[:30] + b"\x00" + RFC_REQUEST[31:], "FINGERPRINT does not match"),  # a byte it covers
    (RFC_REQUEST[:2] + b"\x00\x60" + RFC_REQUEST[4:] + b"\x00\x06\x00\x04abcd", "not the last"),
    (RFC_REQUEST[:2] + b"\x00\x5c" + RFC_REQUEST[4:], "shorter than its header"),
    (RFC_REQUEST[:2] + b"\x00\x02" + RFC_REQUEST[4:], "malformed STUN attributes"),
])
def test_parse_binding_request_rejects(data, message):
    with pytest.raises(StunError, match=message):
        S.parse_binding_request(data)


@pytest.mark.parametrize("data, message", [
    (S.binding_request(RFC_TX), "not a Binding success response"),
    (response(RFC_TX, RFC_XOR_V4, msg_type=0x0111), "not a Binding success response"),  # error response
    (response(RFC_TX, "8022000161000000"), "without a mapped address"),
    (response(RFC_TX, ""), "without a mapped address"),
    (response(RFC_TX, "00200008" + "0003a147e112a643"), "malformed STUN address"),  # family 3
    (response(RFC_TX, "00200008" + "0002a147e112a643"), "malformed STUN address"),  # v6 in 4 bytes
    (response(RFC_TX, "0001000200010000"), "malformed STUN address"),
    (response(RFC_TX, RFC_XOR_V4)[:-1], "shorter than its header"),
    (response(RFC_TX, "002000ff" + RFC_XOR_V4[8:]), "malformed STUN attributes"),
])
def test_parse_response_rejects(data, message):
    with pytest.raises(StunError, match=message):
        S.parse_response(data)


@pytest.mark.parametrize("data, expected", [
    (b"", False),
    (bytes(20), False),
    (bytes(4) + S.MAGIC_COOKIE + bytes(11), False),
    (bytes(4) + S.MAGIC_COOKIE + bytes(12), True),
    (bytes(4) + S.MAGIC_COOKIE + bytes(12) + b"foo", True),
    (b"\xf0" + bytes(3) + S.MAGIC_COOKIE + bytes(12), False),
    (b"\x40" + bytes(3) + S.MAGIC_COOKIE + bytes(12), False),
    (b"\x20" + bytes(3) + S.MAGIC_COOKIE + bytes(12), True),
    (b"TS\xf0\x9f\x92\xac" + bytes(60), False),  # a disco packet on the same socket
])
def test_is_stun(data, expected):
    assert S.is_stun(data) is expected


def test_bad_arguments():
    for bad in (b"short", "x" * 12):
        with pytest.raises(ValueError):
            S.binding_request(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        S.binding_response(RFC_TX, ("stun.example.com", 3478))
    with pytest.raises(ValueError):
        S.binding_response(RFC_TX, ("1.2.3.4", 70000))


# ---------------------------------------------------------------- properties

ADDRS = st.tuples(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), st.integers(0, 65535))
TX_IDS = st.binary(min_size=12, max_size=12)


@given(TX_IDS, ADDRS)
def test_response_round_trip(tx, addr):
    from derpnet.udpaddr import normalize
    assert S.parse_response(S.binding_response(tx, addr)) == (tx, normalize(addr))


@given(TX_IDS)
def test_request_round_trip(tx):
    assert S.parse_binding_request(S.binding_request(tx)) == tx


@given(st.one_of(st.binary(max_size=200),
                 st.tuples(st.sampled_from([b"\x00\x01", b"\x01\x01", b"\x01\x11"]), st.binary(max_size=2),
                           TX_IDS, st.binary(max_size=120))
                 .map(lambda t: t[0] + t[1].ljust(2, b"\0") + S.MAGIC_COOKIE + t[2] + t[3])))
@settings(max_examples=400)
def test_garbage_is_only_ever_stun_error(data):
    for parse in (S.parse_binding_request, S.parse_response):
        try:
            parse(data)
        except StunError:
            pass
