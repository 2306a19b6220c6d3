"""Relay throughput: many flows and a single flow, ours vs the Go derper, in one run with ratios.

    python bench/relay.py [--tls] [--repeat 3] [--relays ours,go] [--scenarios many,flow]
                          [--clients 1000] [--pairs 200] [--seconds 10] [--size 1200] [--window 4]
                          [--flow-seconds 5] [--flow-size 65536] [--flow-window 32] [--procs 2]
                          [--relays baseline,ours,go --baseline DIR]  # DIR: another checkout of ours

For each relay (our `python -m derpnet.server` and, when built, Tailscale's Go `derper`,
plain HTTP or, with `--tls`, HTTPS with a test CA, each in its own process, measured one
after the other; `--repeat N` interleaves N rounds and prints medians; `ours-asyncio` is
ours on the standard event loop, `baseline` ours from another checkout; `--policies` adds
each relay with access control and rate limiting on, bench/relay_policy.py):

- many flows: `--clients` DERP clients connect (all stay connected and keep reading), the
  first `2*--pairs` play ping-pong in pairs, each sender keeping `--window` packets in
  flight, echoed back by its partner (a packet not echoed within a second counts as lost).
  The load generator is split over `--procs` worker processes (asyncio Protocols on the
  sans-IO ClientConnection), because one Python process cannot keep a Go relay busy.
  Reported: relayed packets/s, MB/s, lost packets, one-way latency (sender → relay →
  echoer; CLOCK_MONOTONIC is shared by the processes) and round trip p50/p99 (mostly
  queueing in this closed loop), the relay's CPU use and packets per relay CPU-second (the
  figure that does not depend on the load generator), the generator's CPU use;
- single flow (bench/relay_flow.py): one sender, one receiver, 64 KiB packets, 32 in
  flight; MB/s and relay CPU-ms per MB;
- the relay's peak RSS (VmHWM).

By default (2+ CPUs) the relay is pinned to CPU 0 and the generator to the others, so
each relay gets one core and the generator never takes it (`--no-pin` to share). Figures,
before/after and the profile behind them: README, "Relay performance".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.relay_policy import admission_controller, policy_args  # noqa: E402
from derpnet import frames as F  # noqa: E402
from derpnet.connection import ClientConnection, Connected, Hello, Upgrade  # noqa: E402
from derpnet.keys import PrivateKey, PublicKey  # noqa: E402

_STAMP = struct.Struct(">QQ")  # sequence, send time (CLOCK_MONOTONIC ns)
_now_ns = time.monotonic_ns     # CLOCK_MONOTONIC on Linux: comparable between processes
LOSS_AFTER_NS = 1_000_000_000


# ---------------------------------------------------------------- worker side

class LoadClient(asyncio.Protocol):
    """One DERP client: an asyncio Protocol driving the sans-IO ClientConnection."""

    def __init__(self, worker: Worker, host: str) -> None:
        self.worker = worker
        self.key = PrivateKey.generate()
        self.pub = self.key.public_key
        self.conn = ClientConnection(self.key, host)
        self.transport: asyncio.Transport | None = None
        self.connected = asyncio.get_running_loop().create_future()
        self.partner: PublicKey | None = None
        self.role = "idle"          # "sender", "echoer" or "idle"
        self.outstanding: dict[int, int] = {}  # sender: seq -> send time
        self.seq = 0
        self.pad = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.conn.send(Upgrade()))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"relay closed during the handshake: {exc}"))
        elif self.worker.running:
            self.worker.errors.append(f"relay dropped a {self.role} client: {exc}")

    def data_received(self, data: bytes) -> None:
        events = self.conn.receive_data(data)
        out = []
        w = self.worker
        now = None
        for ev in events:
            if type(ev) is F.RecvPacket:
                if now is None:
                    now = _now_ns()
                seq, sent = _STAMP.unpack_from(ev.data)
                if self.role == "echoer":
                    out.append(F.encode_send_packet(ev.src, ev.data))
                    if w.measuring(now):
                        w.received += 1
                        w.one_way.append(now - sent)
                elif self.role == "sender":
                    if self.outstanding.pop(seq, None) is None:
                        continue  # already counted as lost
                    if w.measuring(now):
                        w.received += 1
                        w.rtt.append(now - sent)
                    if w.sending(now):
                        out.append(self._next(now))
            elif isinstance(ev, F.ServerKey):
                out.append(self.conn.send(Hello()))
                events.extend(self.conn.receive_data(b""))  # what waited for the hello
            elif isinstance(ev, F.Ping):
                out.append(self.conn.send(ev.response()))
            elif isinstance(ev, Connected):
                self.connected.set_result(True)
        data = b"".join(out)
        if data:
            self.transport.write(data)  # type: ignore[union-attr]

    def _next(self, now: int) -> bytes:
        self.seq += 1
        self.outstanding[self.seq] = now
        return F.encode_send_packet(self.partner, _STAMP.pack(self.seq, now), self.pad)

    def start_window(self, window: int) -> None:
        now = _now_ns()
        self.transport.write(b"".join(self._next(now) for _ in range(window)))  # type: ignore[union-attr]

    def refill(self, now: int) -> int:
        """Count packets unanswered for a second as lost and send replacements."""
        lost = [s for s, t in self.outstanding.items() if now - t > LOSS_AFTER_NS]
        for s in lost:
            del self.outstanding[s]
        if lost and self.worker.sending(now):
            self.transport.write(b"".join(self._next(now) for _ in lost))  # type: ignore[union-attr]
        return len(lost)


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.received = 0
        self.lost = 0
        self.rtt: list[int] = []
        self.one_way: list[int] = []
        self.errors: list[str] = []
        self.running = False
        self.t_measure = self.t_end = self.t_stop_sending = 0

    def measuring(self, now: int) -> bool:
        return self.t_measure <= now < self.t_end

    def sending(self, now: int) -> bool:
        return now < self.t_stop_sending

    async def run(self) -> dict:
        a = self.args
        loop = asyncio.get_running_loop()
        clients = [LoadClient(self, "localhost" if a.ca_file else f"127.0.0.1:{a.port}") for _ in range(a.clients)]
        sem = asyncio.Semaphore(64)

        ctx = ssl.create_default_context(cafile=a.ca_file) if a.ca_file else None

        async def connect(c: LoadClient) -> None:
            async with sem:
                await loop.create_connection(lambda: c, "127.0.0.1", a.port, ssl=ctx,
                                             server_hostname="localhost" if ctx else None)
                await c.connected

        await asyncio.gather(*(connect(c) for c in clients))
        senders, echoers = clients[:a.pairs], clients[a.pairs:2 * a.pairs]
        pad = bytes(max(0, a.size - _STAMP.size))
        for s, e in zip(senders, echoers, strict=True):
            s.partner, s.role, s.pad = e.pub, "sender", pad
            e.role = "echoer"
        self.running = True
        print("READY", flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        _, t_start, t_measure, t_end = line.split()
        self.t_measure, self.t_end = int(t_measure), int(t_end)
        self.t_stop_sending = self.t_end
        await asyncio.sleep(max(0, int(t_start) - _now_ns()) / 1e9)
        for s in senders:
            s.start_window(a.window)
        ru0 = None
        while True:
            now = _now_ns()
            if ru0 is None and now >= self.t_measure:
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
            if now >= self.t_end + LOSS_AFTER_NS // 2:
                break
            for s in senders:
                lost = s.refill(now)
                if self.measuring(now):
                    self.lost += lost
            await asyncio.sleep(0.1)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        self.running = False
        for c in clients:
            c.transport.close()  # type: ignore[union-attr]
        cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) if ru0 else float("nan")
        # Latency samples are sent back in microseconds.
        return {"received": self.received, "lost": self.lost, "cpu_s": cpu, "errors": self.errors[:5],
                "rtt_us": [x // 1000 for x in self.rtt], "one_way_us": [x // 1000 for x in self.one_way]}


def worker_main(args: argparse.Namespace) -> int:
    if args.pin_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.pin_cpus.split(",")})
    result = asyncio.run(Worker(args).run())
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------- parent side

def pin_process(pid: int, cpus: set) -> None:
    """Pin every thread of `pid` (Go's runtime threads too) to `cpus`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # the thread just ended


def proc_cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _pct(sorted_values: list, q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def run_load(port: int, relay_pid: int, args: argparse.Namespace) -> dict:
    procs = args.procs
    ncpu = os.cpu_count() or 1
    pin = args.pin and ncpu >= 2
    gen_cpus = ",".join(str(c) for c in range(1, ncpu)) if pin else ""
    if pin:
        pin_process(relay_pid, {0})
    workers = []
    for i in range(procs):
        clients = args.clients // procs + (1 if i < args.clients % procs else 0)
        pairs = args.pairs // procs + (1 if i < args.pairs % procs else 0)
        argv = [sys.executable, __file__, "--worker", "--port", str(port), "--clients", str(clients),
                "--pairs", str(pairs), "--size", str(args.size), "--window", str(args.window)]
        if gen_cpus:
            argv += ["--pin-cpus", gen_cpus]
        if args.ca_file:
            argv += ["--ca-file", args.ca_file]
        workers.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT))
    t0 = time.perf_counter()
    for w in workers:
        line = w.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"worker failed to connect its clients: {line!r}")
    connect_s = time.perf_counter() - t0
    start = _now_ns() + 200_000_000
    t_measure = start + int(args.warmup * 1e9)
    t_end = t_measure + int(args.seconds * 1e9)
    for w in workers:
        w.stdin.write(f"GO {start} {t_measure} {t_end}\n")
        w.stdin.flush()
    time.sleep(max(0, t_measure - _now_ns()) / 1e9)  # a bench: sample the relay's CPU at the window edges
    cpu0 = proc_cpu_s(relay_pid)
    time.sleep(max(0, t_end - _now_ns()) / 1e9)
    cpu1 = proc_cpu_s(relay_pid)
    results = []
    for w in workers:
        out, _ = w.communicate(timeout=120)
        line = [x for x in out.splitlines() if x.startswith("RESULT ")]
        if w.returncode != 0 or not line:
            raise RuntimeError(f"worker failed (rc={w.returncode}): {out[-500:]}")
        results.append(json.loads(line[0][7:]))
    received = sum(r["received"] for r in results)
    rtt = sorted(x for r in results for x in r["rtt_us"])
    one_way = sorted(x for r in results for x in r["one_way_us"])
    errors = [e for r in results for e in r["errors"]]
    return {
        "connect_s": connect_s,
        "pps": received / args.seconds,
        "mbps": received * args.size / args.seconds / 1e6,
        "lost": sum(r["lost"] for r in results),
        "ow_p50_ms": _pct(one_way, 0.50) / 1e3,
        "ow_p99_ms": _pct(one_way, 0.99) / 1e3,
        "rtt_p50_ms": _pct(rtt, 0.50) / 1e3,
        "rtt_p99_ms": _pct(rtt, 0.99) / 1e3,
        "relay_cpu": (cpu1 - cpu0) / args.seconds,
        "gen_cpu": sum(r["cpu_s"] for r in results) / args.seconds,
        "errors": errors,
    }


