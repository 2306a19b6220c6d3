"""`--metrics-listen` on a real relay process: Prometheus counters checked against traffic
the test generates, the /debug/ page, and no key beyond its short form; and a rate-limited
client held to its rate while an unlimited one is not (real relay, real clients)."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from derpnet import frames as F
from derpnet.client import DerpClient
from derpnet.errors import HandshakeError
from derpnet.keys import PrivateKey
from tests.rawderp import RawDerpClient, http_get, wait_until
from tests.relays import OurRelay

METRICS_RX = r"metrics on (?P<url>http://\S+/metrics)"


def scrape(url: str) -> dict[str, float]:
    """The samples of a /metrics page, by name with labels."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    assert not re.search(r"[0-9a-fA-F]{64}", text)  # no key, in any form
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_counters_match_the_traffic_sent(tmp_path):
    a_key, b_key, stranger = (PrivateKey.generate() for _ in range(3))
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{a_key.public_key}\n{b_key.public_key}\n")
    args = ["--metrics-listen", "127.0.0.1:0", "--allow-clients", str(allow)]
    with OurRelay(extra_args=args) as relay:
        url = relay.logged.wait_for_line(METRICS_RX).group("url")
        before = scrape(url)
        assert before["derp_current_connections"] == 0 and before["derp_packets_received_total"] == 0
        with RawDerpClient(relay.url, a_key) as a, RawDerpClient(relay.url, b_key) as b:
            for i in range(50):
                a.send(b_key.public_key, bytes([i]) * 100)
            for _ in range(7):
                a.send(stranger.public_key, b"x" * 30)  # nobody there: dropped, unknown_dest
            hints = a.sync()  # the relay has handled all of it (one Ping, one Pong)
            # Packets to a key nobody holds are answered with PeerGone(NotHere), at most 3 at once.
            assert hints and all(isinstance(f, F.PeerGone) and f.key == stranger.public_key
                                 and f.reason == F.PeerGoneReason.NOT_HERE for f in hints), hints
            assert [b.recv_packet().data for _ in range(50)] == [bytes([i]) * 100 for i in range(50)]
            with pytest.raises(HandshakeError):
                DerpClient(relay.url, stranger).connect()
            assert http_get(relay.url, "/derp/probe").startswith(b"HTTP/1.1 200")
            m = scrape(url)
            assert m["derp_current_connections"] == 2
            assert m["derp_current_client_keys"] == 2
            assert m["derp_packets_received_total"] == 57
            assert m["derp_bytes_received_total"] == 50 * 100 + 7 * 30
            assert m["derp_packets_forwarded_total"] == 50
            assert m["derp_bytes_forwarded_total"] == 50 * 100
            assert m['derp_packets_dropped_total{reason="unknown_dest"}'] == 7
            assert m['derp_packets_dropped_total{reason="queue_head"}'] == 0
            assert m['derp_handshakes_total{outcome="admitted"}'] == 2
            assert m['derp_handshakes_total{outcome="refused"}'] == 1
            assert m['derp_refused_clients_total{reason="not_allowed"}'] == 1
            assert m["derp_accepts_total"] == 4  # a, b, the stranger, the probe
            assert m["derp_http_requests_total"] == 1
            assert m["derp_got_ping_total"] == 1 and m["derp_sent_pong_total"] == 1
            assert m['derp_peer_gone_frames_total{reason="not_here"}'] == len(hints)
            assert m["derp_allowed_keys"] == 2
            assert m["derp_queued_packets"] == 0 and m["derp_queue_depth_max"] == 0
            assert m["derp_rate_limit_per_client_bytes_per_second"] == 0
            assert m["process_resident_memory_bytes"] > 10 << 20
        wait_until(lambda: scrape(url)["derp_current_connections"] == 0, what="the clients to be gone")


def test_debug_page_and_other_paths():
    with OurRelay(extra_args=["--metrics-listen", "127.0.0.1:0"]) as relay:
        url = relay.logged.wait_for_line(METRICS_RX).group("url")
        base = url.rsplit("/", 1)[0]
        with urllib.request.urlopen(base + "/debug/", timeout=10) as r:
            page = r.read().decode()
        assert 'href="/metrics"' in page and relay.public_key.short() in page
        assert relay.public_key.hex() not in page
        assert scrape(base + "/debug/varz")["derp_current_connections"] == 0
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/nope", timeout=10)
        assert e.value.code == 404
        # The DERP port does not serve metrics: they are only on the separate address.
        assert http_get(relay.url, "/metrics").startswith(b"HTTP/1.1 404")


def test_metrics_are_off_by_default():
    with OurRelay() as relay:
        assert "metrics on" not in relay.output()


# ---------------------------------------------------------------- rate limits

LIMIT = 2_000_000   # bytes/s for every client but one
PAYLOAD = 10_000    # bytes a packet; the relay charges the whole frame (5 + 32 + payload)
WARMUP, WINDOW = 1.0, 4.0


class Flood:
    """A DerpClient sending PAYLOAD-byte packets to `dst` as fast as it can, in a named thread."""

    def __init__(self, url: str, key: PrivateKey, dst) -> None:
        self.client = DerpClient(url, key).connect()
        self.dst, self.stop = dst, threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-flood", daemon=True)

    def _run(self) -> None:
        data = b"r" * PAYLOAD
        while not self.stop.is_set():
            try:
                self.client.send_packet(self.dst, data)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.client.close()
        self.thread.join(10)


