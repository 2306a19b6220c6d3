"""The relay link's liveness ping (derpnet.liveness), at the PacketConn level.

A relay path that silently stops forwarding sends no FIN and no RST; before the ping
the link was only declared dead after 120 s of silence (or, for a heavy sender, once the
TCP window stayed full for the 5 s write timeout). Now: in use (written to during the
silence or within `ping_after` before it) and silent for `ping_after` -> DERP Ping;
nothing back within `ping_timeout` -> dead -> reconnect.
"""

from __future__ import annotations

import time

import pytest

import derpnet
from derpnet.keys import PrivateKey
from tests.faults.harness import LinkLog

FAST = {"ping_after": 0.5, "ping_timeout": 0.5}


def _roundtrip(a, b, payload: bytes, timeout: float = 10.0) -> None:
    a.write_to(payload, b.local_addr())
    b.settimeout(timeout)
    while True:  # earlier datagrams of the test may still be queued
        data, src = b.read_from()
        if data == payload:
            assert src == a.local_addr()
            return


def test_blackholed_link_is_found_by_the_ping_and_replaced(relay, proxies, figures):
    pa, _ = proxies
    log = LinkLog()
    with derpnet.listen_packet(pa.url, on_event=log, **FAST) as a, derpnet.listen_packet(relay.url) as b:
        _roundtrip(a, b, b"before")
        assert pa.blackhole() == 1
        t0 = time.monotonic()
        a.write_to(b"into the hole", b.local_addr())  # we send, the relay stays silent
        t_down, down = log.wait_down(1, timeout=10)
        assert isinstance(down.error, TimeoutError) and "did not answer a ping" in str(down.error), down
        t_up, _ = log.wait_up(2, timeout=10)
        _roundtrip(a, b, b"after")
        _roundtrip(b, a, b"and back")
    detect = t_down - t0
    figures(f"{relay.kind}: black-holed link declared dead after {detect:.2f}s (ping_after 0.5 s + ping_timeout "
            f"0.5 s), new link after {t_up - t0:.2f}s", detect_s=detect)
    # At most ping_after + ping_timeout + two wake-up periods (a quarter of 0.5 s each) + slack
    # after the last byte received (which came just before the black hole).
    assert detect <= 2.5


def test_link_blackholed_right_after_an_answer_is_found_by_the_ping(relay, proxies, figures):
    """The last thing A's link saw was the answer to its write, and A then waits without
    writing (a QUIC sender waiting for flow-control credit) when the path dies. The link
    was in use: found by the ping, not at A's next write. (Before, a link was only in use
    with a write after the last byte received: this one went unprobed, and the QUIC
    black-hole test found it at ~11 s, derpquic's 10 s keep-alive + ping_timeout.)"""
    pa, _ = proxies
    log = LinkLog()
    opts = {"ping_after": 1.0, "ping_timeout": 0.5, "direct": False}
    with derpnet.listen_packet(pa.url, on_event=log, **opts) as a, \
            derpnet.listen_packet(relay.url, direct=False) as b:
        _roundtrip(a, b, b"request")
        _roundtrip(b, a, b"answer")  # A received after its last write
        assert pa.blackhole() == 1
        t0 = time.monotonic()
        t_down, down = log.wait_down(1, timeout=10)
        assert isinstance(down.error, TimeoutError) and "did not answer a ping" in str(down.error), down
        log.wait_up(2, timeout=10)
        _roundtrip(a, b, b"after")
    detect = t_down - t0
    figures(f"{relay.kind}: link black-holed right after an answer declared dead after {detect:.2f}s "
            "(ping_after 1 s + ping_timeout 0.5 s)", detect_s=detect)
    # ping_after + ping_timeout + two wake-up periods (a quarter of 0.5 s each) + slack
    assert detect <= 1.5 + 0.25 + 1.0, detect


def test_idle_link_is_never_pinged(relay):
    with derpnet.listen_packet(relay.url, **FAST) as a:
        a.settimeout(1.5)
        with pytest.raises(TimeoutError):  # 1.5 s of idleness (3 x ping_after)
            a.read_from()
        assert a.relay_link.client.liveness.pings_sent == 0 and a.generation == 1


def test_relay_that_answers_pings_keeps_the_link(relay, figures):
    """Sending into silence (to a key nobody holds: the relay answers nothing) is not a dead
    link: the relay answers the ping, and the link stays. Both relays speak Ping/Pong."""
    nobody = PrivateKey.generate().public_key
    log = LinkLog()
    with derpnet.listen_packet(relay.url, on_event=log, **FAST) as a:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            a.write_to(b"anyone?", nobody)
            with log.cond:  # paces the writes; wakes early only if the link drops
                if log.cond.wait_for(lambda: log.downs, 0.05):
                    break
        pings = a.relay_link.client.liveness.pings_sent
        assert pings >= 2, pings  # ~ every 0.5 s of silence while sending
        assert log.downs == [] and a.generation == 1
    figures(f"{relay.kind}: {pings} liveness pings in 2 s of sending into silence, all answered", pings=pings)


def test_pings_can_be_disabled(relay):
    with derpnet.listen_packet(relay.url, ping_after=None) as a:
        client = a.relay_link.client
        assert client.liveness.check_interval == client.idle_timeout
    with pytest.raises(ValueError):
        derpnet.listen_packet(relay.url, ping_after=0)
