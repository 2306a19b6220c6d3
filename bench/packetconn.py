"""Bench: PacketConn → relay → PacketConn throughput, 1200-byte and 60 KiB datagrams.

    python bench/packetconn.py [--seconds 3] [--window 24] [--batch] [--tls] [--relay NAME=URL ...]

Runs the same measurement through our relay (tests.relays.OurRelay) and through
Tailscale's Go derper (tests.interop_peers.GoDerper), both on loopback (plain HTTP, or
TLS with a test CA with --tls), and prints packets/s, MB/s and the ratio ours/Go.
A script printing figures, not a test.

Method: the receiver runs in a separate process (its own GIL, like a real peer). The
sender keeps at most `window` datagrams unacknowledged: the receiver acknowledges the
highest sequence number seen every `ack_every` datagrams. The relays drop instead of
pushing back (derper: 32-packet queue per client, drop-oldest), so an unpaced blast
only measures drops; the window keeps the pipe full without overflowing it. Figures
are delivered datagrams (goodput) over the measured interval. With --batch the sender
refills the window with one PacketConn.write_batch() call (one syscall) instead of one
write_to() per datagram, as a QUIC driver flushing several packets would.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import ssl
import struct
import sys
import tempfile
import time
from contextlib import ExitStack

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from derpnet import listen_packet  # noqa: E402
from derpnet.keys import PrivateKey  # noqa: E402

_SEQ = struct.Struct(">q")
_DONE = -1
SIZES = (1200, 60 * 1024)


def _context(ca_file: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=ca_file) if ca_file else None


def _receiver(url: str, ca_file: str | None, key_text: str, ack_every: int, conn) -> None:
    pc = listen_packet(url, PrivateKey.parse(key_text), ssl_context=_context(ca_file), direct=False)
    conn.send("ready")
    got = 0
    nbytes = 0
    last_ack = 0
    cpu0 = None
    with pc:
        pc.settimeout(30)
        while True:
            data, src = pc.read_from()
            if cpu0 is None:
                cpu0, t0 = time.process_time(), time.perf_counter()
            seq = _SEQ.unpack_from(data)[0]
            if seq == _DONE:
                break
            got += 1
            nbytes += len(data)
            if seq >= last_ack + ack_every:
                last_ack = seq
                pc.write_to(_SEQ.pack(seq), src)
        cpu = (time.process_time() - cpu0) / (time.perf_counter() - t0)
        conn.send((got, nbytes, pc.stats(), cpu))


def measure(url: str, ca_file: str | None, size: int, seconds: float, window: int, ack_every: int,
            batch: bool = False) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    rkey = PrivateKey.generate()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(url, ca_file, rkey.to_text(), ack_every, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(30):
            raise RuntimeError("receiver did not start")
        assert parent.recv() == "ready"
        dst = rkey.public_key
        payload = bytearray(os.urandom(size))
        with listen_packet(url, ssl_context=_context(ca_file), direct=False) as pc:
            pc.settimeout(0.2)
            seq = 0
            acked = 0
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            end = t0 + seconds
            stalls = 0
            while True:
                now = time.perf_counter()
                if now >= end:
                    break
                if batch:
                    items = []
                    while seq - acked < window:
                        seq += 1
                        _SEQ.pack_into(payload, 0, seq)
                        items.append((bytes(payload), dst))
                    pc.write_batch(items)
                while seq - acked < window:
                    seq += 1
                    _SEQ.pack_into(payload, 0, seq)
                    pc.write_to(payload, dst)
                try:
                    data, _ = pc.read_from()
                    acked = max(acked, _SEQ.unpack_from(data)[0])
                except TimeoutError:
                    stalls += 1  # lost datagrams or acks: open the window again
                    acked = seq
            elapsed = time.perf_counter() - t0
            send_cpu = (time.process_time() - cpu0) / elapsed
            # tell the receiver to stop (repeat: the relay may drop)
            for _ in range(5):
                pc.write_to(_SEQ.pack(_DONE), dst)
                if parent.poll(0.5):
                    break
            sent_stats = pc.stats()
        if not parent.poll(10):
            raise RuntimeError("receiver did not report")
        got, nbytes, rstats, recv_cpu = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return {
        "sent": seq, "got": got, "pps": got / elapsed, "mbps": nbytes / elapsed / 1e6,
        "loss": 1 - got / seq if seq else 0.0, "stalls": stalls, "send_cpu": send_cpu, "recv_cpu": recv_cpu,
        "rx_queue_drops": rstats["drops"]["queue_full"], "offline_drops": sent_stats["drops"]["offline"],
    }


def _relays(stack: ExitStack, workdir: str, want: list[str], tls: bool) -> list[tuple[str, str, str | None]]:
    """(name, url, ca_file) of the relays to measure."""
    out: list[tuple[str, str, str | None]] = []
    if "ours" in want:
        from tests.relays import OurRelay
        relay = stack.enter_context(OurRelay(tls=tls, workdir=os.path.join(workdir, "ours")))
        out.append(("ours", relay.url, relay.ca_file))
    if "go" in want:
        from tests.interop_peers import GoDerper, free_port
        try:
            d = stack.enter_context(GoDerper(os.path.join(workdir, "derper"), tls=tls,
                                             port=free_port() if tls else None))
            out.append(("go", d.url, d.ca_file))
        except FileNotFoundError as e:
            print(f"# Go derper: {e}; skipped (build it with interop/build.sh)", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per size and relay")
    ap.add_argument("--window", type=int, default=24, help="unacknowledged datagrams in flight")
    ap.add_argument("--ack-every", type=int, default=8)
    ap.add_argument("--batch", action="store_true", help="refill the window with one write_batch() call")
    ap.add_argument("--tls", action="store_true", help="TLS relays (test CA) instead of plain HTTP")
    ap.add_argument("--relay", action="append", default=[], metavar="NAME=URL",
                    help="an extra relay to measure, e.g. mine=http://127.0.0.1:3340")
    ap.add_argument("--only", choices=["ours", "go"], action="append", help="measure only these built-in relays")
    args = ap.parse_args(argv)
    want = args.only or ["ours", "go"]
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-packetconn-") as workdir, ExitStack() as stack:
        relays = _relays(stack, workdir, want, args.tls)
        for spec in args.relay:
            name, _, url = spec.partition("=")
            relays.append((name, url, None))
        if not relays:
            print("no relay to measure", file=sys.stderr)
            return 1
        mode = "write_batch" if args.batch else "write_to"
        print(f"# {'TLS' if args.tls else 'plain HTTP'}, {mode}, window {args.window}, ack every {args.ack_every}, "
              f"{args.seconds:g} s per figure, receiver in its own process")
        print(f"{'relay':<8} {'size':>7} {'packets/s':>11} {'MB/s':>9} {'loss':>7} {'stalls':>7} "
              f"{'send CPU':>9} {'recv CPU':>9}")
        for name, url, ca_file in relays:
            for size in SIZES:
                r = measure(url, ca_file, size, args.seconds, args.window, args.ack_every, args.batch)
                results[(name, size)] = r
                print(f"{name:<8} {size:>7} {r['pps']:>11.0f} {r['mbps']:>9.1f} {r['loss']:>7.2%} {r['stalls']:>7d} "
                      f"{r['send_cpu']:>9.0%} {r['recv_cpu']:>9.0%}", flush=True)
    if any(k[0] == "ours" for k in results) and any(k[0] == "go" for k in results):
        print()
        for size in SIZES:
            ours, go = results[("ours", size)], results[("go", size)]
            print(f"ratio ours/go, {size:>6} bytes: packets/s {ours['pps'] / go['pps']:.2f}, "
                  f"MB/s {ours['mbps'] / go['mbps']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
