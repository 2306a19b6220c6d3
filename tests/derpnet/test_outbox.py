"""The relay's per-client outgoing queues (derpnet.server.outbox), pure: no loop, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpnet import frames as F
from derpnet.keys import PrivateKey
from derpnet.server.outbox import BATCH_BYTES, Outbox, TokenBucket

A, B, C = (PrivateKey.generate().public_key for _ in range(3))


def decode(data: bytes) -> list:
    d = F.FrameDecoder(F.Role.CLIENT)
    d.feed(data)
    return list(d.events())


def always(_src):
    return True


def test_packets_come_out_as_recv_packets_in_order():
    box = Outbox(32)
    for i in range(5):
        box.add_packet(A, bytes([i]), disco=False)
    assert box.stage_packets(always) == set()
    data, packets, payload = box.take_batch()
    assert decode(data) == [F.RecvPacket(A, bytes([i])) for i in range(5)]
    assert (packets, payload) == (5, 5)
    assert box.take_batch() is None and box.queued_packets == 0


def test_full_queue_drops_the_oldest():
    box = Outbox(3)
    assert [box.add_packet(A, bytes([i]), disco=False) for i in range(5)] == [False, False, False, True, True]
    assert box.is_full(disco=False) and not box.is_full(disco=True)
    box.stage_packets(always)
    assert [f.data for f in decode(box.take_batch()[0])] == [b"\x02", b"\x03", b"\x04"]


def test_disco_and_other_packets_have_separate_queues_and_alternate():
    box = Outbox(4)
    for i in range(4):
        box.add_packet(A, b"p%d" % i, disco=False)
    for i in range(2):
        box.add_packet(B, b"d%d" % i, disco=True)
    assert box.queued_packets == 6
    box.stage_packets(always)
    got = [f.data for f in decode(box.take_batch()[0])]
    assert got == [b"d0", b"p0", b"d1", b"p1", b"p2", b"p3"]  # neither queue starves the other


def test_control_frames_pong_and_keepalive_ride_behind_the_packets():
    box = Outbox(8)
    box.add_packet(A, b"first", disco=False)
    assert box.add_control(F.encode_peer_gone(C, F.PeerGoneReason.DISCONNECTED))
    assert box.add_pong(b"12345678")
    box.keepalive_due = True
    box.stage_packets(always)
    assert box.stage_control() == (True, True)
    frames = decode(box.take_batch()[0])
    assert frames == [F.RecvPacket(A, b"first"), F.PeerGone(C, F.PeerGoneReason.DISCONNECTED),
                      F.Pong(b"12345678"), F.KeepAlive()]
    assert box.stage_control() == (False, False) and box.take_batch() is None


def test_one_pong_slot():
    box = Outbox(8)
    assert box.add_pong(b"aaaaaaaa") and not box.add_pong(b"bbbbbbbb")
    box.stage_control()
    assert decode(box.take_batch()[0]) == [F.Pong(b"aaaaaaaa")]
    assert box.add_pong(b"cccccccc")  # the slot is free again


def test_control_queue_is_bounded():
    box = Outbox(8, control_limit=2)
    frame = F.encode_peer_gone(A, 1)
    assert [box.add_control(frame) for _ in range(3)] == [True, True, False]


def test_batch_stops_at_batch_bytes_and_resumes():
    box = Outbox(32, batch_bytes=3000)
    for _ in range(10):
        box.add_packet(A, bytes(1000), disco=False)
    box.stage_packets(always)
    assert box.batch_full
    data, packets, _ = box.take_batch()
    assert packets == 3 and len(decode(data)) == 3  # 3 frames of 1,037 bytes pass 3,000
    assert box.queued_packets == 7 and not box.batch_full
    box.stage_packets(always)
    assert box.take_batch()[1] == 3


def test_default_batch_is_128_kib():
    assert BATCH_BYTES == 128 << 10 and Outbox(1).batch_bytes == BATCH_BYTES


def test_each_new_source_is_watched_once():
    box = Outbox(32)
    asked = []

    def watch(src):
        asked.append(src)
        return True

    for src in (A, B, A, A, B):
        box.add_packet(src, b"x", disco=False)
    box.stage_packets(watch)
    box.add_packet(A, b"y", disco=False)
    box.stage_packets(watch)
    assert asked == [A, B] and box.seen == {A, B}


def test_departed_sources_are_reported_and_not_remembered():
    box = Outbox(32)
    box.add_packet(A, b"x", disco=False)
    box.add_packet(B, b"y", disco=False)
    departed = box.stage_packets(lambda src: src != B)
    assert departed == {B} and box.seen == {A}
    # The packet itself is still delivered: it was sent while B was here.
    assert [f.src for f in decode(box.take_batch()[0])] == [A, B]


def test_clear_counts_queued_and_staged_packets():
    box = Outbox(32, batch_bytes=10)
    for i in range(4):
        box.add_packet(A, b"abc", disco=i % 2 == 0)
    box.stage_packets(always)  # one staged (batch_bytes is tiny)
    box.add_control(F.encode_keep_alive())
    box.add_pong(b"12345678")
    assert box.queued_packets == 4
    assert box.clear() == 4
    assert box.queued_packets == 0 and box.take_batch() is None
    assert box.stage_control() == (False, False)


def test_empty_outbox_has_nothing_to_write():
    box = Outbox(4)
    assert box.stage_packets(always) == set()
    assert box.stage_control() == (False, False)
    assert box.take_batch() is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=80), st.integers(1, 40),
       st.integers(100, 5000))
def test_nothing_is_lost_but_the_oldest_of_a_full_queue(ops, depth, batch_bytes):
    """Every packet either comes out (in its queue's order) or was pushed out by a newer one."""
    box = Outbox(depth, batch_bytes=batch_bytes)
    sent = {True: [], False: []}
    dropped = 0
    for i, (disco, payload) in enumerate(ops):
        data = i.to_bytes(2, "big") + payload
        sent[disco].append(data)
        dropped += box.add_packet(A, data, disco)
    out = []
    while True:
        box.stage_packets(always)
        batch = box.take_batch()
        if batch is None:
            break
        frames = decode(batch[0])
        assert batch[1] == len(frames) and batch[2] == sum(len(f.data) for f in frames)
        out.extend(f.data for f in frames)
    expected = {d: q[-depth:] for d, q in sent.items()}
    assert dropped == sum(len(q) - len(expected[d]) for d, q in sent.items())
    for disco in (True, False):
        assert [d for d in out if d in expected[disco]] == expected[disco]
    assert len(out) == len(expected[True]) + len(expected[False])


# ---------------------------------------------------------------- the NotHere rate limit

def test_bucket_allows_a_burst_then_the_rate():
    b = TokenBucket(rate=1.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.take(0.5)
    assert b.take(1.0) and not b.take(1.0)


def test_bucket_never_saves_more_than_the_burst():
    b = TokenBucket(rate=1.0, burst=3, now=0.0)
    for _ in range(3):
        b.take(0.0)
    assert sum(b.take(1000.0) for _ in range(10)) == 3


@pytest.mark.parametrize("rate, seconds, expected", [(1.0, 10, 13), (2.0, 10, 23), (0.5, 10, 8)])
def test_bucket_long_run_rate(rate, seconds, expected):
    b = TokenBucket(rate=rate, burst=3, now=0.0)
    granted = sum(b.take(t / 64) for t in range(seconds * 64 + 1))  # binary fractions: exact
    assert granted == expected
