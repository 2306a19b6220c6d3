"""Benchmark derpquic under relay faults, through our relay and Tailscale's Go derper side by side.

    python bench/faults.py                      # 32 MiB per run, both relays (Go if built)
    python bench/faults.py --mb 100 --repeat 3  # medians of 3
    python bench/faults.py --relay ours --liveness 1,1

Throughput (MB/s, SHA-256 checked) of one stream with 0 %, 1 % and 5 % random loss of the
SendPacket frames on both peers' relay links, and with a burst of 200 consecutive drops on
the sender's link (which also carries 1 kHz cross traffic, see tests/faults/test_loss.py).
Outage (s, from the fault to data flowing again at the receiver: detection + reconnect +
QUIC's probe back-off) for a cut connection, a black-holed connection (no FIN/RST; found
by the liveness ping: --liveness PING_AFTER,PING_TIMEOUT, default the product's 5,5) and a
relay killed and restarted on the same port. The scenarios are tests/faults/harness.py's,
the same the tests run; the proxy is tests/faults/proxy.py.

Figures measured while writing the fault tests (2 vCPUs shared with other jobs, load 2-5,
so +-30 %; 32 MiB; liveness 1,1 in the tests):

                       ours                     go
  0 % loss             41-48 MB/s               42-51 MB/s
  1 % loss             37-44 MB/s               42-45 MB/s
  5 % loss             16-31 MB/s               19-30 MB/s
  burst 200            29 MB/s (stall 0.3 s)    30-36 MB/s (stall 0.2-0.4 s)
  cut sender/receiver  outage 0.02-0.2 s        0.06-0.2 s
  black-hole (1 s+1 s) outage 2.2-3.5 s         2.5-3.1 s    (detection ~2.05 s)
  black-hole (5 s+5 s) outage 15.5-16.7 s       15.3-18.3 s  (detection ~10.2 s; the rest is
                                                              QUIC's doubled probe timer)
  restart              outage 0.6-1.5 s         0.2 s        (our relay takes ~0.5-0.7 s to start)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import derpnet  # noqa: E402
from tests.faults.harness import (  # noqa: E402
    CrossTraffic,
    MiB,
    Pair,
    blackhole,
    burst,
    cut,
    random_bytes,
    relay_of,
    restart,
    run_transfer,
)
from tests.faults.proxy import FaultProxy  # noqa: E402
from tests.interop_peers import derper_path  # noqa: E402

ROWS = ["0% loss", "1% loss", "5% loss", "burst 200", "cut sender", "cut receiver",
        "black-hole sender", "black-hole receiver", "restart"]


def _scenario(row: str, relay, data: bytes, liveness: dict):
    """Run one scenario; returns (value, unit text)."""
    with contextlib.ExitStack() as st:
        pa = st.enter_context(FaultProxy(relay.port))
        pb = st.enter_context(FaultProxy(relay.port))
        pc_opts = liveness if row.startswith("black-hole") else {}
        pair = st.enter_context(Pair(relay.url, proxy_a=pa, proxy_b=pb, pc_opts=pc_opts))
        fault = None
        if row.endswith("loss"):
            p = float(row.split("%")[0]) / 100
            pa.set_loss(p, seed=1)
            pb.set_loss(p, seed=5)
        elif row == "burst 200":
            bystander = st.enter_context(derpnet.listen_packet(relay.url))
            st.enter_context(CrossTraffic(pair.pc_a, bystander.local_addr()))
            fault = burst(pair, "a", 200)
        elif row.startswith("cut"):
            fault = cut(pair, "a" if row.endswith("sender") else "b")
        elif row.startswith("black-hole"):
            fault = blackhole(pair, "a" if row.endswith("sender") else "b", detect_timeout=60)
        elif row == "restart":
            fault = restart(relay)
        out = run_transfer(pair, data, fault=fault)
        if not out.intact:
            raise RuntimeError(f"{row}: data corrupted or incomplete: {out.line()}")
        if fault is None or row == "burst 200":
            return out.mbps, out
        return out.outage, out


def _fmt(row: str, values: list[float]) -> str:
    v = statistics.median(values)
    if row.endswith("loss") or row == "burst 200":
        return f"{v:6.1f} MB/s"
    return f"{v:6.2f} s outage"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=32, help="MiB per transfer (default 32)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is printed")
    ap.add_argument("--relay", choices=["ours", "go", "both"], default="both")
    ap.add_argument("--liveness", default="5,5", help="PING_AFTER,PING_TIMEOUT for the black-hole rows "
                    "(default: the product's 5,5)")
    ap.add_argument("--only", help="comma-separated row names (e.g. 'restart,5%% loss')")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the reconnect warnings are expected here
    after, timeout = (float(x) for x in args.liveness.split(","))
    liveness = {"ping_after": after, "ping_timeout": timeout}
    kinds = ["ours", "go"] if args.relay == "both" else [args.relay]
    if "go" in kinds and not derper_path():
        print("(Go derper not built: run interop/build.sh; its column is skipped)")
        kinds.remove("go")
    rows = [r.strip() for r in args.only.split(",")] if args.only else ROWS
    data = random_bytes(args.mb * MiB)
    results: dict[str, dict[str, str]] = {r: {} for r in rows}
    print(f"{args.mb} MiB per run, {args.repeat} run(s) per cell, liveness {after:g} s + {timeout:g} s "
          "for the black-hole rows", flush=True)
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix=f"bench-faults-{kind}-") as tmp, relay_of(kind, tmp) as relay:
            for row in rows:
                values = []
                for _ in range(args.repeat):
                    value, out = _scenario(row, relay, data, liveness)
                    values.append(value)
                    print(f"  {kind:4} {row:20} {out.line()}", flush=True)
                results[row][kind] = _fmt(row, values)
    print()
    print(f"{'':22}" + "".join(f"{k:>22}" for k in kinds))
    for row in rows:
        print(f"{row:22}" + "".join(f"{results[row].get(k, 'n/a'):>22}" for k in kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
