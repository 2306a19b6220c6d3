"""A connection's heartbeat, packet sizing and the driver's routes: pure, time is an argument."""

from __future__ import annotations

from dataclasses import dataclass, field

from derpnet.keys import PrivateKey
from derpquic.config import GO_PACKET_SIZE
from derpquic.heartbeat import GONE_GRACE, Heartbeat
from derpquic.routes import Routes
from derpquic.sizing import MIN_PACKET_SIZE, PacketSizing, packet_size

# ---------------------------------------------------------------- Heartbeat


def test_pings_only_while_in_use_and_silent_for_an_interval():
    hb = Heartbeat(interval=5.0, now=100.0)
    assert hb.ping_at(in_use=False) is None and hb.ping_due(200.0, in_use=False) is None
    assert hb.ping_at(in_use=True) == 105.0
    assert hb.ping_due(104.9, in_use=True) is None
    first = hb.ping_due(105.0, in_use=True)
    assert first is not None and hb.last_ping == 105.0
    assert hb.ping_at(in_use=True) == 110.0  # counted from the PING, not from the peer's silence
    hb.heard(108.0)
    assert hb.ping_at(in_use=True) == 113.0
    second = hb.ping_due(113.0, in_use=True)
    assert second is not None and second != first and hb.next_ping_id() not in (first, second)


def test_a_spare_kept_idle_is_pinged_without_streams():
    hb = Heartbeat(interval=2.0, now=0.0)
    hb.keep_idle = True
    assert hb.ping_due(2.0, in_use=False) is not None


def test_peer_that_left_fails_after_the_grace_unless_heard_from():
    hb = Heartbeat(interval=5.0, now=0.0)
    hb.peer_left(10.0)
    hb.peer_left(11.0)  # the first deadline stands
    assert hb.gone_deadline == 10.0 + GONE_GRACE
    assert not hb.gone_due(10.0 + GONE_GRACE - 0.01)
    assert hb.gone_due(10.0 + GONE_GRACE)
    assert not hb.gone_due(20.0)  # reported once
    hb.peer_left(30.0)
    hb.heard(30.5)
    assert hb.gone_deadline is None and not hb.gone_due(40.0)


def test_heard_recently():
    hb = Heartbeat(interval=1.0, now=50.0)
    assert hb.heard_recently(64.9, within=15.0) and not hb.heard_recently(65.0, within=15.0)


# ---------------------------------------------------------------- PacketSizing


def test_packet_size_is_capped_by_the_path_but_never_below_quic_minimum():
    assert packet_size(65527, 1400) == 1400
    assert packet_size(1452, 65535) == 1452
    assert packet_size(65527, 500) == MIN_PACKET_SIZE


def test_sizing_upgrades_once_after_the_handshake_and_follows_the_path():
    sz = PacketSizing()
    assert sz.uncapped == GO_PACKET_SIZE and sz.take_upgrade() == 0
    sz.negotiated(ours_max=65535, peer_max=65527, path_mtu=65535)
    assert sz.uncapped == 65527
    assert sz.take_upgrade() == 65527 and sz.take_upgrade() == 0
    assert sz.for_path(16384) == 16384  # a direct path that carries 16 KiB
    assert sz.for_path(65535) == 65527


def test_a_path_change_cancels_a_pending_upgrade():
    sz = PacketSizing()
    sz.negotiated(ours_max=65535, peer_max=65527, path_mtu=65535)
    assert sz.for_path(8192) == 8192
    assert sz.take_upgrade() == 0


# ---------------------------------------------------------------- Routes


@dataclass(eq=False)
class FakeConn:
    peer: object
    cids: set = field(default_factory=set)


def _conn(peer):
    return FakeConn(peer)


def test_routes_by_peer_and_connection_id():
    a, b = PrivateKey.generate().public_key, PrivateKey.generate().public_key
    r = Routes()
    ca, cb = _conn(a), _conn(b)
    r.register(ca, b"cid-a-1")
    r.register(cb, b"cid-a-1")  # the same ID from another peer is another connection
    assert r.lookup(a, b"cid-a-1") is ca and r.lookup(b, b"cid-a-1") is cb
    r.add(ca, b"cid-a-2")
    ca.cids.add(b"cid-a-2")
    assert r.lookup(a, b"cid-a-2") is ca and r.lookup(b, b"cid-a-2") is None
    assert r.to(a) == [ca] and len(r) == 2
    r.remove(cb, b"cid-a-2")  # not cb's route: untouched
    assert r.lookup(a, b"cid-a-2") is ca
    r.forget(ca)
    assert r.lookup(a, b"cid-a-1") is None and r.lookup(a, b"cid-a-2") is None and list(r) == [cb]


def test_a_peer_that_left_is_back_once_heard_from():
    a = PrivateKey.generate().public_key
    r = Routes()
    c = _conn(a)
    r.register(c, b"x" * 8)
    assert r.peer_left(a, now=5.0) == [c] and a in r.gone
    assert r.lookup(a, b"unknown!") is None
    assert a not in r.gone
