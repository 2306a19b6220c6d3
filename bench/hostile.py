"""Relay memory and honest throughput under hostile clients: our relay and Tailscale's derper.

    python bench/hostile.py [--seconds 3] [--only NAME ...] [--no-derper]

For each relay (ours: `python -m derpnet.server`, default options; the Go derper where
built) and each flood of issue 9 — ClientInfo bombs (scalar and container), deep nesting,
pre-hello frames, partial ClientInfos, 10,000 abandoned connections — prints the relay's
RSS (VmRSS) and an honest PacketConn pair's throughput (1,200-byte datagrams, one way)
with the flood held open, next to the same figures without it, measured in the same run.
The attack clients are tests/hostile/abuse.py's. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import derpnet  # noqa: E402
from derpnet import frames as F  # noqa: E402
from tests.hostile.abuse import (  # noqa: E402
    client_info_with,
    container_bomb,
    deep_nesting,
    open_abandoned,
    preauth_frame,
    raise_nofile,
    rss_mib,
    scalar_bomb,
)
from tests.interop_peers import GoDerper, derper_path  # noqa: E402
from tests.relays import OurRelay  # noqa: E402


class Meter:
    """An honest PacketConn pair, opened first (low descriptors: derpnet's dialer uses
    select()), measuring datagrams per second from one to the other through the relay."""

    def __init__(self, url: str) -> None:
        self.a = derpnet.listen_packet(url, direct=False)
        self.b = derpnet.listen_packet(url, direct=False)
        self.got = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        self.b.settimeout(0.2)
        while not self._stop.is_set():
            try:
                self.b.read_from()
                self.got += 1
            except TimeoutError:
                continue
            except OSError:
                return

    def rate(self, seconds: float) -> float:
        payload, dst = bytes(1200), self.b.local_addr()
        start = self.got
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(64):
                self.a.write_to(payload, dst)
            time.sleep(0)  # let the receiver run on a busy machine
        time.sleep(0.3)  # what is in flight
        return (self.got - start) / seconds

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.a.close()
        self.b.close()


def _hold(make: Callable[[], socket.socket], n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        try:
            out.append(make())
        except OSError:
            pass  # refused at once: that is a result too
    return out


def _accepted(url: str, payload: bytes) -> socket.socket:
    s, _ = client_info_with(url, payload)
    return s


FLOODS: dict[str, Callable[[str], list[socket.socket]]] = {
    "100 ClientInfo bombs, 15,000 scalar keys (held)": lambda url: _hold(lambda: _accepted(url, scalar_bomb()), 100),
    "100 ClientInfo bombs, [{}]*85000 (held)": lambda url: _hold(lambda: _accepted(url, container_bomb()), 100),
    "300 ClientInfos nested 100,000 deep": lambda url: _hold(lambda: _accepted(url, deep_nesting()), 300),
    "200 pre-hello 1 MiB Pongs (held, last byte missing)": lambda url: _hold(
        lambda: preauth_frame(url, F.FrameType.PONG, 1 << 20, sent=(1 << 20) - 1), 200),
    "200 partial 250 KiB ClientInfos (held)": lambda url: _hold(
        lambda: preauth_frame(url, F.FrameType.CLIENT_INFO, (256 << 10) - 1, sent=250 << 10), 200),
    "10,000 abandoned connections": lambda url: open_abandoned(url, 10_000),
}


def run(name: str, url: str, pid: int, seconds: float, only: list[str]) -> dict[str, tuple[float, float, int]]:
    """{flood: (RSS MiB, datagrams/s, sockets still open)}, "none" first."""
    meter = Meter(url)
    try:
        return _run(name, url, pid, seconds, only, meter)
    finally:
        meter.close()


def _run(name: str, url: str, pid: int, seconds: float, only: list[str],
         meter: Meter) -> dict[str, tuple[float, float, int]]:
    out = {"none": (rss_mib(pid), meter.rate(seconds), 0)}
    print(f"{name}: no flood: RSS {out['none'][0]:.1f} MiB, {out['none'][1]:,.0f} datagrams/s", flush=True)
    for flood, make in FLOODS.items():
        if only and not any(o.lower() in flood.lower() for o in only):
            continue
        socks = make(url)
        try:
            still = sum(1 for s in socks if _open(s))
            rss = rss_mib(pid)
            rate = meter.rate(seconds)
            rss = max(rss, rss_mib(pid))
        finally:
            for s in socks:
                s.close()
        out[flood] = (rss, rate, still)
        print(f"{name}: {flood}: RSS {rss:.1f} MiB, {rate:,.0f} datagrams/s, {still} of {len(socks)} "
              f"attack connections still open", flush=True)
        time.sleep(1.0)  # let the relay settle (closing, freeing) before the next flood
    return out


def _open(s: socket.socket) -> bool:
    import select
    p = select.poll()
    p.register(s, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return not p.poll(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="throughput measurement per step")
    ap.add_argument("--only", nargs="*", default=[], help="floods whose name contains one of these words")
    ap.add_argument("--no-derper", action="store_true")
    args = ap.parse_args()
    raise_nofile(16_000)
    results = {}
    with OurRelay(extra_args=["--handshake-timeout", "10"]) as relay:
        results["ours"] = run("ours", relay.url, relay.proc.pid, args.seconds, args.only)
    if not args.no_derper and derper_path():
        with tempfile.TemporaryDirectory() as tmp:
            d = GoDerper(tmp).start()
            try:
                results["derper"] = run("derper", d.url, d.proc.proc.pid, args.seconds, args.only)
            finally:
                d.stop()
    print()
    names = list(results)
    head = f"{'flood':55}" + "".join(f"{n + ' RSS':>16}{n + ' dgram/s':>18}" for n in names)
    print(head)
    for flood in results["ours"]:
        row = f"{flood:55}"
        for n in names:
            rss, rate, _ = results[n].get(flood, (float("nan"), float("nan"), 0))
            base = results[n]["none"][0]
            row += f"{rss:9.1f} ({rss - base:+5.1f}){rate:>18,.0f}"
        print(row)


if __name__ == "__main__":
    main()
