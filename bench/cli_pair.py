"""The whole tool, end to end: `serve`/`join` pairs moving TCP bytes through TLS relays on
port 443, the original Go derpconnect and ours in every combination, in one run.

    python bench/cli_pair.py [--mb 64] [--runs 3] [--relays derper,ours] [--pairs gg,pg,gp,pp]

Pairs (serve + join): Go + Go, Python + Go, Go + Python, Python + Python; relays: Tailscale's
`derper` and ours, each on a loopback address of its own, port 443 (the original Go tool
only dials HOST:443, so this needs root). The Python peers run with --no-direct: every
pair goes through the relay.

Per pair and relay: download (the service behind `serve` sends MB to the client behind
`join`), upload (the client sends, the service hashes and answers with the digest), both
SHA-256 checked, payload MB/s from the TCP connect to the last byte; median of --runs,
runs interleaved across pairs so that load changes on a shared machine hit all alike.
First byte: TCP connect to `join` to the first byte of a small reply, median of 7 separate
connections (100 ms apart). Then each mixed pair's ratio to Go + Go through the same relay.

A transfer that makes no progress for --stall seconds is abandoned and counted as
stalled (the original's own race: its DERP reader can block forever when the receive queue
overflows; see interop/README.md); its figure is left out of the median.

Two more sections (ours only, our relay on a free loopback port, no root needed):

- stdio: the ssh ProxyCommand path. The same Python serve, joined once by `join KEY PORT`
  (a TCP client through it) and once by `join KEY -` (a program writing its stdin and
  reading its stdout, as ssh does): download and upload MB/s of each, side by side, and
  stdio's ratio to the TCP join. Relay only (--no-direct), median of --runs.
- udp: `serve --udp` in front of a UDP echo service, `join --udp`; a client offers
  --udp-size-byte datagrams at each fixed rate of --udp-rates for --udp-seconds and counts
  the echoes (each checked by its SHA-256): offered and echoed datagrams/s and the loss,
  through the relay (--no-direct) and over the direct UDP path, side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 1 << 20
PAIRS = {"gg": ("Go", "Go"), "pg": ("Python", "Go"), "gp": ("Go", "Python"), "pp": ("Python", "Python")}


class Pair:
    """serve + join of one kind through one relay; restartable after the original's stall."""

    def __init__(self, relay, kind: str, service_port: int, workdir: Path) -> None:
        self.relay, self.kind, self.service_port, self.workdir = relay, kind, service_port, workdir
        self.stack = ExitStack()
        self.procs: list = []
        self.port = 0
        self.starts = 0

    def start(self) -> Pair:
        from tests.cmd.procs import CliProcess, cli_env
        from tests.interop_peers import GoDerpconnect, original_derpconnect_path
        go = original_derpconnect_path()
        relay, st = self.relay, self.stack
        serve_lang, join_lang = PAIRS[self.kind]
        self.starts += 1
        d = self.workdir / f"{relay.kind}-{self.kind}-{self.starts}"
        py_extra = ["--derp-ca", relay.ca_file, "--no-direct"]
        if serve_lang == "Go":
            serve = st.enter_context(GoDerpconnect.serve(relay, self.service_port, d / "serve", binary=go))
        else:
            serve = st.enter_context(CliProcess.serve(relay.derp_arg, self.service_port, cli_env(d / "serve"),
                                                      extra=py_extra, log_path=d / "serve.log"))
        if join_lang == "Go":
            join = st.enter_context(GoDerpconnect.join(relay, serve.pubkey, 0, d / "join", binary=go))
        else:
            extra = py_extra + (["--insecure-allow-unauthenticated"] if serve_lang == "Go" else [])
            join = st.enter_context(CliProcess.join(relay.derp_arg, serve.pubkey, cli_env(d / "join"),
                                                    extra=extra, log_path=d / "join.log"))
        self.procs, self.port = [serve, join], join.listen_port
        return self

    def why_failed(self) -> str:
        """After a failed transfer: the original's own stall (then restart), or unknown."""
        from tests.interop_peers import original_stall
        why = original_stall(self.procs)
        if why is None:
            return "not the original's race"
        self.stack.close()
        self.stack = ExitStack()
        self.start()
        return "the original's reader deadlock (restarted the pair)"

    def close(self) -> None:
        self.stack.close()


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt(v: float | None, width: int = 6) -> str:
    return f"{v:{width}.1f}" if v is not None else " " * (width - 1) + "-"


