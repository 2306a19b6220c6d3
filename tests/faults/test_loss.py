"""Transfers complete under packet loss on the relay links, with nothing lost end to end.

The proxies drop client -> relay SendPacket frames: random 1 % and 5 % on both sides'
links (data and ACKs), and a burst of 200 consecutive frames on the sender's link. The
throughput under each condition is printed (bench/faults.py measures it side by side).

About the burst: QUIC only sends what its congestion window and the flow-control window
allow without hearing back (with 64 KiB packets and the 4 MiB stream window, at most
64 packets; behind derper's 32-deep queues often fewer), then one probe per probe
timeout, which doubles each time. 200 consecutive drops of the QUIC flow alone therefore
swallow every probe for longer than the 30 s idle timeout: no QUIC (or TCP) survives that,
and `test_burst_longer_than_the_quic_flight_fails_cleanly` pins down that the failure is
then a clean ConnectionAbortedError, not a hang. The survivable and realistic case, a
relay link that loses 200 packets in a row while also carrying other traffic (magicsock
multiplexes every peer over one DERP connection), is `test_burst_of_200_dropped_packets`:
there the burst takes the QUIC flow's whole flight and its first probes, and QUIC
recovers.
"""

from __future__ import annotations

import time

import pytest

import derpnet
from tests.derpquic.helpers import Background
from tests.faults.harness import CrossTraffic, MiB, Pair, Sink, burst, random_bytes, run_transfer

MIN_MBPS = 2.0  # a collapse floor, far below what is measured (~15-50 MB/s)


@pytest.mark.parametrize("loss", [0.01, 0.05], ids=["1pct", "5pct"])
def test_random_loss(relay, proxies, loss, figures):
    pa, pb = proxies
    pa.set_loss(loss, seed=1)  # reproducible: the n-th packet's fate is fixed
    pb.set_loss(loss, seed=5)  # (both drop within their first 100 packets at 1 %)
    with Pair(relay.url, proxy_a=pa, proxy_b=pb) as pair:
        out = run_transfer(pair, random_bytes(32 * MiB))
    dropped = pa.stats()["packets_dropped"] + pb.stats()["packets_dropped"]
    seen = pa.stats()["packets_seen"] + pb.stats()["packets_seen"]
    figures(f"{relay.kind} loss {loss:.0%}: {out.line()}, dropped {dropped} of {seen} packets "
            f"(seeds {pa.seed}/{pb.seed})", mbps=out.mbps, dropped=dropped)
    assert out.intact, out.line()
    assert dropped >= seen * loss * 0.4, "the loss did not happen"
    assert out.mbps >= MIN_MBPS, out.line()


def test_burst_of_200_dropped_packets(relay, proxies, figures):
    pa, pb = proxies
    with Pair(relay.url, proxy_a=pa, proxy_b=pb) as pair, \
            derpnet.listen_packet(relay.url) as bystander, \
            CrossTraffic(pair.pc_a, bystander.local_addr()) as cross:
        out = run_transfer(pair, random_bytes(32 * MiB), fault=burst(pair, "a", 200))
    quic_lost = pa.dropped_to[pair.pc_b.local_addr()]
    figures(f"{relay.kind} {out.line()}, of which QUIC packets {quic_lost} (cross traffic: {cross.sent} "
            "datagrams)", mbps=out.mbps, stall_s=out.stall, quic_lost=quic_lost)
    assert out.intact, out.line()
    assert pa.stats()["packets_dropped"] == 200
    assert quic_lost >= 10, "the burst hardly touched the QUIC flow"
    assert out.stall <= 5.0, out.line()


def test_burst_longer_than_the_quic_flight_fails_cleanly(our_relay, figures):
    """200 consecutive drops of the QUIC flow alone: the sender's flight and then every
    probe are lost, so the connection ends at the idle timeout (2 s here) with
    ConnectionAbortedError on both sides -- bounded, and never silent corruption."""
    from tests.faults.proxy import FaultProxy
    idle = 2.0
    with FaultProxy(our_relay.port) as pa, \
            Pair(our_relay.url, proxy_a=pa, quic_opts={"idle_timeout": idle, "keepalive_interval": 0.5}) as pair:
        s, r = pair.open_stream()
        s.settimeout(30)
        r.settimeout(30)
        sink = Sink(r)

        def send_forever():
            chunk = random_bytes(1 << 20)
            while True:
                s.sendall(chunk)

        sender = Background(send_forever, name="faults-send")
        sink.wait_bytes(4 * MiB, 30)
        pa.drop_burst(200)
        t0 = time.monotonic()
        with pytest.raises(ConnectionAbortedError, match="timed out"):
            sink.result(30)
        receiver_s = time.monotonic() - t0
        with pytest.raises(ConnectionAbortedError):
            sender.result(30)
        sender_s = time.monotonic() - t0
        s.close()
        r.close()
    used = pa.stats()["packets_dropped"]
    figures(f"burst of 200 on the QUIC flow alone: {used} packets sent into it before the connection "
            f"gave up; receiver failed after {receiver_s:.2f}s, sender after {sender_s:.2f}s (idle timeout {idle:g}s)",
            receiver_s=receiver_s, sender_s=sender_s)
    assert used < 200, "QUIC sent 200 packets without feedback: then the burst is survivable"
    # The sender keeps hearing the receiver's keep-alive PINGs until the receiver gives up,
    # so it times out one idle period later.
    assert receiver_s <= idle + 3.0 and sender_s <= 2 * idle + 3.0
