"""SIGTERM on a real relay process: every client is sent a Restarting frame with the
configured hint and then the end of the stream, the port is free at once, the drain is
bounded even for a client that never reads, and the relay exits 0."""

from __future__ import annotations

import signal
import socket
import time
import urllib.request

from derpnet import frames as F
from tests.rawderp import RawDerpClient, wait_until
from tests.relays import OurRelay


def test_sigterm_tells_clients_when_to_come_back_then_closes():
    args = ["--restart-reconnect-in", "0.7", "--restart-try-for", "3"]
    with OurRelay(extra_args=args) as relay:
        with RawDerpClient(relay.url) as a, RawDerpClient(relay.url) as b:
            a.send(b.public_key, b"queued before the restart")
            assert a.sync() == []
            relay.proc.send_signal(signal.SIGTERM)
            # What was queued comes first, then the Restarting frame, then EOF.
            assert b.recv_packet().data == b"queued before the restart"
            frames = []
            while True:
                try:
                    frames.append(b.recv_frame(timeout=10))
                except ConnectionError:
                    break
            assert [f for f in frames if not isinstance(f, F.KeepAlive)] == [F.Restarting(0.7, 3.0)]
            assert relay.proc.wait(timeout=10) == 0
        out = relay.output()
        assert "told 2 client(s) to reconnect in 0.7s (try for 3s)" in out and "every client drained" in out
        # The port was given up: a new relay can take it.
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", relay.port))


def test_the_drain_is_bounded_by_a_client_that_never_reads():
    args = ["--drain-timeout", "2", "--write-timeout", "0", "--metrics-listen", "127.0.0.1:0"]
    with OurRelay(extra_args=args) as relay:
        metrics = relay.logged.wait_for_line(r"metrics on (?P<url>http://\S+/metrics)").group("url")
        with RawDerpClient(relay.url, rcvbuf=4096) as stuck, RawDerpClient(relay.url) as a:
            for _ in range(400):  # far more than fits in the stuck client's socket and the relay's buffers
                a.send(stuck.public_key, b"z" * 60_000)
            assert a.sync(timeout=20) == []
            relay.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            relay.logged.wait_for_line(r"restarting: stopped accepting")
            # The stuck client is still being drained; what it sends now is no longer forwarded
            # (counted as dropped, reason "restarting"). Metrics still answer meanwhile.
            stuck.send(a.public_key, b"sent while draining")
            wait_until(lambda: 'derp_packets_dropped_total{reason="restarting"} 1\n' in _scrape(metrics),
                       what="the packet sent while draining to be counted")
            assert "\nderp_draining 1\n" in _scrape(metrics)
            assert relay.proc.wait(timeout=15) == 0
            took = time.monotonic() - t0
            assert 1.5 <= took <= 2 + 3, took  # the whole drain timeout, then exit, not longer
        out = relay.output()
        assert "1 connection(s) not drained within 2s; dropping them" in out
        assert "Traceback" not in out


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()
