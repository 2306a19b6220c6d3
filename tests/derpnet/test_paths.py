"""The per-peer path state machine (derpnet.paths), pure: explicit `now`, a simulated network.

Two PathTables exchange their SendDisco actions through `Net`, an in-memory model of the
relay (always delivers) and of UDP between endpoints (delivers when the test says so, up
to a size). No sockets, no threads, no clock.
"""

from __future__ import annotations

import heapq
import itertools

import pytest

from derpnet.disco import CallMeMaybe, Ping, Pong, new_tx_id
from derpnet.keys import PrivateKey
from derpnet.paths import BASE_UDP_SIZE, RELAY_PATH_MTU, PathTable, SendDisco

A_ADDR = ("198.18.1.1", 41641)
B_ADDR = ("198.18.2.1", 41642)
UNPADDED = 124  # a sealed ping without padding


class Net:
    """Delivers disco actions between two tables after a latency; UDP only when allowed."""

    def __init__(self, *, relay_latency: float = 0.020, udp_latency: float = 0.002) -> None:
        self.a_key = PrivateKey.generate().public_key
        self.b_key = PrivateKey.generate().public_key
        self.a = PathTable()
        self.b = PathTable()
        self.addr = {self.a_key: A_ADDR, self.b_key: B_ADDR}
        self.relay_latency = relay_latency
        self.udp_latency = udp_latency
        self.udp_ok = True
        self.udp_max = 65507
        self.now = 0.0
        self.q: list = []
        self.seq = itertools.count()
        self.sent: list[tuple[str, SendDisco]] = []
        self.events: dict[str, list] = {"a": [], "b": []}
        self.a.set_local_endpoints([A_ADDR], 0.0)
        self.b.set_local_endpoints([B_ADDR], 0.0)

    def table(self, name: str) -> PathTable:
        return self.a if name == "a" else self.b

    def key(self, name: str):
        return self.a_key if name == "a" else self.b_key

    def collect(self) -> None:
        for name in ("a", "b"):
            t = self.table(name)
            self.events[name] += t.take_events()
            for act in t.take_actions():
                self.sent.append((name, act))
                other = "b" if name == "a" else "a"
                assert act.peer == self.key(other)
                if act.addr is None:
                    heapq.heappush(self.q, (self.now + self.relay_latency, next(self.seq), other, act, None))
                elif act.addr == self.addr[self.key(other)] and self.udp_ok:
                    size = act.size or UNPADDED
                    if size <= self.udp_max:
                        src = self.addr[self.key(name)]
                        heapq.heappush(self.q, (self.now + self.udp_latency, next(self.seq), other, act, src))

    def run_until(self, t_end: float, *, traffic: bool = True, step: float = 0.05) -> None:
        """Advance time to t_end: deliver messages, fire timers, note traffic every `step`."""
        next_traffic = self.now
        while True:
            self.collect()
            times = [t_end]
            if self.q:
                times.append(self.q[0][0])
            for t in (self.a, self.b):
                d = t.next_deadline()
                if d is not None:
                    times.append(max(d, self.now))
            if traffic:
                times.append(next_traffic)
            nxt = min(times)
            if nxt > t_end:
                break
            self.now = nxt
            if traffic and self.now >= next_traffic:
                self.a.note_traffic(self.b_key, self.now)
                self.b.note_traffic(self.a_key, self.now)
                next_traffic = self.now + step
            while self.q and self.q[0][0] <= self.now:
                _, _, to, act, src = heapq.heappop(self.q)
                sender = self.a_key if to == "b" else self.b_key
                self.table(to).on_disco(sender, act.msg, src, self.now)
                self.collect()
            self.a.poll(self.now)
            self.b.poll(self.now)
            if self.now >= t_end:
                self.collect()
                break

    def enable_both(self) -> None:
        self.a.enable(self.b_key, self.now)
        self.b.enable(self.a_key, self.now)


def test_nothing_is_sent_to_a_peer_that_is_not_enabled():
    net = Net()
    net.run_until(60.0)  # traffic flows both ways the whole time
    assert net.sent == []
    assert net.a.route(net.b_key) is None and net.a.mtu(net.b_key) == RELAY_PATH_MTU


def test_enabled_active_peers_go_direct_within_one_round_trip():
    net = Net()
    net.enable_both()
    net.run_until(0.2)
    assert net.a.route(net.b_key) == (B_ADDR, 65506)  # probed up to the largest UDP payload
    assert net.b.route(net.a_key) == (A_ADDR, 65506)
    first = [e for e in net.events["a"] if e.addr is not None][0]
    assert first.reason == "pong" and first.rtt == pytest.approx(2 * net.udp_latency)
    assert first.mtu == BASE_UDP_SIZE - 1  # a new path starts small
    # Discovery started with a CallMeMaybe over the relay carrying our endpoints.
    cmm = [act for who, act in net.sent if who == "a" and isinstance(act.msg, CallMeMaybe)]
    assert cmm and cmm[0].addr is None and A_ADDR in cmm[0].msg.endpoints
    # Each side learns where the other sees it (Pong.src).
    assert A_ADDR in net.a.local_endpoints


