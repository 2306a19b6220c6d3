"""Relay load: many connected clients, many pairs exchanging packets; ours vs the Go derper.

    python bench/relay.py [--clients 1000] [--pairs 200] [--seconds 10] [--size 1200] [--window 4]

For each relay (our `python -m derpnet.server` and, when built, Tailscale's Go
`derper`, both plain HTTP on loopback, each in its own process) it connects
`--clients` DERP clients (all of them stay connected and keep reading), then lets
the first `2*--pairs` of them play ping-pong in pairs: each sender keeps `--window`
packets in flight, the partner echoes each packet back. It prints relayed packets/s,
MB/s, round-trip latency p50/p99 (two relay traversals), the relay's peak RSS and
the ratio ours/Go. The load generator is one asyncio process sharing the machine
with the relay, so the absolute figures are a lower bound; the ratio is the point.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derpnet import frames as F  # noqa: E402
from derpnet.connection import ClientConnection, Connected  # noqa: E402
from derpnet.keys import PrivateKey  # noqa: E402

_STAMP = struct.Struct(">Qd")  # sequence, send time


class LoadClient:
    """One DERP client on an asyncio stream, driven by the sans-IO ClientConnection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.key = PrivateKey.generate()
        self.conn = ClientConnection(self.key, f"{host}:{port}")
        self.partner = None
        self.echo = False
        self.rtts: list = []
        self.received = 0
        self.window: asyncio.Semaphore | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.conn.initiate())
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("relay closed during the handshake")
            evs = self.conn.receive_data(data)
            out = self.conn.data_to_send()
            if out:
                self.writer.write(out)
            if any(isinstance(e, Connected) for e in evs):
                break
        self._reader = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(1 << 18)
            if not data:
                return
            for ev in self.conn.receive_data(data):
                if isinstance(ev, F.RecvPacket):
                    self.received += 1
                    if self.echo:
                        self.writer.write(self.conn.send_packet(ev.src, ev.data))
                    else:
                        _, sent = _STAMP.unpack_from(ev.data)
                        self.rtts.append(time.perf_counter() - sent)
                        self.window.release()
            out = self.conn.data_to_send()
            if out:
                self.writer.write(out)

    async def pump(self, size: int, window: int, stop_at: float) -> None:
        self.window = asyncio.Semaphore(window)
        pad = b"\0" * (size - _STAMP.size)
        seq = 0
        while time.perf_counter() < stop_at:
            try:
                await asyncio.wait_for(self.window.acquire(), timeout=1.0)
            except asyncio.TimeoutError:
                self.window.release()  # a packet was dropped by the relay: refill the window
                continue
            seq += 1
            self.writer.write(self.conn.send_packet(self.partner, _STAMP.pack(seq, time.perf_counter()), pad))
            if self.writer.transport.get_write_buffer_size() > 1 << 20:
                await self.writer.drain()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


async def run_load(host: str, port: int, clients: int, pairs: int, seconds: float, size: int, window: int) -> dict:
    cs = [LoadClient(host, port) for _ in range(clients)]
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(64)

    async def connect(c: LoadClient) -> None:
        async with sem:
            await c.connect()

    await asyncio.gather(*(connect(c) for c in cs))
    connect_s = time.perf_counter() - t0
    senders, echoers = cs[:pairs], cs[pairs:2 * pairs]
    for s, e in zip(senders, echoers):
        s.partner, e.echo = e.key.public_key, True
    stop_at = time.perf_counter() + seconds
    t1 = time.perf_counter()
    await asyncio.gather(*(s.pump(size, window, stop_at) for s in senders))
    elapsed = time.perf_counter() - t1
    await asyncio.sleep(0.5)  # let in-flight echoes land before counting (not a correctness wait)
    rtts = sorted(r for s in senders for r in s.rtts)
    relayed = sum(s.received for s in senders) + sum(e.received for e in echoers)
    for c in cs:
        c.close()
    return {
        "connect_s": connect_s,
        "pps": relayed / elapsed,
        "mbps": relayed * size / elapsed / 1e6,
        "p50_ms": statistics.median(rtts) * 1e3 if rtts else float("nan"),
        "p99_ms": rtts[int(len(rtts) * 0.99)] * 1e3 if rtts else float("nan"),
        "round_trips": len(rtts),
    }


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--window", type=int, default=4)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.clients + 256)), hard))

    from tests.interop_peers import GoDerper, derper_path
    from tests.relays import OurRelay

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        relays = [("ours", lambda: OurRelay())]
        if derper_path():
            relays.append(("go derper", lambda: GoDerper(Path(tmp) / "derper")))
        else:
            print("Go derper not built (run interop/build.sh): measuring ours only", file=sys.stderr)
        for name, make in relays:
            with make() as relay:
                host, port = "127.0.0.1", relay.port
                pid = relay.proc.pid
                r = asyncio.run(run_load(host, port, args.clients, args.pairs, args.seconds, args.size, args.window))
                r["rss_mb"] = peak_rss_mb(pid)
                results[name] = r
            print(f"{name:10s} clients={args.clients} pairs={args.pairs} size={args.size}: "
                  f"connect {r['connect_s']:.2f}s, {r['pps']:,.0f} pkt/s, {r['mbps']:.1f} MB/s, "
                  f"RTT p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms, peak RSS {r['rss_mb']:.1f} MiB")
    if len(results) == 2:
        o, g = results["ours"], results["go derper"]
        print(f"ratio ours/go: pkt/s {o['pps'] / g['pps']:.2f}, p50 {o['p50_ms'] / g['p50_ms']:.2f}, "
              f"p99 {o['p99_ms'] / g['p99_ms']:.2f}, RSS {o['rss_mb'] / g['rss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