def run(mb: int = 64, runs: int = 3, relays=("derper", "ours"), pairs=("gg", "pg", "gp", "pp"),
        stall: float = 15.0, first_bytes: int = 7, keep: str | None = None) -> dict:
    from tests.cmd.procs import TransferService as T
    from tests.interop_peers import Relay443, derper_path, loopback_443, original_derpconnect_path
    if not (derper_path() and original_derpconnect_path()):
        print("(Go derper / the original derpconnect not built: run interop/build.sh)")
        return {}
    if loopback_443() is None:
        print("(cannot bind port 443 on loopback, which the original Go derpconnect needs: run as root)")
        return {}
    total = mb * MiB
    results: dict = {}
    with ExitStack() as stack:
        tmp = Path(keep) if keep else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cli-")))
        service = stack.enter_context(T())
        pairs_up: dict[tuple[str, str], Pair] = {}
        for rk in relays:
            relay = stack.enter_context(Relay443(rk, tmp / rk))
            for pk in pairs:
                pair = pairs_up[(rk, pk)] = Pair(relay, pk, service.port, tmp).start()
                stack.callback(pair.close)
                results[(rk, pk)] = {"down": [], "up": [], "stalls": 0, "fb": []}
        print(f"relays on 443: {', '.join(relays)}; {mb} MiB per transfer, {runs} runs, "
              f"load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs", flush=True)
        for key, pair in pairs_up.items():  # warm-up, and the first-byte latency
            for _ in range(first_bytes):
                time.sleep(0.1)  # separate connections, not a burst
                try:
                    results[key]["fb"].append(T.first_byte(pair.port, inactivity=stall))
                except (OSError, AssertionError) as e:
                    print(f"  {key}: first byte failed: {e}", flush=True)
        for r in range(runs):
            for key, pair in pairs_up.items():
                for direction, fn in (("down", T.download), ("up", T.upload)):
                    label = f"  run {r + 1} {key[0]:6s} {' + '.join(PAIRS[key[1]]):15s} {direction:4s}"
                    try:
                        v = fn(pair.port, total, inactivity=stall)
                        results[key][direction].append(v)
                        print(f"{label} {v:6.1f} MB/s", flush=True)
                    except (OSError, AssertionError) as e:  # TimeoutError: no progress for --stall s
                        results[key]["stalls"] += 1
                        print(f"{label} FAILED: {type(e).__name__}: {e}: {pair.why_failed()}", flush=True)
    print_table(results, relays, pairs, mb, runs)
    return results


def print_table(results: dict, relays, pairs, mb: int, runs: int) -> None:
    print(f"\nserve + join, {mb} MiB, median of {runs} (MB/s down / up; first byte ms; ratio to Go + Go):")
    print(f"{'relay':8s} {'serve + join':17s} {'down':>6s} {'up':>6s} {'1st B':>6s} "
          f"{'down/GG':>7s} {'up/GG':>6s} {'failed':>6s}")
    for rk in relays:
        gg = results.get((rk, "gg"))
        base_d = _median(gg["down"]) if gg else None
        base_u = _median(gg["up"]) if gg else None
        for pk in pairs:
            res = results[(rk, pk)]
            d, u, fb = _median(res["down"]), _median(res["up"]), _median(res["fb"])
            rd = f"{d / base_d:7.2f}" if d and base_d else "      -"
            ru = f"{u / base_u:6.2f}" if u and base_u else "     -"
            print(f"{rk:8s} {' + '.join(PAIRS[pk]):17s} {_fmt(d)} {_fmt(u)} {_fmt(fb)} {rd} {ru} "
                  f"{res['stalls']:6d}", flush=True)


