"""Forwarding across a DERP mesh: ours vs Tailscale's derper, measured side by side in one run.

    python bench/mesh.py [--pairs 50] [--seconds 8] [--size 1200] [--window 8] [--meshes derper,ours,mixed]

For each mesh of two members on loopback (`derper`: two Go derpers; `ours`: two of our
relays; `mixed`: a derper and ours, senders on the derper), `--pairs` senders connect to
the first member and their echoers to the second: every packet crosses the mesh twice
(ForwardPacket A→B, then B→A for the echo). Each sender keeps `--window` packets in flight.
The same is run with both clients of a pair on the first member ("single") for the cost
of a relay that does not forward. Reported per mesh: echoed packets/s, relayed packets/s
(2 per echo), the members' CPU (sum, 1.00 = one core) and microseconds of member CPU per
relayed packet, the figure that does not depend on the (single-process, Python) load
generator. The generator runs in this process; the members in their own.

It reuses the test harness's mesh (tests/derpnet/meshnet.py: same mesh key, --mesh-with
naming every member, plain HTTP with TS_DEBUG_USE_DERP_HTTP=1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from derpnet import frames as F  # noqa: E402
from derpnet.connection import ClientConnection, Connected, Hello, Upgrade  # noqa: E402
from derpnet.keys import PrivateKey, PublicKey  # noqa: E402
from tests.derpnet.meshnet import Mesh  # noqa: E402
from tests.interop_peers import derper_path  # noqa: E402

_SEQ = struct.Struct(">Q")


class Client(asyncio.Protocol):
    """A DERP client on the sans-IO ClientConnection: a sender counts echoes, an echoer echoes."""

    def __init__(self, port: int, echo: bool) -> None:
        self.key = PrivateKey.generate()
        self.pub = self.key.public_key
        self.conn = ClientConnection(self.key, f"127.0.0.1:{port}")
        self.echo = echo
        self.transport: asyncio.Transport | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.first = asyncio.get_running_loop().create_future()  # the first echo (the mesh route works)
        self.partner: PublicKey | None = None
        self.sending = False
        self.echoes = 0
        self.pad = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.conn.send(Upgrade()))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        out = []
        events = self.conn.receive_data(data)
        for ev in events:
            if type(ev) is F.RecvPacket:
                if self.echo:
                    out.append(F.encode_send_packet(ev.src, ev.data))
                    continue
                self.echoes += 1
                if not self.first.done():
                    self.first.set_result(True)
                elif self.sending:
                    out.append(F.encode_send_packet(self.partner, ev.data))
            elif isinstance(ev, F.ServerKey):
                out.append(self.conn.send(Hello()))
                events.extend(self.conn.receive_data(b""))
            elif isinstance(ev, F.Ping):
                out.append(self.conn.send(ev.response()))
            elif isinstance(ev, Connected):
                self.ready.set_result(True)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def send(self, n: int) -> None:
        assert self.transport is not None and self.partner is not None
        self.transport.write(b"".join(F.encode_send_packet(self.partner, _SEQ.pack(i), self.pad) for i in range(n)))


def proc_cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(ports: tuple[int, int], pids: list[int], args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    pairs = []
    for _ in range(args.pairs):
        s, e = Client(ports[0], False), Client(ports[1], True)
        for c, port in ((s, ports[0]), (e, ports[1])):
            await loop.create_connection(lambda c=c: c, "127.0.0.1", port)
            await c.ready
        s.partner, s.pad = e.pub, bytes(max(0, args.size - _SEQ.size))
        pairs.append((s, e))
    deadline = loop.time() + 60
    for s, _ in pairs:  # until the mesh knows every key (derper retries its links every 5 s)
        while not s.first.done():
            s.send(1)
            try:
                await asyncio.wait_for(asyncio.shield(s.first), 0.5)
            except TimeoutError:
                if loop.time() > deadline:
                    raise RuntimeError("the mesh never forwarded a probe") from None
    for s, _ in pairs:
        s.sending = True
        s.send(args.window)
    await asyncio.sleep(args.warmup)
    n0, cpu0, t0 = sum(s.echoes for s, _ in pairs), sum(proc_cpu_s(p) for p in pids), time.perf_counter()
    await asyncio.sleep(args.seconds)
    n1, cpu1, t1 = sum(s.echoes for s, _ in pairs), sum(proc_cpu_s(p) for p in pids), time.perf_counter()
    for s, e in pairs:
        s.sending = False
        for c in (s, e):
            if c.transport is not None:
                c.transport.close()
    echoes = (n1 - n0) / (t1 - t0)
    cpu = (cpu1 - cpu0) / (t1 - t0)
    return {"echo_pps": echoes, "relayed_pps": 2 * echoes, "cpu": cpu,
            "us_per_pkt": cpu / (2 * echoes) * 1e6 if echoes else float("nan")}


def member_pid(m) -> int:
    return m.proc.proc.pid if hasattr(m.proc, "proc") else m.proc.pid


def run(kinds: list[str], args: argparse.Namespace) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="bench-mesh-") as tmp, Mesh(Path(tmp), kinds) as mesh:
        pids = [member_pid(m) for m in mesh.members]
        out = {"mesh": asyncio.run(measure((mesh.ports[0], mesh.ports[1]), pids, args))}
        out["single"] = asyncio.run(measure((mesh.ports[0], mesh.ports[0]), pids, args))
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--meshes", default="derper,ours,mixed")
    args = ap.parse_args()
    layouts = {"derper": ["derper", "derper"], "ours": ["ours", "ours"], "mixed": ["derper", "ours"]}
    results = {}
    for name in args.meshes.split(","):
        if "derper" in layouts[name] and derper_path() is None:
            print(f"{name}: skipped (Go derper not built: interop/build.sh)")
            continue
        results[name] = run(layouts[name], args)
    print(f"{args.pairs} pairs, window {args.window}, {args.size} B, {args.seconds:g} s; "
          "CPU = both members, 1.00 = one core")
    print(f"{'mesh':8} {'path':7} {'echo/s':>9} {'relayed/s':>10} {'CPU':>6} {'us CPU/pkt':>11}")
    for name, r in results.items():
        for path in ("mesh", "single"):
            x = r[path]
            print(f"{name:8} {path:7} {x['echo_pps']:9.0f} {x['relayed_pps']:10.0f} {x['cpu']:6.2f} "
                  f"{x['us_per_pkt']:11.1f}")
    if "derper" in results and "ours" in results:
        d, o = results["derper"]["mesh"], results["ours"]["mesh"]
        print(f"ours/derper across the mesh: {o['relayed_pps'] / d['relayed_pps']:.2f}x packets/s, "
              f"{o['us_per_pkt'] / d['us_per_pkt']:.2f}x CPU per packet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