# (label, key of a result, format): the summary rows, one per figure, in print order.
ROWS = [
    ("many flows: relayed pkt/s", "pps", "{:,.0f}"),
    ("many flows: pkt per relay CPU-s", "pps_per_cpu", "{:,.0f}"),
    ("many flows: one-way p50 ms", "ow_p50_ms", "{:.2f}"),
    ("many flows: one-way p99 ms", "ow_p99_ms", "{:.2f}"),
    ("single flow: MB/s", "flow_mbps", "{:,.1f}"),
    ("single flow: relay CPU-ms per MB", "flow_cpu_ms_per_mb", "{:.2f}"),
    ("peak RSS MiB", "rss_mb", "{:.1f}"),
]


def make_relays(wanted: list[str], args: argparse.Namespace, tmp: Path, admit_url: str) -> list:
    """(name, factory) for each relay to measure; factories start it on enter."""
    from tests.interop_peers import GoDerper, derper_path, make_test_ca
    from tests.relays import OurRelay

    relays = []
    for name in wanted:
        if name == "ours":
            relays.append(("ours", lambda: OurRelay(tls=args.tls)))
            if args.policies:
                relays.append(("ours+pol", lambda: OurRelay(tls=args.tls,
                                                            extra_args=policy_args(False, admit_url, tmp))))
        elif name == "ours-asyncio":  # the standard event loop even when uvloop is installed
            relays.append(("ours-asyncio", lambda: OurRelay(tls=args.tls, extra_args=["--event-loop", "asyncio"])))
        elif name == "baseline":
            root = str(Path(args.baseline).resolve())
            # `python -m` puts the working directory first on sys.path: run it there.
            prefix = ["env", "-C", root, f"PYTHONPATH={root}"]
            relays.append(("baseline", lambda prefix=prefix: OurRelay(tls=args.tls, argv_prefix=prefix)))
        elif name == "go":
            if not derper_path():
                print("Go derper not built (run interop/build.sh): measuring ours only", file=sys.stderr)
                continue

            def go(extra: list[str] | None = None, n=[0]) -> GoDerper:  # noqa: B006 - a counter for fresh dirs
                n[0] += 1
                if not args.tls:
                    return GoDerper(tmp / f"derper{n[0]}", extra_args=extra or [])
                from tests.interop_peers import free_port
                ca, leaf = make_test_ca(tmp / f"derper{n[0]}" / "pki")
                return GoDerper(tmp / f"derper{n[0]}", tls=True, port=free_port(), make_leaf=leaf, ca_file=ca,
                                extra_args=extra or [])
            relays.append(("go derper", go))
            if args.policies:
                relays.append(("go+pol", lambda: go(policy_args(True, admit_url, tmp))))
    return relays


