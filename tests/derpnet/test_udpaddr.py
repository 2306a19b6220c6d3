"""UDP endpoint addresses (derpnet.udpaddr): the one normal form, and the 18-byte wire form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derpnet.udpaddr import host_port, ip_text, normalize, pack18, unpack18


@pytest.mark.parametrize("addr, expected", [
    (("1.2.3.4", 5), ("1.2.3.4", 5)),
    (["1.2.3.4", 5], ("1.2.3.4", 5)),
    (("::ffff:1.2.3.4", 5, 0, 0), ("1.2.3.4", 5)),          # a dual-stack socket's view of IPv4
    (("2001:DB8:0:0::1", 65535), ("2001:db8::1", 65535)),
    (("fe80::1%eth0", 7, 0, 2), ("fe80::1", 7)),
])
def test_normalize(addr, expected):
    assert normalize(addr) == expected


def test_keep_zone_for_socket_use():
    assert normalize(("fe80::1%eth0", 7), keep_zone=True) == ("fe80::1%eth0", 7)


@pytest.mark.parametrize("addr", [("localhost", 1), ("1.2.3.4", -1), ("1.2.3.4", 65536), ("1.2.3.4", True),
                                  ("1.2.3.4", "80"), (b"1.2.3.4", 1), ("1.2.3.4",), "1.2.3.4:5", None])
def test_normalize_refuses(addr):
    with pytest.raises(ValueError):
        normalize(addr)


def test_wire_form():
    assert pack18(("1.2.3.4", 0x1234)).hex() == "00000000000000000000ffff01020304" + "1234"
    assert unpack18(bytes.fromhex("00000000000000000000ffff0102030404d2")) == ("1.2.3.4", 1234)
    assert ip_text(bytes([10, 0, 0, 1])) == "10.0.0.1"
    with pytest.raises(ValueError):
        unpack18(bytes(17))


def test_host_port():
    assert host_port("1.2.3.4", 5) == "1.2.3.4:5" and host_port("::1", 5) == "[::1]:5"


@given(st.tuples(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), st.integers(0, 65535)))
def test_wire_round_trip(addr):
    assert unpack18(pack18(addr)) == normalize(addr) == normalize(normalize(addr))
