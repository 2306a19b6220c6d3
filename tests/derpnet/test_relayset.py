"""A PacketConn on several relays (derpnet.relayset), against real relay processes: it
reaches peers that are on either relay and answers each through the relay it came in on,
starts when one relay of two is down and joins it once it is up, moves to the surviving
relay when one is killed, and fails at start only when no relay answers."""

from __future__ import annotations

import time

import pytest

import derpnet
from derpnet.client import parse_relay
from derpnet.relayset import parse_relays
from tests.interop_peers import free_port
from tests.relays import OurRelay


@pytest.fixture(scope="module")
def two_relays():
    with OurRelay() as a, OurRelay() as b:
        yield a, b


def _wait_until(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def _read(pc, timeout: float = 10.0):
    pc.settimeout(timeout)
    return pc.read_from()


def test_parse_relays():
    a, b = parse_relay("http://127.0.0.1:1"), parse_relay("http://127.0.0.1:2")
    assert parse_relays("http://127.0.0.1:1") == [a]
    assert parse_relays(" http://127.0.0.1:1 ,http://127.0.0.1:2,http://127.0.0.1:1") == [a, b]
    assert parse_relays(["http://127.0.0.1:2", a]) == [b, a]
    with pytest.raises(ValueError):
        parse_relays(" , ")
    with pytest.raises(ValueError):
        parse_relays([])


def test_reaches_peers_on_either_relay_and_learns_their_relay(two_relays):
    a, b = two_relays
    with derpnet.listen_packet([a.url, b.url], direct=False) as multi, \
            derpnet.listen_packet(a.url, direct=False) as on_a, derpnet.listen_packet(b.url, direct=False) as on_b:
        assert multi.relay_url == a.url
        assert multi.relay_for(on_a.local_addr()) is None  # not heard yet: through both
        multi.write_to(b"to a", on_a.local_addr())
        multi.write_to(b"to b", on_b.local_addr())
        assert _read(on_a) == (b"to a", multi.local_addr())
        assert _read(on_b) == (b"to b", multi.local_addr())
        on_a.write_to(b"from a", multi.local_addr())
        on_b.write_to(b"from b", multi.local_addr())
        got = {_read(multi), _read(multi)}
        assert got == {(b"from a", on_a.local_addr()), (b"from b", on_b.local_addr())}
        assert multi.relay_for(on_a.local_addr()) == a.url
        assert multi.relay_for(on_b.local_addr()) == b.url
        # Now routed: each answer goes through its peer's relay only (no copy via the other).
        for i in range(5):
            multi.write_to(b"%d" % i, on_b.local_addr())
        assert [_read(on_b)[0] for _ in range(5)] == [b"%d" % i for i in range(5)]
        assert multi.stats()["packets_out"] >= 7


def test_starts_with_one_relay_down_and_joins_it_when_it_comes_up(tmp_path):
    port = free_port()
    with OurRelay() as b:
        with derpnet.listen_packet([f"http://127.0.0.1:{port}", b.url], direct=False) as multi:
            assert multi.connected and multi.generation == 1
            with OurRelay(port=port, workdir=str(tmp_path / "a")) as a, \
                    derpnet.listen_packet(a.url, direct=False) as on_a:
                assert multi.wait_connected(20, min_generation=2), "the late relay was never joined"
                on_a.write_to(b"late", multi.local_addr())
                assert _read(multi, 15) == (b"late", on_a.local_addr())


def test_no_relay_answering_is_the_first_relays_error():
    ports = [free_port(), free_port()]
    with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1:{ports[0]}"):
        derpnet.listen_packet([f"http://127.0.0.1:{p}" for p in ports], direct=False, connect_timeout=5)


def test_a_killed_relay_moves_its_peers_to_the_other(tmp_path):
    with OurRelay(workdir=str(tmp_path / "a")) as a, OurRelay() as b:
        with derpnet.listen_packet([a.url, b.url], direct=False) as x, \
                derpnet.listen_packet([a.url, b.url], direct=False) as y:
            x.write_to(b"hello", y.local_addr())
            assert _read(y)[0] == b"hello"  # through both relays: one copy may still be queued
            y.write_to(b"back", x.local_addr())
            while _read(x)[0] != b"back":
                pass
            used = x.relay_for(y.local_addr())
            assert used in (a.url, b.url)
            (a if used == a.url else b).kill()
            other = b.url if used == a.url else a.url
            # Once our link noticed (at once here: the kernel closed the relay's sockets), the route
            # through the dead relay is forgotten and every datagram goes through the other one.
            _wait_until(lambda: x.relay_for(y.local_addr()) is None, "the dead relay's route is forgotten")
            for i in range(20):
                x.write_to(b"after %d" % i, y.local_addr())
                data, _ = _read(y)
                while not data.startswith(b"after"):
                    data, _ = _read(y)
                assert data == b"after %d" % i
            _wait_until(lambda: y.relay_for(x.local_addr()) != used, "y forgot the dead relay's route too")
            y.write_to(b"ack", x.local_addr())
            while _read(x)[0] != b"ack":
                pass
            assert x.relay_for(y.local_addr()) == other
