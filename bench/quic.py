"""Benchmark derpquic streams through a relay on loopback.

    python bench/quic.py                       # our relay and the Go derper (if built)
    python bench/quic.py --relay ours --mb 64
    python bench/quic.py --sweep-sizes 1452,4096,8192,16384,32768,65000
    python bench/quic.py --sweep-windows 1,4,16

Measures, per relay: bulk MB/s of one stream and of 8 parallel streams (one QUIC
connection, SHA-256 checked), 1-byte ping-pong round trips per second, and the time
from dial() to the first byte of a server-speaks-first stream (a fresh connection:
QUIC + key-proof handshakes). Dialer and listener run in this process, each on its own
relay connection; the relay is a separate process.

Figures measured while writing derpquic (2 vCPUs shared with other jobs, load ~5, so
+-30 %; loopback, one Python process for both peers):

  max_datagram_size   1452   4096   8192  16384  32768  65527   (MB/s, 32 MiB, 1 stream)
  our relay            2.4    8.8   20.8   31.5   51.5   74.8
  Go derper            4.5   11.4   27.0   38.9   44.1   91.6
  -> default 65527 between our peers (1452 towards Go peers: quic-go reads no more)

  stream window (conn = 4x), fake relay with 50 ms RTT: 1 MiB 16 MB/s, 4 MiB 48, 16 MiB 49
  -> default 4 MiB per stream, 16 MiB per connection

  ack_delay 1 ms -> 10 ms: ping-pong ~300 -> ~700 rt/s, bulk ~35 -> ~65 MB/s (fewer ACK packets)

  full suite (64 MiB):  1 stream 50-80 MB/s, 8 streams 40-55 MB/s, ping-pong 450-850 rt/s,
  dial -> first byte ~11 ms (both relays)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import derpquic  # noqa: E402


def _thread(fn, *args):
    out = {}

    def run():
        try:
            out["r"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join(timeout=600):
        t.join(timeout)
        if "e" in out:
            raise out["e"]
        return out.get("r")
    return join


def _sink(s):
    h = hashlib.sha256()
    n = 0
    while True:
        b = s.recv(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
    s.sendall(h.digest())
    s.close()
    return n


def bulk(ln, d, total: int, streams: int = 1) -> float:
    blob = os.urandom(1 << 20)
    per = total // streams
    sinks = []

    def acceptor():
        for _ in range(streams):
            s = ln.accept(timeout=30)
            s.settimeout(300)
            sinks.append(_thread(_sink, s))

    acc = _thread(acceptor)
    ss = [d.dial(ln.addr, timeout=30) for _ in range(streams)]
    acc()

    def push(s):
        s.settimeout(300)
        h = hashlib.sha256()
        left = per
        while left:
            part = blob[: min(len(blob), left)]
            s.sendall(part)
            h.update(part)
            left -= len(part)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 32:
            b = s.recv(32 - len(got))
            if not b:
                break
            got += b
        s.close()
        if got != h.digest():
            raise AssertionError("SHA-256 mismatch")

    t0 = time.perf_counter()
    pushers = [_thread(push, s) for s in ss]
    for p in pushers:
        p()
    dt = time.perf_counter() - t0
    for j in sinks:
        j()
    return per * streams / dt / 1e6


def pingpong(ln, d, seconds: float = 3.0) -> float:
    def server():
        s = ln.accept(timeout=30)
        s.settimeout(30)
        while True:
            b = s.recv(1)
            if not b:
                break
            s.sendall(b)
        s.close()

    srv = _thread(server)
    s = d.dial(ln.addr, timeout=30)
    s.settimeout(30)
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise AssertionError("ping-pong broke")
        n += 1
    dt = time.perf_counter() - t0
    s.shutdown(socket.SHUT_WR)
    srv()
    s.close()
    return n / dt


def dial_first_byte(ln, d_fresh, count: int = 10) -> tuple[float, float]:
    def server():
        for _ in range(count):
            s = ln.accept(timeout=30)
            s.sendall(b"!")
            s.close()

    srv = _thread(server)
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        s = d_fresh.dial(ln.addr, timeout=30)
        s.settimeout(30)
        if s.recv(1) != b"!":
            raise AssertionError("no greeting")
        times.append(time.perf_counter() - t0)
        s.close()
    srv()
    return statistics.median(times) * 1000, max(times) * 1000


def _relays(which: str, stack: ExitStack):
    out = []
    if which in ("ours", "both"):
        from tests.relays import OurRelay
        r = stack.enter_context(OurRelay())
        out.append(("our relay", r.url, None))
    if which in ("go", "both"):
        from tests.interop_peers import GoDerper, derper_path
        if derper_path():
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-derper-"))
            r = stack.enter_context(GoDerper(tmp))
            out.append(("Go derper", r.url, None))
        else:
            print("(Go derper not built: run interop/build.sh)")
    return out


def run_suite(name, url, ssl_ctx, mb, opts):
    kw = {"direct": False, **opts}  # this bench measures the relay path
    if ssl_ctx is not None:
        kw["ssl_context"] = ssl_ctx
    with derpquic.listen(url, **kw) as ln, derpquic.Dialer(url, **kw) as d, \
            derpquic.Dialer(url, reuse_connections=False, **kw) as dfresh:
        one = bulk(ln, d, mb << 20, 1)
        eight = bulk(ln, d, mb << 20, 8)
        pp = pingpong(ln, d)
        med, worst = dial_first_byte(ln, dfresh)
    print(f"{name:10s} 1 stream {one:6.1f} MB/s | 8 streams {eight:6.1f} MB/s | ping-pong {pp:6.0f} rt/s | "
          f"dial->first byte median {med:5.1f} ms (max {worst:5.1f})", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relay", choices=["ours", "go", "both"], default="both")
    p.add_argument("--mb", type=int, default=64, help="bulk transfer size in MiB (default 64)")
    p.add_argument("--sweep-sizes", help="comma-separated max_datagram_size values: bulk MB/s of each")
    p.add_argument("--sweep-windows", help="comma-separated stream windows in MiB (connection = 4x)")
    args = p.parse_args(argv)
    with ExitStack() as stack:
        for name, url, ctx in _relays(args.relay, stack):
            if args.sweep_sizes:
                for size in [int(x) for x in args.sweep_sizes.split(",")]:
                    with derpquic.listen(url, max_datagram_size=size, direct=False) as ln, \
                            derpquic.Dialer(url, max_datagram_size=size, direct=False) as d:
                        print(f"{name:10s} max_datagram_size {size:6d}: {bulk(ln, d, args.mb << 20):6.1f} MB/s",
                              flush=True)
            elif args.sweep_windows:
                for w in [float(x) for x in args.sweep_windows.split(",")]:
                    kw = dict(stream_window=int(w * (1 << 20)), connection_window=int(4 * w * (1 << 20)), direct=False)
                    with derpquic.listen(url, **kw) as ln, derpquic.Dialer(url, **kw) as d:
                        print(f"{name:10s} stream window {w:5g} MiB: 1 stream {bulk(ln, d, args.mb << 20):6.1f} MB/s,"
                              f" 8 streams {bulk(ln, d, args.mb << 20, 8):6.1f} MB/s", flush=True)
            else:
                run_suite(name, url, ctx, args.mb, {})
    if not (args.sweep_sizes or args.sweep_windows) and args.relay in ("go", "both"):
        from bench.cli_pair import run as cli_pairs
        cli_pairs(min(args.mb, 32), runs=1)  # serve/join pairs, Go and ours, through both relays on :443
    return 0


if __name__ == "__main__":
    sys.exit(main())
