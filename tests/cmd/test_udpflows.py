"""UDP forwarding's wire format and flow tables (pure: explicit time)."""

from __future__ import annotations

import pytest

from derpnet.cmd.udpflows import MAX_FLOW_ID, ClientFlows, Flows, decode, encode


@pytest.mark.parametrize("flow,size", [(0, 1), (63, 1), (64, 2), (16383, 2), (16384, 4), (MAX_FLOW_ID, 4)])
def test_flow_ids_are_quic_varints(flow, size):
    data = encode(flow, b"payload")
    assert len(data) == size + len(b"payload")
    assert decode(data) == (flow, b"payload")
    assert decode(encode(flow, b"")) == (flow, b"")


def test_bad_datagrams_and_ids():
    with pytest.raises(ValueError):
        decode(b"")
    with pytest.raises(ValueError):
        decode(b"\x80\x00")  # a 4-byte id cut short
    with pytest.raises(ValueError):
        encode(-1, b"")
    with pytest.raises(ValueError):
        encode(MAX_FLOW_ID + 1, b"")


def test_flows_expire_when_idle_and_use_keeps_them():
    f: Flows[str, int] = Flows(idle=10.0, limit=100)
    f.add("a", 1, now=0.0)
    f.add("b", 2, now=5.0)
    assert f.get("a", now=8.0) == 1  # used: idle again from 8
    assert f.expire(now=14.0) == []
    assert f.expire(now=15.0) == [("b", 2)]
    assert f.expire(now=18.0) == [("a", 1)]
    assert len(f) == 0 and f.get("a", now=18.0) is None


def test_flows_are_bounded_least_recently_used_first():
    f: Flows[str, int] = Flows(idle=60.0, limit=2)
    f.add("a", 1, now=0.0)
    f.add("b", 2, now=1.0)
    f.get("a", now=2.0)
    assert f.add("c", 3, now=3.0) == [("b", 2)]
    assert sorted(k for k, _ in f.items()) == ["a", "c"]
    assert f.remove("a") == 1 and f.remove("a") is None


def test_client_flows_both_ways():
    c: ClientFlows[tuple[str, int]] = ClientFlows(idle=30.0, limit=10)
    a, b = ("127.0.0.1", 1000), ("127.0.0.1", 1001)
    assert c.flow_for(a, now=0.0) == (0, True)
    assert c.flow_for(b, now=0.0) == (1, True)
    assert c.flow_for(a, now=1.0) == (0, False)
    assert c.addr_for(1, now=20.0) == b  # an answer keeps the flow alive
    assert c.expire(now=31.0) == [0]
    assert c.addr_for(0, now=31.0) is None
    assert c.addr_for(1, now=31.0) == b
    assert c.flow_for(a, now=32.0) == (2, True)  # a new flow, never an old id again
    assert len(c) == 2


def test_client_flows_evicted_forget_their_ids():
    c: ClientFlows[int] = ClientFlows(idle=30.0, limit=1)
    c.flow_for(1, now=0.0)
    c.flow_for(2, now=0.0)
    assert c.addr_for(0, now=0.0) is None
    assert c.addr_for(1, now=0.0) == 2
