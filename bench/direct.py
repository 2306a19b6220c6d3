"""Relay path vs direct path between the same two peers, in the network lab (needs root).

    sudo python bench/direct.py [--mb 64] [--pings 500]

Two network namespaces behind endpoint-independent NATs, our relay (with STUN) in a third
("internet") namespace; a `derpconnect serve`/`join` pair with the same keys runs twice:
once with --no-direct (every packet through the relay), once with direct paths on (it
waits for both sides to log the direct path first). Prints, for each: download MB/s
(SHA-256 checked) and 1-byte ping-pong round trips through the tunnel, then the ratios.
All traffic stays inside the namespaces the bench creates; they are removed at exit.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.lab.netns import Lab, lab_unavailable_reason  # noqa: E402
from tests.lab.relays import start_our_relay  # noqa: E402
from tests.lab.tunnel import Tunnel  # noqa: E402

MiB = 1 << 20


def ping_pong(t: Tunnel, count: int) -> list[float]:
    """Round-trip times (s) of `count` 1-byte exchanges through the tunnel."""
    s = t.connect()
    try:
        s.sendall(struct.pack(">QQ", 0, 0))  # echo mode
        rtts = []
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("echo broke")
            rtts.append(time.perf_counter() - t0)
        return rtts
    finally:
        s.close()


def measure(lab: Lab, relay_url: str, home: Path, direct: bool, mb: int, pings: int) -> dict:
    common = () if direct else ("--no-direct",)
    with Tunnel(lab, relay_url, home, common=common) as t:
        assert t.download(1 * MiB).ok  # warm up: connection, key proofs, discovery
        if direct:
            t.wait_direct(timeout=20)
        d = t.download(mb * MiB)
        if not d.ok:
            raise RuntimeError(f"download corrupt or short: {d.received} of {d.total} bytes")
        rtts = ping_pong(t, pings)
        if direct and "falling back" in t.log_text():
            raise RuntimeError("the direct path fell back during the measurement")
    return {"mbps": d.total / d.seconds / 1e6, "rtt_p50": statistics.median(rtts) * 1e3,
            "rtt_p99": sorted(rtts)[int(0.99 * (len(rtts) - 1))] * 1e3, "rt_s": len(rtts) / sum(rtts)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=64, help="download size in MiB (default 64)")
    p.add_argument("--pings", type=int, default=2000, help="1-byte round trips (default 2000)")
    args = p.parse_args(argv)
    reason = lab_unavailable_reason()
    if reason:
        print(f"bench/direct.py: the network lab is unavailable: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="derpnet-bench-direct-") as tmp, Lab.two_nats("eim", "eim") as lab:
        # 20 ms on what the relay sends (its bridge in the "internet"): the relay path pays it
        # in both directions, the direct path (NAT to NAT across the bridge ports) does not.
        delayed = lab.try_delay(lab.inet_ns, "br0", 20)
        print("relay delay: 20 ms on every packet the relay sends (tc netem)" if delayed else
              "relay delay: none (this kernel has no tc netem): both paths are local, Python costs dominate")
        relay = start_our_relay(lab, stun_port=3478, workdir=Path(tmp) / "relay")
        home = Path(tmp) / "peers"  # the same keys for both runs: the same two peers
        res = {}
        for name, direct in (("relay path", False), ("direct path", True)):
            res[name] = r = measure(lab, relay.url, home, direct, args.mb, args.pings)
            print(f"{name:12s} {r['mbps']:7.1f} MB/s ({args.mb} MiB, SHA-256 ok) | ping-pong "
                  f"{r['rt_s']:7.0f} rt/s, rtt p50 {r['rtt_p50']:6.2f} ms, p99 {r['rtt_p99']:6.2f} ms", flush=True)
        rel, dire = res["relay path"], res["direct path"]
        print(f"direct/relay: throughput {dire['mbps'] / rel['mbps']:.2f}x, "
              f"rtt p50 {dire['rtt_p50'] / rel['rtt_p50']:.2f}x (lower is better)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