def test_only_one_side_enabled_is_enough_a_call_me_maybe_enables_the_other():
    net = Net()
    net.a.enable(net.b_key, 0.0)
    net.run_until(0.5)
    assert net.b.is_enabled(net.a_key)
    assert net.a.route(net.b_key) is not None and net.b.route(net.a_key) is not None


def test_packet_size_grows_with_probes_up_to_what_the_path_carries():
    net = Net()
    net.udp_max = 16384
    net.enable_both()
    net.run_until(1.0)
    assert net.a.route(net.b_key) == (B_ADDR, 16383)
    mtus = [e.mtu for e in net.events["a"] if e.addr is not None]
    assert mtus[0] == BASE_UDP_SIZE - 1 and mtus[-1] == 16383 and mtus == sorted(mtus)


def test_a_silent_path_falls_back_to_the_relay_within_3_seconds_and_upgrades_again():
    net = Net()
    net.enable_both()
    net.run_until(2.0)
    assert net.a.route(net.b_key) is not None
    net.udp_ok = False
    silent_at = net.now
    net.run_until(silent_at + 3.0)
    down = [e for e in net.events["a"] if e.addr is None]
    assert down and down[0].reason == "silent"
    assert net.a.route(net.b_key) is None and net.a.mtu(net.b_key) == RELAY_PATH_MTU
    # The fallback came no later than 3 s after the last packet the path carried.
    net.events["a"].clear()
    net.udp_ok = True
    net.run_until(net.now + 6.0)  # the next discovery round (every 5 s) finds it again
    assert net.a.route(net.b_key) is not None
    assert any(e.addr == B_ADDR for e in net.events["a"])


def test_fallback_time_is_bounded_by_trust_after_the_last_pong():
    net = Net()
    net.enable_both()
    net.run_until(2.0)
    net.udp_ok = False
    t0 = net.now
    while net.a.route(net.b_key) is not None:
        net.run_until(net.now + 0.05)
    assert net.now - t0 <= net.a.trust + 0.1


def test_a_path_that_stops_carrying_large_packets_fails_its_heartbeat():
    net = Net()
    net.enable_both()
    net.run_until(1.0)
    assert net.a.route(net.b_key)[1] == 65506
    net.udp_max = 1400  # e.g. fragments start being dropped
    net.run_until(net.now + 3.0)
    assert net.a.route(net.b_key) is None or net.a.route(net.b_key)[1] < 1400


def test_no_udp_between_the_peers_stays_on_the_relay_and_retries_while_active():
    net = Net()
    net.udp_ok = False
    net.enable_both()
    net.run_until(20.0)
    assert net.a.route(net.b_key) is None and net.b.route(net.a_key) is None
    cmm_times = [1 for who, act in net.sent if who == "a" and isinstance(act.msg, CallMeMaybe)]
    assert 3 <= len(cmm_times) <= 12  # periodic, not a storm
    assert not [e for e in net.events["a"] if e.addr is not None]


def test_idle_peers_send_nothing():
    net = Net()
    net.enable_both()
    net.run_until(2.0)
    net.run_until(40.0, traffic=False)  # idle_after (30 s) passes
    net.sent.clear()
    net.run_until(100.0, traffic=False)
    assert net.sent == []
    # The path expired quietly.
    assert net.a.route(net.b_key) is None
    assert [e.reason for e in net.events["a"] if e.addr is None] == ["idle"]
    # Traffic again: discovery at once.
    net.run_until(100.5)
    assert net.a.route(net.b_key) is not None


def test_a_pong_for_an_unknown_tx_id_never_captures_a_path():
    t = PathTable()
    peer = PrivateKey.generate().public_key
    t.enable(peer, 0.0)
    t.note_traffic(peer, 0.0)
    t.take_actions()
    t.on_disco(peer, Pong(new_tx_id(), ("1.2.3.4", 5)), ("203.0.113.9", 9), 0.1)
    assert t.route(peer) is None and t.take_events() == [] and t.ignored_pongs == 1


def test_a_pong_from_another_address_than_the_one_pinged_never_captures_a_path():
    t = PathTable()
    peer = PrivateKey.generate().public_key
    t.enable(peer, 0.0)
    t.note_traffic(peer, 0.0)
    t.on_disco(peer, CallMeMaybe((B_ADDR,)), None, 0.0)
    pings = [a for a in t.take_actions() if isinstance(a.msg, Ping) and a.addr == B_ADDR]
    assert pings
    t.on_disco(peer, Pong(pings[0].msg.tx_id, A_ADDR), ("203.0.113.9", 9), 0.01)  # spoofed source
    assert t.route(peer) is None and t.ignored_pongs == 1
    t.on_disco(peer, Pong(pings[0].msg.tx_id, A_ADDR), B_ADDR, 0.02)  # the real answer
    assert t.route(peer) == (B_ADDR, BASE_UDP_SIZE - 1)


