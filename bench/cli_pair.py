"""The whole tool, end to end: a `serve`/`join` pair moving TCP bytes through a TLS Go derper,
our CLI next to the Go derpconnect (the stand-in goderpconnect when the real one is not
installable), in one run, with the ratio.

    python bench/cli_pair.py [--mb 32]

Both pairs forward to the same local TCP sink (it hashes what it receives and answers
with the SHA-256), through the same derper process; the figure is payload MB/s from the
first byte written to the join port until the sink's digest is back.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class HashSink:
    """A TCP server: reads each connection to EOF, answers with the SHA-256 hex digest."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._loop, name="bench-hash-sink", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), name="bench-hash-conn", daemon=True).start()

    @staticmethod
    def _one(c: socket.socket) -> None:
        h = hashlib.sha256()
        with c:
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                h.update(b)
            c.sendall(h.hexdigest().encode())

    def close(self) -> None:
        self.sock.close()


def push(port: int, total: int) -> float:
    """Send `total` random bytes through the join port; MB/s once the right digest is back."""
    blob = os.urandom(1 << 20)
    want = hashlib.sha256()
    for _ in range(total >> 20):
        want.update(blob)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        for _ in range(total >> 20):
            s.sendall(blob)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            b = s.recv(128)
            if not b:
                break
            got += b
    dt = time.perf_counter() - t0
    if got.decode() != want.hexdigest():
        raise RuntimeError(f"digest mismatch through the tunnel: {got[:64]!r}")
    return total / dt / 1e6


def run(mb: int) -> dict:
    from tests.cmd.procs import CliProcess, cli_env
    from tests.interop_peers import GoDerpconnect, GoDerper, derpconnect_path, derper_path, free_port, make_test_ca
    go = derpconnect_path()
    if not (derper_path() and go):
        print("(Go derper / derpconnect not built: run interop/build.sh)")
        return {}
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        tmp = Path(tmp)
        ca, make_leaf = make_test_ca(tmp / "pki")
        sink = HashSink()
        with GoDerper(tmp / "derper", tls=True, port=free_port(), make_leaf=make_leaf, ca_file=ca) as d:
            with GoDerpconnect.serve(d, sink.port, tmp / "go-s", binary=go) as s, \
                    GoDerpconnect.join(d, s.pubkey, 0, tmp / "go-j", binary=go) as j:
                out["Go derpconnect"] = push(j.listen_port, mb << 20)
            url = f"https://localhost:{d.port}"
            extra = ["--derp-ca", str(ca), "--no-direct"]  # through the relay, like the Go pair
            with CliProcess.serve(url, sink.port, cli_env(tmp / "py-s"), extra=extra) as s, \
                    CliProcess.join(url, s.pubkey, cli_env(tmp / "py-j"), extra=extra) as j:
                out["derpnet CLI"] = push(j.listen_port, mb << 20)
        sink.close()
    for name, v in out.items():
        print(f"{name:15s} serve/join pair through the Go derper (TLS): {v:6.1f} MB/s ({mb} MiB)", flush=True)
    if len(out) == 2:
        print(f"ratio derpnet/Go: {out['derpnet CLI'] / out['Go derpconnect']:.1f}x", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=32, help="MiB pushed through each pair (default 32)")
    run(p.parse_args(argv).mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
