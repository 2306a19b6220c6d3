"""A fast sender and a slow receiver through our relay: congestion control adapts, and no
buffer anywhere grows without bound.

* The receiver's link to the relay slows from loopback speed to 5 MB/s in the middle of
  a transfer (the proxy rate-limits relay -> receiver, with a real link's MSS and small
  socket buffers, so that the relay's own queue is the buffer that fills, not loopback's
  multi-megabyte kernel buffers). The sender's window (~3-5 MiB in flight by then;
  flow-control windows raised to 64 MiB so that only congestion control can hold it back)
  overflows the relay's per-client queue (32 packets, drop-oldest): packets are lost in
  the relay, QUIC backs off and retransmits, the transfer completes intact at about the
  link's rate. The relay process's peak RSS grows by about its queue (2 MiB of 64 KiB
  packets); an unbounded queue would hold the whole excess window, tens of MiB.
* The receiving application reads slowly: what it has not read stays within its stream
  window (4 MiB) and the sender is held back; the relay's memory does not grow either.

Memory is read from /proc/PID/status (VmHWM: the peak resident set).
"""

from __future__ import annotations

import time

from derpnet.packetconn import DEFAULT_QUEUE_SIZE
from tests.faults.harness import Fault, MiB, Pair, random_bytes, relay_pid, rss_kib, run_transfer
from tests.faults.proxy import FaultProxy

RELAY_GROWTH_BOUND = 8 * MiB


def _peak_growth(pid: int, before: dict) -> int:
    return (rss_kib(pid)["VmHWM"] - before["VmHWM"]) * 1024


def test_receiver_link_slowing_down_overflows_the_relay_queue(our_relay, figures):
    rate = 5e6
    # 8 MiB: far more in flight than the relay's queue holds (32 x 64 KiB), yet the reading
    # application can never lag the link by more than that, so the slowdown at 30 % of the
    # transfer still has most of it to carry (a 64 MiB window let the sink lag by the rest).
    window = 8 * MiB
    pid = relay_pid(our_relay)
    with FaultProxy(our_relay.port, relay_mss=1448, sock_buffer=64 << 10) as pb, \
            Pair(our_relay.url, proxy_b=pb, quic_opts={"stream_window": window, "connection_window": window}) as pair:
        before = rss_kib(pid)
        switch = {}

        def slow_down() -> dict:
            switch["t"] = time.monotonic()
            pb.throttle_down(rate)
            return {}

        out = run_transfer(pair, random_bytes(24 * MiB), fault=Fault("slow-receiver", slow_down, ()), fault_at=0.3)
        growth = _peak_growth(pid, before)
        sa, sb = pair.pc_a.stats(), pair.pc_b.stats()
    lost_in_relay = sa["packets_out"] - sb["packets_in"]
    # Goodput from the slowdown to the end (what was already past the proxy then, in socket
    # and QUIC buffers, arrives early, so it may look a little above the link's rate).
    t = switch["t"]
    tl = [(ts, n) for ts, n in out.sink.timeline if ts >= t]
    assert tl[-1][0] - tl[0][0] >= 1.0, "too little data after the slowdown to judge"
    after_rate = (tl[-1][1] - tl[0][1]) / (tl[-1][0] - tl[0][0])
    figures(f"ours: {out.line()}; after the slowdown {after_rate / 1e6:.1f} MB/s on an {rate / 1e6:.0f} MB/s link, "
            f"{lost_in_relay} packets dropped by the relay, relay peak RSS +{growth / MiB:.1f} MiB, receiver "
            f"buffered <= {out.sink.max_buffered / MiB:.1f} MiB, PacketConn queue <= {out.sink.max_queued}",
            lost_in_relay=lost_in_relay, relay_growth=growth, mbps_after=after_rate / 1e6)
    assert out.intact, out.line()
    assert sb["drops"]["queue_full"] == 0 and pb.stats()["packets_dropped"] == 0
    assert lost_in_relay >= 10, "the relay queue never overflowed: the test did not test anything"
    assert after_rate >= rate * 0.4, "goodput collapsed instead of following the link's rate"
    assert growth <= RELAY_GROWTH_BOUND, f"relay peak RSS grew by {growth / MiB:.1f} MiB"
    assert out.sink.max_queued <= DEFAULT_QUEUE_SIZE
    assert out.sink.max_buffered <= window


def test_slow_reader_keeps_buffers_within_the_window(our_relay, figures):
    stream_window = 4 * MiB  # the default
    pid = relay_pid(our_relay)
    with Pair(our_relay.url) as pair:
        before = rss_kib(pid)
        # 64 KiB per 10 ms at most: < 6.5 MB/s, far slower than the path (~40 MB/s).
        out = run_transfer(pair, random_bytes(16 * MiB), sink_delay=0.010)
        growth = _peak_growth(pid, before)
    figures(f"ours slow reader: {out.line()}; receiver buffered <= {out.sink.max_buffered / MiB:.2f} MiB "
            f"(window {stream_window / MiB:.0f} MiB), PacketConn queue <= {out.sink.max_queued}, relay peak RSS "
            f"+{growth / MiB:.1f} MiB", max_buffered=out.sink.max_buffered, relay_growth=growth)
    assert out.intact, out.line()
    assert stream_window // 2 <= out.sink.max_buffered <= stream_window, "the reader was not the bottleneck"
    assert out.sink.max_queued <= DEFAULT_QUEUE_SIZE
    assert growth <= RELAY_GROWTH_BOUND, f"relay peak RSS grew by {growth / MiB:.1f} MiB"
