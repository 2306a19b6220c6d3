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
    a = p.parse_args(argv)
    run(a.mb, a.runs, tuple(a.relays.split(",")), tuple(a.pairs.split(",")), a.stall, a.first_bytes, a.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