class OurPair:
    """Our serve and join through our relay on a free loopback port (no Go, no root)."""

    def __init__(self, stack: ExitStack, tmp: Path, target: int, *, udp: bool = False, direct: bool = False) -> None:
        from tests.cmd.procs import CliProcess, cli_env
        from tests.relays import OurRelay
        self.relay = stack.enter_context(OurRelay(workdir=str(tmp / "relay")))
        self.env = cli_env(tmp / "join")
        self.extra = [] if direct else ["--no-direct"]
        mode = ["--udp"] if udp else []
        name = "udp" if udp else "tcp"
        srv = stack.enter_context(CliProcess([f"--derp={self.relay.url}", "serve", *mode, target, *self.extra],
                                             cli_env(tmp / f"serve-{name}"), tmp / f"serve-{name}.log"))
        self.key = srv.wait_for_line(r"join (?:--udp )?([A-Za-z0-9_-]{43})", timeout=30).group(1)
        join = stack.enter_context(CliProcess([f"--derp={self.relay.url}", "join", *mode, self.key, "0", *self.extra],
                                              self.env, tmp / f"join-{name}.log"))
        self.port = int(join.wait_for_line(r"Listening on (?:udp )?\S+:(\d+)", timeout=30).group(1))

    def stdio_argv(self) -> list[str]:
        from tests.cmd.procs import cli_argv
        return cli_argv(f"--derp={self.relay.url}", "join", self.key, "-", *self.extra)


