"""The relay link's liveness rules (derpnet.liveness), pure: explicit `now=`, no sockets, no threads."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpnet.liveness import Dead, DeadReason, Liveness, SendPing


def tokens():
    """A deterministic token source: 8-byte counters."""
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


def make(idle=120.0, ping_after=5.0, ping_timeout=5.0, now=0.0):
    return Liveness(idle_timeout=idle, ping_after=ping_after, ping_timeout=ping_timeout, now=now, token=tokens())


def test_an_idle_link_is_never_pinged():
    live = make()
    for t in range(1, 120):
        assert live.poll(now=float(t)) is None
    assert live.pings_sent == 0


def test_silence_after_a_write_asks_for_a_ping_with_a_fresh_token():
    live = make()
    live.on_send(now=1.0)
    assert live.poll(now=4.9) is None  # silence is counted from the last byte received (0)
    assert live.poll(now=5.0) == SendPing((1).to_bytes(8, "big")) and live.pings_sent == 1
    live.on_receive(now=6.0)
    live.on_send(now=6.5)
    assert live.poll(now=11.0) == SendPing((2).to_bytes(8, "big")) and live.pings_sent == 2


def test_no_ping_before_ping_after_of_silence():
    live = make()
    live.on_receive(now=10.0)
    live.on_send(now=11.0)
    assert live.poll(now=14.9) is None
    assert isinstance(live.poll(now=15.0), SendPing)


def test_writes_more_than_ping_after_before_the_silence_do_not_count():
    live = make()
    live.on_send(now=1.0)
    live.on_receive(now=6.0)  # the write was 5 s (ping_after) before the relay fell silent: idle since
    assert not live.in_use
    assert live.poll(now=100.0) is None and live.next_deadline() == 126.0


def test_writes_before_the_reader_starts_do_not_count():
    live = make()
    live.on_send(now=1.0)
    live.reset(now=2.0)
    assert not live.in_use
    assert live.poll(now=100.0) is None


def test_silence_right_after_an_answer_is_probed():
    """The flaky fault test, deterministically: a QUIC sender waiting for flow-control
    credit writes nothing after the acknowledgement of its last packet. The relay falling
    silent right then is probed after ping_after, not after the user's next write."""
    live = make(ping_after=1.0, ping_timeout=1.0)
    live.on_send(now=10.00)  # the last packet the sender could send
    live.on_receive(now=10.05)  # its acknowledgement: then the path dies, and nobody writes
    assert live.next_deadline() == 11.05
    assert live.poll(now=11.0) is None
    assert isinstance(live.poll(now=11.05), SendPing)
    assert live.poll(now=12.05) == Dead(DeadReason.PING_UNANSWERED, silent_for=2.0, limit=1.0)


def test_an_answered_probe_ends_the_probing_of_a_link_gone_idle():
    """A link whose user went quiet after an exchange gets one probe, not one every ping_after."""
    live = make()
    live.on_send(now=1.0)
    live.on_receive(now=1.1)  # the answer; then nobody writes
    ping = live.poll(now=6.1)
    assert isinstance(ping, SendPing)
    live.on_pong(ping.data, now=6.2)  # our Ping is not a write: the link is idle now
    for t in range(7, 126):  # (the idle timeout ends it at 126.2)
        assert live.poll(now=float(t)) is None
    assert live.pings_sent == 1


def test_only_one_ping_outstanding():
    live = make()
    live.on_send(now=0.5)
    assert isinstance(live.poll(now=5.0), SendPing)
    live.on_send(now=6.0)
    assert live.poll(now=7.0) is None and live.pings_sent == 1


def test_unanswered_ping_is_dead_after_ping_timeout():
    live = make()
    live.on_send(now=0.5)
    live.poll(now=5.0)
    assert live.poll(now=9.99) is None
    dead = live.poll(now=10.0)
    assert dead == Dead(DeadReason.PING_UNANSWERED, silent_for=10.0, limit=5.0)


def test_any_frame_answers_the_ping():
    live = make()
    live.on_send(now=0.5)
    live.poll(now=5.0)
    live.on_receive(now=6.0)  # a KeepAlive, a packet: anything proves the path
    assert live.ping_sent_at is None
    assert live.poll(now=10.5) is None


def test_pong_with_the_token_clears_the_ping():
    live = make()
    live.on_send(now=0.5)
    ping = live.poll(now=5.0)
    assert isinstance(ping, SendPing)
    live.on_pong(ping.data, now=5.5)
    assert live.ping_sent_at is None and live.last_rx == 5.5


def test_pong_with_another_token_changes_nothing():
    live = make()
    live.on_send(now=0.5)
    live.poll(now=5.0)
    live.on_pong(b"\xff" * 8, now=5.5)
    assert live.ping_sent_at == 5.0 and live.last_rx == 0.0


