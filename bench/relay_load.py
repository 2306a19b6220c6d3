"""Relay load: live DERP clients plus thousands of abandoned connections, in one relay process.

    python bench/relay_load.py [--live 1000] [--abandoned 10000] [--handshake-timeout 10] [--tls]

Starts `python -m derpnet.server` (tests.relays.OurRelay), connects `--live` DERP clients
that stay connected, opens `--abandoned` TCP connections that never send a byte, and
while all of them are open measures a fresh client's connect time and packet round
trips between live clients. Then it waits for the relay's handshake timer to close the
abandoned ones and reports the relay's RSS and CPU time along the way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derpnet import frames as F  # noqa: E402
from derpnet.connection import ClientConnection, Connected, Hello, Upgrade  # noqa: E402
from derpnet.keys import PrivateKey  # noqa: E402


class Live:
    """A DERP client on asyncio streams, driven by the sans-IO ClientConnection."""

    def __init__(self, port: int, ssl_ctx=None) -> None:
        self.port, self.ssl_ctx = port, ssl_ctx
        self.key = PrivateKey.generate()
        self.conn = ClientConnection(self.key, "localhost")
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.reader = self.writer = None
        self.task = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.ssl_ctx, server_hostname="localhost" if self.ssl_ctx else None)
        self.writer.write(self.conn.send(Upgrade()))
        while True:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("relay closed during the handshake")
            events = self.conn.receive_data(data)
            if any(isinstance(e, F.ServerKey) for e in events):
                self.writer.write(self.conn.send(Hello()))
                events += self.conn.receive_data(b"")
            if any(isinstance(e, Connected) for e in events):
                break
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while data := await self.reader.read(1 << 16):
            for ev in self.conn.receive_data(data):
                if isinstance(ev, F.RecvPacket):
                    self.inbox.put_nowait(ev)
                elif isinstance(ev, F.Ping):
                    self.writer.write(self.conn.send(ev.response()))

    def send(self, dst, data: bytes) -> None:
        self.writer.write(self.conn.send(F.SendPacket(dst, data)))

    def close(self) -> None:
        if self.task:
            self.task.cancel()
        if self.writer:
            self.writer.close()


def proc_stats(pid: int) -> tuple:
    """(RSS MiB, CPU seconds) of a process."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, cpu


async def round_trips(a: Live, b: Live, n: int) -> list:
    rtts = []
    for i in range(n):
        t = time.perf_counter()
        a.send(b.key.public_key, i.to_bytes(4, "big") + bytes(1196))
        await asyncio.wait_for(b.inbox.get(), 10)
        rtts.append(time.perf_counter() - t)
    return rtts


async def run(port: int, pid: int, live_n: int, abandoned_n: int, timeout: float, ssl_ctx) -> None:
    def report(what: str) -> None:
        rss, cpu = proc_stats(pid)
        print(f"  {what:48s} relay RSS {rss:7.1f} MiB, CPU {cpu:6.2f} s", flush=True)

    report("idle")
    sem = asyncio.Semaphore(100)

    async def connect(c: Live) -> None:
        async with sem:
            await c.connect()

    t0 = time.perf_counter()
    live = [Live(port, ssl_ctx) for _ in range(live_n)]
    await asyncio.gather(*(connect(c) for c in live))
    report(f"{live_n} live clients connected in {time.perf_counter() - t0:.2f}s")

    t0 = time.perf_counter()
    abandoned = []
    for i in range(0, abandoned_n, 500):
        batch = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                       for _ in range(min(500, abandoned_n - i))))
        abandoned.extend(batch)
    opened_at = time.perf_counter()
    report(f"+{abandoned_n} abandoned connections in {opened_at - t0:.2f}s")

    t0 = time.perf_counter()
    fresh = Live(port, ssl_ctx)
    await fresh.connect()
    connect_ms = (time.perf_counter() - t0) * 1e3
    rtts = await round_trips(live[0], live[-1], 200)
    print(f"  with everything open: new client connects in {connect_ms:.1f} ms; 1200-byte packet "
          f"p50 {statistics.median(rtts) * 1e3:.2f} ms, max {max(rtts) * 1e3:.2f} ms", flush=True)

    async def closed_by_relay(rw) -> bool:
        reader, _ = rw
        try:
            return await asyncio.wait_for(reader.read(1), timeout + 20) == b""
        except (TimeoutError, ConnectionError):
            return False

    results = await asyncio.gather(*(closed_by_relay(rw) for rw in abandoned))
    print(f"  relay closed {sum(results)}/{abandoned_n} abandoned connections "
          f"{time.perf_counter() - opened_at:.1f}s after they were opened", flush=True)
    for _, w in abandoned:
        w.close()
    rtts = await round_trips(live[0], live[-1], 200)
    report(f"after cleanup (p50 {statistics.median(rtts) * 1e3:.2f} ms)")
    for c in live + [fresh]:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--live", type=int, default=1000)
    ap.add_argument("--abandoned", type=int, default=10000)
    ap.add_argument("--handshake-timeout", type=float, default=10.0)
    ap.add_argument("--tls", action="store_true")
    args = ap.parse_args()
    need = args.live + args.abandoned + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))  # inherited by the relay

    from tests.relays import OurRelay
    with OurRelay(tls=args.tls, extra_args=["--handshake-timeout", str(args.handshake_timeout)]) as relay:
        print(f"relay {relay.url} pid {relay.proc.pid}: {args.live} live + {args.abandoned} abandoned", flush=True)
        asyncio.run(run(relay.port, relay.proc.pid, args.live, args.abandoned, args.handshake_timeout,
                        relay.ssl_context()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