def _stdio_transfer(pair: OurPair, direction: str, n: int) -> float:
    """One transfer through `join KEY -` (a new process, as each ssh runs its own); MB/s from
    its start to the last byte, SHA-256 checked."""
    import hashlib
    import subprocess
    import threading

    from tests.cmd.procs import REPO_ROOT, TransferService
    t0 = time.perf_counter()
    p = subprocess.Popen(pair.stdio_argv(), env=pair.env, cwd=str(REPO_ROOT), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdin is not None and p.stdout is not None
    h = hashlib.sha256()
    if direction == "down":
        p.stdin.write(b"D %d\n" % n)
        p.stdin.flush()
        got = 0
        while chunk := p.stdout.read1(1 << 16):
            h.update(chunk)
            got += len(chunk)
        p.stdin.close()
        ok = got == n and h.hexdigest() == TransferService.expected(n)
    else:
        blob = os.urandom(1 << 20)

        def write() -> None:
            assert p.stdin is not None
            p.stdin.write(b"U\n")
            for _ in range(n >> 20):
                p.stdin.write(blob)
                h.update(blob)
            p.stdin.close()

        writer = threading.Thread(target=write, name="bench-stdio-writer")
        writer.start()
        answer = p.stdout.read()
        writer.join()
        ok = answer == h.hexdigest().encode()
    dt = time.perf_counter() - t0
    p.wait(30)
    if not ok or p.returncode != 0:
        raise AssertionError(f"stdio {direction}: bad transfer (rc {p.returncode})")
    return n / dt / 1e6


def run_stdio(mb: int = 64, runs: int = 3) -> dict:
    """The ProxyCommand path (join KEY -) next to the TCP join, same serve, same relay."""
    from tests.cmd.procs import TransferService as T
    n = mb * MiB
    res: dict[str, list[float]] = {k: [] for k in ("tcp down", "tcp up", "stdio down", "stdio up", "start")}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-stdio-")))
        service = stack.enter_context(T())
        pair = OurPair(stack, tmp, service.port)
        _stdio_transfer(pair, "down", MiB)  # warm-up
        for _ in range(max(3, runs)):  # a process's start to the first byte of a 100-byte reply
            t0 = time.perf_counter()
            _stdio_transfer(pair, "down", 100)
            res["start"].append(time.perf_counter() - t0)
        for _ in range(runs):
            res["tcp down"].append(T.download(pair.port, n))
            res["stdio down"].append(_stdio_transfer(pair, "down", n))
            res["tcp up"].append(T.upload(pair.port, n))
            res["stdio up"].append(_stdio_transfer(pair, "up", n))
    med = {k: statistics.median(v) for k, v in res.items()}
    start = med["start"]
    print(f"\nstdio join (ssh ProxyCommand path) vs TCP join, our relay, --no-direct, {mb} MiB, median of {runs} "
          f"(MB/s; a stdio join is a new process per transfer: it starts, connects to the relay and dials in "
          f"{start:.2f} s, median; 'after start' leaves that out):")
    for d in ("down", "up"):
        after = n / 1e6 / max(1e-3, n / 1e6 / med["stdio " + d] - start)
        print(f"  {d:4s}  tcp {med['tcp ' + d]:6.1f}  stdio {med['stdio ' + d]:6.1f} (after start {after:6.1f})  "
              f"stdio/tcp {med['stdio ' + d] / med['tcp ' + d]:5.2f} (after start {after / med['tcp ' + d]:5.2f})",
              flush=True)
    return med


class _UdpEcho:
    def __init__(self) -> None:
        import socket
        import threading
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._loop, name="bench-udp-echo", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
                self.sock.sendto(data, addr)
            except OSError:
                return


def _udp_offer(port: int, rate: int, seconds: float, size: int) -> tuple[float, float, float]:
    """Offer `rate` datagrams/s for `seconds`; (offered/s, echoed/s, loss fraction). Every
    echo is checked: its SHA-256 and that it was sent (a bad one raises)."""
    import hashlib
    import socket
    import struct
    import threading

    sent: set[int] = set()
    echoed: set[int] = set()
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    c.settimeout(1.0)
    body = os.urandom(size - 36)
    done = threading.Event()

    def receive() -> None:
        while True:
            try:
                data = c.recv(65535)
            except TimeoutError:
                if done.is_set():
                    return
                continue
            seq = struct.unpack("!I", data[:4])[0]
            if hashlib.sha256(data[:4] + data[36:]).digest() != data[4:36] or seq not in sent:
                raise AssertionError("a corrupted or unknown datagram came back")
            echoed.add(seq)

    rx = threading.Thread(target=receive, name="bench-udp-rx")
    rx.start()
    total = int(rate * seconds)
    t0 = time.perf_counter()
    for seq in range(total):
        due = t0 + seq / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        head = struct.pack("!I", seq)
        sent.add(seq)
        c.sendto(head + hashlib.sha256(head + body).digest() + body, ("127.0.0.1", port))
    elapsed = time.perf_counter() - t0
    done.set()
    rx.join()
    c.close()
    return total / elapsed, len(echoed) / elapsed, 1 - len(echoed) / total


def run_udp(rates=(500, 2000, 5000), seconds: float = 5.0, size: int = 1200) -> dict:
    """UDP forwarding at fixed offered rates, through the relay and over the direct path."""
    echo = _UdpEcho()
    results: dict = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-udp-")))
        pairs = {"relay": OurPair(stack, tmp / "relay", echo.port, udp=True),
                 "direct": OurPair(stack, tmp / "direct", echo.port, udp=True, direct=True)}
        for pair in pairs.values():
            _udp_offer(pair.port, 200, 1.0, size)  # warm-up (and, direct: the path found)
        print(f"\nUDP forwarding (serve --udp / join --udp), {size}-byte datagrams, {seconds:g} s per rate, "
              f"echoed by a UDP service behind serve:")
        print(f"  {'path':7s} {'offered/s':>9s} {'echoed/s':>9s} {'loss':>7s}")
        for rate in rates:
            for name, pair in pairs.items():
                offered, echoed, loss = _udp_offer(pair.port, rate, seconds, size)
                results[(name, rate)] = (offered, echoed, loss)
                print(f"  {name:7s} {offered:9.0f} {echoed:9.0f} {loss * 100:6.2f}%", flush=True)
    echo.sock.close()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=64, help="MiB per transfer (default 64)")
    p.add_argument("--runs", type=int, default=3, help="runs per pair and direction (default 3)")
    p.add_argument("--relays", default="derper,ours", help="comma-separated: derper, ours")
    p.add_argument("--pairs", default="gg,pg,gp,pp",
                   help="comma-separated serve+join pairs: gg, pg (Python serve, Go join), gp, pp")
    p.add_argument("--stall", type=float, default=15.0, help="seconds without progress = stalled")
    p.add_argument("--first-bytes", type=int, default=7, help="first-byte samples per pair")
    p.add_argument("--keep", metavar="DIR", help="keep the logs in DIR")
    p.add_argument("--sections", default="pairs,stdio,udp", help="comma-separated: pairs, stdio, udp")
    p.add_argument("--udp-rates", default="500,2000,5000", help="offered datagrams/s (comma-separated)")
    p.add_argument("--udp-seconds", type=float, default=5.0, help="seconds per offered rate")
    p.add_argument("--udp-size", type=int, default=1200, help="bytes per datagram (at least 64)")
    a = p.parse_args(argv)
    sections = a.sections.split(",")
    if "pairs" in sections:
        run(a.mb, a.runs, tuple(a.relays.split(",")), tuple(a.pairs.split(",")), a.stall, a.first_bytes, a.keep)
    if "stdio" in sections:
        run_stdio(a.mb, a.runs)
    if "udp" in sections:
        run_udp(tuple(int(r) for r in a.udp_rates.split(",")), a.udp_seconds, max(64, a.udp_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