def test_idle_timeout_kills_a_silent_link_even_when_we_never_wrote():
    live = make(idle=30.0)
    assert live.poll(now=29.9) is None
    assert live.poll(now=30.0) == Dead(DeadReason.IDLE, silent_for=30.0, limit=30.0)


def test_idle_timeout_wins_over_a_pending_ping():
    live = make(idle=7.0)
    live.on_send(now=0.5)
    assert isinstance(live.poll(now=5.0), SendPing)
    assert live.poll(now=7.0).reason is DeadReason.IDLE


def test_pings_disabled():
    live = make(ping_after=None)
    live.on_send(now=1.0)
    assert live.poll(now=100.0) is None and live.pings_sent == 0
    assert live.poll(now=120.0).reason is DeadReason.IDLE


def test_everything_disabled():
    live = make(idle=None, ping_after=None)
    live.on_send(now=1.0)
    assert live.poll(now=1e9) is None
    assert live.next_deadline() is None and live.check_interval is None


@pytest.mark.parametrize("ping_after, ping_timeout", [(0, 5), (-1, 5), (5, 0), (5, -2)])
def test_nonpositive_periods_are_refused(ping_after, ping_timeout):
    with pytest.raises(ValueError):
        make(ping_after=ping_after, ping_timeout=ping_timeout)


@pytest.mark.parametrize("idle, ping_after, ping_timeout, expected", [
    (120.0, 5.0, 5.0, 1.25),
    (120.0, 8.0, 2.0, 0.5),
    (0.3, 5.0, 5.0, 0.3),
    (120.0, None, 5.0, 120.0),
    (None, 4.0, 4.0, 1.0),
])
def test_check_interval(idle, ping_after, ping_timeout, expected):
    assert make(idle, ping_after, ping_timeout).check_interval == expected


def test_next_deadline_follows_the_state():
    live = make(idle=120.0)
    assert live.next_deadline() == 120.0  # only the idle limit
    live.on_send(now=1.0)
    assert live.next_deadline() == 5.0  # silence since 0 reaches ping_after
    live.poll(now=5.0)
    assert live.next_deadline() == 10.0  # the ping's answer is due
    live.on_receive(now=6.0)
    assert live.next_deadline() == 126.0


def test_token_source_is_asked_for_eight_bytes():
    asked = []

    def token(n):
        asked.append(n)
        return b"x" * n

    live = Liveness(idle_timeout=None, ping_after=1.0, ping_timeout=1.0, token=token)
    live.on_send(now=0.1)
    assert live.poll(now=1.0) == SendPing(b"x" * 8) and asked == [8]


# ---------------------------------------------------------------- properties

_STEP = st.one_of(
    st.tuples(st.just("rx"), st.floats(0, 10)),
    st.tuples(st.just("tx"), st.floats(0, 10)),
    st.tuples(st.just("poll"), st.floats(0, 10)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_STEP, max_size=60), st.sampled_from([None, 30.0]), st.floats(0.5, 10), st.floats(0.5, 10))
def test_model(steps, idle, ping_after, ping_timeout):
    """Against a direct statement of the rules: a ping only after ping_after of silence that
    began at most ping_after after a write, at most one outstanding, death exactly when a
    deadline has passed."""
    live = make(idle, ping_after, ping_timeout)
    now, last_rx, last_tx, pinged = 0.0, 0.0, float("-inf"), None
    for kind, dt in steps:
        now += dt
        if kind == "rx":
            live.on_receive(now)
            last_rx, pinged = now, None
        elif kind == "tx":
            live.on_send(now)
            last_tx = now
        else:
            deadline = live.next_deadline()
            action = live.poll(now)
            if idle and now - last_rx >= idle:
                assert isinstance(action, Dead) and action.reason is DeadReason.IDLE
                return
            if pinged is not None and now - pinged >= ping_timeout:
                assert isinstance(action, Dead) and action.reason is DeadReason.PING_UNANSWERED
                return
            if pinged is None and last_tx > last_rx - ping_after and now - last_rx >= ping_after:
                assert isinstance(action, SendPing)
                pinged = now
            else:
                assert action is None
                assert deadline is None or deadline > now - 1e-6  # nothing was due yet (float rounding aside)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.1, 100), st.floats(0.1, 100))
def test_verdict_bound_from_the_last_byte(ping_after, ping_timeout):
    """Polled every check_interval after a write into silence, the link is declared dead no
    later than ping_after + ping_timeout + one period after the last byte received."""
    live = make(None, ping_after, ping_timeout)
    live.on_send(now=0.001)  # just after the last byte received (at 0)
    tick = live.check_interval
    now = 0.0
    for _ in range(10_000):
        now += tick
        action = live.poll(now)
        if isinstance(action, Dead):
            break
    assert ping_after + ping_timeout <= now <= ping_after + ping_timeout + 2 * tick + 1e-9