def measure(relay, args: argparse.Namespace) -> dict:
    """Every scenario against one running relay."""
    pid = relay.proc.pid
    ca = relay.ca_file if args.tls else None
    args.ca_file = ca
    r: dict = {}
    if "many" in args.scenarios:
        r.update(run_load(relay.port, pid, args))
        r["pps_per_cpu"] = r["pps"] / max(r["relay_cpu"], 1e-9)
    if "flow" in args.scenarios:
        from bench.relay_flow import run_flow
        ncpu = os.cpu_count() or 1
        gen = ",".join(str(c) for c in range(1, ncpu)) if args.pin and ncpu >= 2 else ""
        if gen:
            pin_process(pid, {0})
        r.update(run_flow(relay.port, pid, seconds=args.flow_seconds, size=args.flow_size, window=args.flow_window,
                          ca_file=ca, gen_cpus=gen, proc_cpu_s=proc_cpu_s))
    r["rss_mb"] = peak_rss_mb(pid)
    return r


def print_run(name: str, r: dict) -> None:
    parts = []
    if "pps" in r:
        parts.append(f"connect {r['connect_s']:.2f}s | {r['pps']:8,.0f} pkt/s {r['mbps']:6.1f} MB/s "
                     f"lost {r['lost']} | one-way p50 {r['ow_p50_ms']:6.2f} ms p99 {r['ow_p99_ms']:6.2f} ms | "
                     f"RTT p50 {r['rtt_p50_ms']:6.2f} p99 {r['rtt_p99_ms']:6.2f} | relay CPU {r['relay_cpu']:.2f} "
                     f"({r['pps_per_cpu']:,.0f} pkt per CPU-s) | generator CPU {r['gen_cpu']:.2f}")
    if "flow_mbps" in r:
        parts.append(f"single flow {r['flow_mbps']:7.1f} MB/s, relay CPU {r['flow_relay_cpu']:.2f} "
                     f"({r['flow_cpu_ms_per_mb']:.2f} CPU-ms per MB)")
    parts.append(f"peak RSS {r['rss_mb']:.1f} MiB")
    print(f"{name:10s} " + " | ".join(parts), flush=True)
    for e in r.get("errors", []):
        print(f"  error: {e}")