class Meter:
    """A receiving DerpClient that records when its bytes arrived."""

    def __init__(self, url: str) -> None:
        self.times: list[tuple[float, int]] = []
        self.total = 0
        self.client = DerpClient(url, PrivateKey.generate(), on_packet=self._on_packet).connect()

    def _on_packet(self, src, data: bytes) -> None:
        self.total += len(data)
        self.times.append((time.monotonic(), self.total))

    def rate(self, start: float, end: float) -> float:
        """Bytes/s received between `start` and `end` (monotonic)."""
        inside = [n for t, n in self.times if start <= t <= end]
        before = [n for t, n in self.times if t < start]
        return ((inside[-1] if inside else 0) - (before[-1] if before else 0)) / (end - start)


def test_a_limited_client_is_held_to_its_rate_and_an_unlimited_one_is_not(tmp_path):
    fast = PrivateKey.generate()
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"PerClientRateLimitBytesPerSec": LIMIT,
                                 "PerKey": {str(fast.public_key): {"PerClientRateLimitBytesPerSec": 0}}}))
    args = ["--rate-config", str(rates), "--metrics-listen", "127.0.0.1:0"]
    with OurRelay(extra_args=args) as relay:
        url = relay.logged.wait_for_line(METRICS_RX).group("url")
        m_slow, m_fast = Meter(relay.url), Meter(relay.url)
        assert m_slow.client.public_key is not None
        slow = Flood(relay.url, PrivateKey.generate(), m_slow.client.public_key)
        quick = Flood(relay.url, fast, m_fast.client.public_key)
        try:
            t0 = time.monotonic()
            slow.thread.start()
            quick.thread.start()
            start, end = t0 + WARMUP, t0 + WARMUP + WINDOW
            # The floods run; the window is over once both meters have seen a packet after it.
            wait_until(lambda: all(m.times and m.times[-1][0] > end for m in (m_slow, m_fast)),
                       timeout=WARMUP + WINDOW + 20, what="traffic past the measuring window")
            limited, unlimited = m_slow.rate(start, end), m_fast.rate(start, end)
            expected = LIMIT * PAYLOAD / (PAYLOAD + 37)
            print(f"limited {limited / 1e6:.2f} MB/s (limit {expected / 1e6:.2f}), "
                  f"unlimited {unlimited / 1e6:.2f} MB/s")
            assert abs(limited - expected) <= 0.10 * expected, (limited, expected)
            assert unlimited >= 3 * LIMIT, unlimited  # not held back by anyone's limit
            assert slow.thread.is_alive() and quick.thread.is_alive()  # nothing failed: slowed, not cut
            m = scrape(url)
            assert m["derp_rate_limit_per_client_waited_total"] > 0
            assert m["derp_rate_limit_per_client_bytes_per_second"] == LIMIT
            assert m["derp_rate_limit_overrides"] == 1
            assert m['derp_packets_dropped_total{reason="unknown_dest"}'] == 0
        finally:
            slow.close()
            quick.close()
            m_slow.client.close()
            m_fast.client.close()


def test_rate_config_reload_applies_good_files_and_keeps_the_old_one_on_errors(tmp_path):
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"PerClientRateLimitBytesPerSec": 1_000_000}))
    with OurRelay(extra_args=["--rate-config", str(rates), "--metrics-listen", "127.0.0.1:0"]) as relay:
        url = relay.logged.wait_for_line(METRICS_RX).group("url")
        assert scrape(url)["derp_rate_limit_per_client_bytes_per_second"] == 1_000_000
        with RawDerpClient(relay.url) as a:
            rates.write_text('{\n  "PerClientRateLimitBytesPerSec": 5000000,\n  "PerKey": {"nodekey:00": {}}\n}')
            start = len(relay.logged.lines())
            relay.proc.send_signal(signal.SIGHUP)
            relay.logged.wait_for_line(r"reload failed, keeping the previous configuration: .*rates.json, line 3: ",
                                       start=start)
            assert scrape(url)["derp_rate_limit_per_client_bytes_per_second"] == 1_000_000
            rates.write_text(json.dumps({"PerClientRateLimitBytesPerSec": 5_000_000,
                                         "PerKey": {str(a.public_key): {"PerClientRateLimitBytesPerSec": 0}}}))
            start = len(relay.logged.lines())
            relay.proc.send_signal(signal.SIGHUP)
            relay.logged.wait_for_line(r"configuration applied: allowed everyone; rate limits: 5000000 bytes/s, "
                                       r"burst 65568; 1 per-key override\(s\); 0 client\(s\) disconnected",
                                       start=start)
            m = scrape(url)
            assert m["derp_rate_limit_per_client_bytes_per_second"] == 5_000_000
            assert m["derp_rate_limit_overrides"] == 1
            a.send(a.public_key, b"still connected")
            assert a.recv_packet().data == b"still connected"


def test_a_busy_metrics_port_is_one_error_line():
    from tests.derpnet.test_server_cli import run_cli
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("--listen", "127.0.0.1:0", "--stun-port", "0", "--metrics-listen", f"127.0.0.1:{port}")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"derpnet relay: cannot serve metrics on 127.0.0.1:{port}: address already in use\n"
