"""Single-flow bandwidth through one relay: one sender, one receiver, 64 KiB packets.

Used by bench/relay.py (the "single flow" row); runnable alone as its worker. The worker
process holds both DERP clients (asyncio, plain TCP or TLS through asyncio's SSL
transport): the sender keeps `window` packets of `size` bytes in flight (sent, not yet
counted by the receiver), so no relay ever has more queued for the receiver than its
32-packet queue holds and nothing is dropped: the figure is what the relay can move,
not how it drops. The receiver walks frame headers without decoding payloads, so the
generator stays cheap next to the relay. The parent samples the relay's CPU time at the
edges of the measured interval: MB/s and relay CPU-ms per MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from derpnet import frames as F  # noqa: E402
from derpnet.connection import ClientConnection, Connected, Hello, Upgrade  # noqa: E402
from derpnet.keys import PrivateKey, PublicKey  # noqa: E402

_HDR = struct.Struct(">BI")
_now_ns = time.monotonic_ns


class FlowClient(asyncio.BufferedProtocol):
    """One DERP client; after the handshake the receiver only counts RecvPacket frames."""

    def __init__(self, host: str, on_packets=None) -> None:
        self.key = PrivateKey.generate()
        self.pub = self.key.public_key
        self.conn = ClientConnection(self.key, host)
        self.transport: asyncio.Transport | None = None
        self.connected = asyncio.get_running_loop().create_future()
        self.on_packets = on_packets  # called with the number of packets counted
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.up = False
        self.left = 0        # payload bytes of the current frame still to skip
        self.ftype = 0
        self.head = b""      # a frame header split across reads
        self.packets = 0
        self.payload = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.conn.send(Upgrade()))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"relay closed during the handshake: {exc}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.up:
            self._count(nbytes)
            return
        events = self.conn.receive_data(bytes(self.buf[:nbytes]))
        for ev in events:
            if isinstance(ev, F.ServerKey):
                self.transport.write(self.conn.send(Hello()))  # type: ignore[union-attr]
                events.extend(self.conn.receive_data(b""))
            elif isinstance(ev, F.Ping):
                self.transport.write(self.conn.send(ev.response()))  # type: ignore[union-attr]
            elif isinstance(ev, Connected):
                self.up = True
                self.connected.set_result(True)
            elif isinstance(ev, F.RecvPacket) and self.up:
                self.packets += 1

    def _count(self, n: int) -> None:
        buf, i, counted = self.buf, 0, 0
        while i < n:
            if self.left:
                take = min(self.left, n - i)
                self.left -= take
                i += take
                if not self.left and self.ftype == F.FrameType.RECV_PACKET:
                    counted += 1
                continue
            need = F.FRAME_HEADER_LEN - len(self.head)
            self.head += bytes(buf[i:i + need])
            i += min(need, n - i)
            if len(self.head) < F.FRAME_HEADER_LEN:
                break
            self.ftype, self.left = _HDR.unpack(self.head)
            self.head = b""
            if self.ftype == F.FrameType.RECV_PACKET:
                self.payload += self.left - 32
            if not self.left and self.ftype == F.FrameType.RECV_PACKET:
                counted += 1
        if counted:
            self.packets += counted
            if self.on_packets is not None:
                self.on_packets(counted)


async def flow(port: int, host: str, ca_file: str | None, size: int, window: int, t_measure: int | None,
               t_end: int | None, ready=None) -> dict:
    """Connect a sender and a receiver, run the flow until `t_end`; counts within [t_measure, t_end)."""
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else None
    name = "localhost" if ctx else f"127.0.0.1:{port}"
    frame = b""
    inflight = 0
    counted = {"packets": 0}
    state = {"t_measure": t_measure, "t_end": t_end}

    def on_packets(n: int) -> None:
        nonlocal inflight
        inflight -= n
        now = _now_ns()
        if state["t_measure"] is not None and state["t_measure"] <= now < state["t_end"]:
            counted["packets"] += n
        if state["t_end"] is None or now < state["t_end"]:
            refill()

    def refill() -> None:
        nonlocal inflight
        n = window - inflight
        if n > 0:
            inflight += n
            sender.transport.write(frame * n if n > 1 else frame)  # type: ignore[union-attr]

    sender = FlowClient(name)
    receiver = FlowClient(name, on_packets)
    for c in (sender, receiver):
        await loop.create_connection(lambda c=c: c, "127.0.0.1", port, ssl=ctx,
                                     server_hostname="localhost" if ctx else None)
        await c.connected
    frame = F.encode_send_packet(PublicKey(receiver.pub.raw), bytes(size))
    if ready is not None:
        state["t_measure"], state["t_end"] = await ready()
    await asyncio.sleep(max(0, state["t_measure"] - _now_ns() - 500_000_000) / 1e9)  # 0.5 s of warm-up
    refill()
    await asyncio.sleep(max(0, state["t_end"] - _now_ns()) / 1e9)
    for c in (sender, receiver):
        c.transport.close()  # type: ignore[union-attr]
    return {"packets": counted["packets"], "size": size}


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca-file")
    ap.add_argument("--size", type=int, default=64 << 10)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--pin-cpus")
    a = ap.parse_args(argv)
    if a.pin_cpus:
        os.sched_setaffinity(0, {int(c) for c in a.pin_cpus.split(",")})

    async def ready() -> tuple[int, int]:
        print("READY", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        _, t_measure, t_end = line.split()
        return int(t_measure), int(t_end)

    result = asyncio.run(flow(a.port, "127.0.0.1", a.ca_file, a.size, a.window, None, None, ready))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def run_flow(port: int, relay_pid: int, *, seconds: float, size: int, window: int, ca_file: str | None,
             gen_cpus: str, proc_cpu_s) -> dict:
    """Run the single flow against a relay (worker subprocess); MB/s and relay CPU-ms per MB."""
    argv = [sys.executable, __file__, "--port", str(port), "--size", str(size), "--window", str(window)]
    if ca_file:
        argv += ["--ca-file", ca_file]
    if gen_cpus:
        argv += ["--pin-cpus", gen_cpus]
    w = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = w.stdout.readline()  # type: ignore[union-attr]
    if line.strip() != "READY":
        w.kill()
        raise RuntimeError(f"single-flow worker failed to connect: {line!r}")
    t_measure = _now_ns() + 1_000_000_000
    t_end = t_measure + int(seconds * 1e9)
    w.stdin.write(f"GO {t_measure} {t_end}\n")  # type: ignore[union-attr]
    w.stdin.flush()  # type: ignore[union-attr]
    time.sleep(max(0, t_measure - _now_ns()) / 1e9)  # a bench: sample the relay's CPU at the window edges
    cpu0 = proc_cpu_s(relay_pid)
    time.sleep(max(0, t_end - _now_ns()) / 1e9)
    cpu1 = proc_cpu_s(relay_pid)
    out, _ = w.communicate(timeout=60)
    res = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if w.returncode != 0 or not res:
        raise RuntimeError(f"single-flow worker failed (rc={w.returncode}): {out[-500:]}")
    r = json.loads(res[0][7:])
    mb = r["packets"] * size / 1e6
    cpu = cpu1 - cpu0
    return {"flow_mbps": mb / seconds, "flow_cpu_ms_per_mb": cpu * 1e3 / mb if mb else float("nan"),
            "flow_relay_cpu": cpu / seconds}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