def medians(runs: list[dict]) -> dict:
    """The median of every numeric figure over a relay's runs."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def print_summary(results: dict[str, list[dict]]) -> None:
    """Medians per relay, and each relay's ratio to the Go derper."""
    names = list(results)
    med = {n: medians(rs) for n, rs in results.items()}
    go = med.get("go derper")
    head = f"{'median of ' + str(len(next(iter(results.values())))) + ' run(s)':36s}" + "".join(
        f"{n:>14s}" for n in names)
    ratios = [n for n in names if go is not None and n != "go derper"]
    head += "".join(f"{n + '/go':>16s}" for n in ratios)
    print(head)
    for label, key, fmt in ROWS:
        if not all(key in med[n] for n in names):
            continue
        line = f"{label:36s}" + "".join(f"{fmt.format(med[n][key]):>14s}" for n in names)
        line += "".join(f"{med[n][key] / go[key]:>16.2f}" for n in ratios if go is not None)
        print(line)


def policy_ratios(results: dict) -> None:
    """With --policies: what access control and rate limiting cost each relay, and ours vs derper with them on."""
    def per_cpu(r: dict) -> float:
        return r["pps"] / max(r["relay_cpu"], 1e-9)

    for plain, pol in (("ours", "ours+pol"), ("go derper", "go+pol")):
        if plain in results and pol in results:
            p, q = results[plain], results[pol]
            print(f"{pol}/{plain}: pkt/s {q['pps'] / p['pps']:.2f}, pkt per relay CPU-s {per_cpu(q) / per_cpu(p):.2f}, "
                  f"relay CPU per packet {1e6 / per_cpu(q):.1f} us vs {1e6 / per_cpu(p):.1f} us")
    if "ours+pol" in results and "go+pol" in results:
        o, g = results["ours+pol"], results["go+pol"]
        print(f"ratio ours/go with policies on: pkt/s {o['pps'] / g['pps']:.2f}, "
              f"pkt per relay CPU-s {per_cpu(o) / per_cpu(g):.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2, help="load generator worker processes")
    ap.add_argument("--relays", default="ours,go", help="comma-separated: ours, ours-asyncio, go, baseline")
    ap.add_argument("--baseline", help="a checkout of derpnet whose relay is measured as 'baseline'")
    ap.add_argument("--scenarios", default="many,flow",
                    help="comma-separated: many (pairs), flow (single flow), mesh (forwarding across a mesh of "
                         "two members, derper's and ours, as bench/mesh.py)")
    ap.add_argument("--flow-seconds", type=float, default=5.0)
    ap.add_argument("--flow-size", type=int, default=64 << 10, help="single flow: packet size")
    ap.add_argument("--flow-window", type=int, default=32, help="single flow: packets in flight")
    ap.add_argument("--tls", action="store_true", help="serve and connect over TLS (test CA)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all relays (interleaved); medians reported")
    ap.add_argument("--policies", action="store_true",
                    help="also run each relay with access control and rate limiting on (bench/relay_policy.py)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin the relay to CPU 0 and the load generator to the other CPUs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pin-cpus", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ca-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size < _STAMP.size:
        ap.error(f"--size must be at least {_STAMP.size}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.clients + 256)), hard))
    if args.worker:
        return worker_main(args)
    args.scenarios = {s.strip() for s in args.scenarios.split(",")}
    wanted = [r.strip() for r in args.relays.split(",") if r.strip()]
    if "baseline" in wanted and not args.baseline:
        ap.error("--relays baseline needs --baseline PATH")

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, admission_controller() as (admit_url, answered):
        relays = make_relays(wanted, args, Path(tmp), admit_url)
        print(f"{'TLS' if args.tls else 'plain TCP'}; many flows: {args.clients} clients, {args.pairs} pairs, window "
              f"{args.window}, {args.size} B, {args.seconds:g} s measured, load generator in {args.procs} process(es); "
              f"single flow: {args.flow_size} B packets, {args.flow_window} in flight, {args.flow_seconds:g} s; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
              + (", relay pinned to CPU 0, generator to the others" if args.pin and (os.cpu_count() or 1) >= 2 else ""))
        for rnd in range(args.repeat):
            for name, make in relays:
                with make() as relay:
                    r = measure(relay, args)
                results.setdefault(name, []).append(r)
                print_run(name, r)
            print(f"-- round {rnd + 1} done, load average {os.getloadavg()[0]:.2f}", flush=True)
        if args.policies:
            print(f"admission controller: {answered[0]} requests answered (one per client connection)")
    if results:
        print_summary(results)
        if "many" in args.scenarios:
            policy_ratios({name: medians(rs) for name, rs in results.items()})
    if "mesh" in args.scenarios:
        mesh_rows(args)
    return 0


def mesh_rows(args: argparse.Namespace) -> None:
    """Forwarding across a mesh (bench/mesh.py): two derpers, two of ours, side by side."""
    from bench import mesh
    from tests.interop_peers import derper_path

    margs = argparse.Namespace(pairs=min(args.pairs, 50), seconds=args.seconds, warmup=args.warmup,
                               size=args.size, window=8)
    print(f"mesh: {margs.pairs} pairs, window {margs.window}, {margs.size} B, senders on one member, "
          "echoers on the other (every packet crosses the mesh twice)")
    rows = {}
    for name, kinds in (("go", ["derper", "derper"]), ("ours", ["ours", "ours"])):
        if "derper" in kinds and derper_path() is None:
            print(f"  {name}: skipped (Go derper not built: interop/build.sh)")
            continue
        rows[name] = mesh.run(kinds, margs)["mesh"]
        r = rows[name]
        print(f"  {name:5} relayed {r['relayed_pps']:8.0f} pkt/s, members' CPU {r['cpu']:.2f}, "
              f"{r['us_per_pkt']:.1f} us CPU per relayed packet", flush=True)
    if len(rows) == 2:
        print(f"  ours/go across the mesh: {rows['ours']['relayed_pps'] / rows['go']['relayed_pps']:.2f}x packets/s, "
              f"{rows['go']['us_per_pkt'] / rows['ours']['us_per_pkt']:.2f}x packets per CPU-second")


if __name__ == "__main__":
    sys.exit(main())