def test_a_call_me_maybe_over_udp_is_ignored():
    t = PathTable()
    peer = PrivateKey.generate().public_key
    t.enable(peer, 0.0)
    t.take_actions()
    t.on_disco(peer, CallMeMaybe((B_ADDR,)), ("203.0.113.9", 9), 0.0)
    assert not [a for a in t.take_actions() if a.addr == B_ADDR]


def test_a_ping_is_answered_by_the_path_it_came_on_with_the_observed_source():
    t = PathTable()
    peer = PrivateKey.generate().public_key
    tx = new_tx_id()
    t.on_disco(peer, Ping(tx, peer), ("203.0.113.9", 7), 0.0)
    acts = t.take_actions()
    pong = [a for a in acts if isinstance(a.msg, Pong)][0]
    assert pong.addr == ("203.0.113.9", 7) and pong.msg.tx_id == tx and pong.msg.src == ("203.0.113.9", 7)
    # The sender's address is now a candidate: we ping it back (our NAT opens too)...
    assert [a for a in acts if isinstance(a.msg, Ping) and a.addr == ("203.0.113.9", 7)]
    # ...and data from there is attributed to the peer; the peer is now enabled.
    assert t.peer_for_addr(("203.0.113.9", 7)) == peer and t.is_enabled(peer)
    relay_ping = new_tx_id()
    t.on_disco(peer, Ping(relay_ping, peer), None, 0.1)
    pong = [a for a in t.take_actions() if isinstance(a.msg, Pong)][0]
    assert pong.addr is None and pong.msg.tx_id == relay_ping


def test_the_lower_round_trip_wins_with_hysteresis():
    t = PathTable()
    peer = PrivateKey.generate().public_key
    t.enable(peer, 0.0)
    t.note_traffic(peer, 0.0)
    slow, fast, close = ("198.18.9.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)
    t.on_disco(peer, CallMeMaybe((slow, fast, close)), None, 0.0)
    pings = {a.addr: a.msg.tx_id for a in t.take_actions() if isinstance(a.msg, Ping) and a.addr}
    t.on_disco(peer, Pong(pings[slow], A_ADDR), slow, 0.030)
    assert t.route(peer)[0] == slow
    t.on_disco(peer, Pong(pings[fast], A_ADDR), fast, 0.031)  # rtt 31 ms: not better enough
    assert t.route(peer)[0] == slow
    t.on_disco(peer, Pong(pings[close], A_ADDR), close, 0.005)  # 5 ms
    assert t.route(peer)[0] == close
    assert [e.reason for e in t.take_events()] == ["pong", "better"]


def test_endpoints_per_peer_are_bounded():
    t = PathTable()
    peer = PrivateKey.generate().public_key
    many = tuple((f"10.9.{i // 250}.{i % 250}", 1000 + i) for i in range(200))
    t.on_disco(peer, CallMeMaybe(many), None, 0.0)
    pings = [a for a in t.take_actions() if isinstance(a.msg, Ping)]
    assert len(pings) <= 64
    info = t.snapshot()[0]
    assert len(info.candidates) <= 32


def test_the_table_forgets_the_least_recently_active_peer_when_full():
    t = PathTable(max_peers=3)
    keys = [PrivateKey.generate().public_key for _ in range(4)]
    for i, k in enumerate(keys[:3]):
        t.on_disco(k, CallMeMaybe(((f"10.0.0.{i + 1}", 1),)), None, float(i))
    assert t.peer_for_addr(("10.0.0.1", 1)) == keys[0]
    t.on_disco(keys[3], CallMeMaybe((("10.0.0.9", 1),)), None, 10.0)
    assert len(t.snapshot()) == 3 and not t.is_enabled(keys[0])
    assert t.peer_for_addr(("10.0.0.1", 1)) is None and t.is_enabled(keys[3])


def test_trust_must_exceed_heartbeat():
    with pytest.raises(ValueError):
        PathTable(heartbeat=2.0, trust=1.0)


def test_new_local_endpoints_are_announced_to_active_peers():
    net = Net()
    net.udp_ok = False
    net.enable_both()
    net.run_until(1.0)
    net.sent.clear()
    net.a.set_local_endpoints([A_ADDR, ("10.0.0.1", 41641)], net.now)
    net.collect()
    cmm = [act for who, act in net.sent if who == "a" and isinstance(act.msg, CallMeMaybe)]
    assert cmm and ("10.0.0.1", 41641) in cmm[-1].msg.endpoints
