"""A `derpconnect serve`/`join` pair across a Lab, with a byte source behind `serve`.

    with Tunnel(lab, relay_url, tmp_path) as t:          # serve in peer A, join in peer B
        t.wait_direct()                                   # both logged "direct path to ..."
        got = t.download(100 << 20)                       # (bytes, sha256 ok) through the tunnel

The source runs in this process on a socket that lives in peer A's namespace: every
connection first reads an 8-byte big-endian length and an 8-byte rate (bytes/s, 0 = as
fast as possible), then sends that many pseudo-random bytes and closes. The client
checks the SHA-256 of what arrives against what was sent. Used by tests/lab/test_direct.py
and bench/direct.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.cmd.procs import JOIN_LINE_RX, LISTEN_LINE_RX, cli_argv, cli_env
from tests.lab.netns import Lab

DIRECT_RX = r"direct path to (\S+) via (\S+):(\d+), rtt ([0-9.]+) ms"
FALLBACK_RX = r"direct path to (\S+) lost \((\w+)\); falling back to the relay"
_CHUNK = 1 << 16
_BLOCK = os.urandom(1 << 20)  # the source repeats this block, shifted per chunk


def _chunk(i: int) -> bytes:
    off = (i * 7919) % (len(_BLOCK) - _CHUNK)
    return _BLOCK[off:off + _CHUNK]


class Source:
    """TCP byte source (and 1-byte echo when asked for 0 bytes) inside namespace `ns`."""

    def __init__(self, lab: Lab, ns: str) -> None:
        self.sock = lab.socket(ns, socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sent_digests: list[str] = []
        self._closed = False
        threading.Thread(target=self._accept, name="lab-source", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="lab-source-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                head = _recv_exact(conn, 16)
                total, rate = struct.unpack(">QQ", head)
                if total == 0:  # echo mode: ping-pong single bytes until EOF
                    while True:
                        b = conn.recv(1)
                        if not b:
                            return
                        conn.sendall(b)
                h = hashlib.sha256()
                start = time.monotonic()
                sent = i = 0
                while sent < total:
                    chunk = _chunk(i)[:total - sent]
                    conn.sendall(chunk)
                    h.update(chunk)
                    sent += len(chunk)
                    i += 1
                    if rate:
                        ahead = sent / rate - (time.monotonic() - start)
                        if ahead > 0:
                            time.sleep(ahead)  # pacing the workload, not synchronisation
                self.sent_digests.append(h.hexdigest())
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(_CHUNK):
                    pass
            except OSError:
                return

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = sock.recv(n - len(buf))
        if not b:
            raise ConnectionError("closed early")
        buf += b
    return bytes(buf)


class Tunnel:
    """`serve` in peer A (forwarding to a Source), `join` in peer B, through `relay_url`."""

    def __init__(self, lab: Lab, relay_url: str, workdir: Path, *, serve_args: Sequence[str] = (),
                 join_args: Sequence[str] = (), common: Sequence[str] = ()) -> None:
        self.lab = lab
        workdir = Path(workdir)
        self.source = Source(lab, lab.peer_a_ns)
        self.serve = lab.run_logged(lab.peer_a_ns, cli_argv(f"--derp={relay_url}", *common, "-v", "serve",
                                                            self.source.port, *serve_args),
                                    env=cli_env(workdir / "serve"), log_path=workdir / "serve.log")
        m = self.serve.wait_for_line(JOIN_LINE_RX, timeout=30)
        self.pubkey = m.group(2)
        self.join = lab.run_logged(lab.peer_b_ns, cli_argv(f"--derp={relay_url}", *common, "-v", "join", self.pubkey,
                                                           "0", *join_args),
                                   env=cli_env(workdir / "join"), log_path=workdir / "join.log")
        addr = self.join.wait_for_line(LISTEN_LINE_RX, timeout=30).group(1)
        self.port = int(addr.rsplit(":", 1)[1])

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in (self.join, self.serve):
            p.stop()
        self.source.close()

    def connect(self, timeout: float = 30.0) -> socket.socket:
        return self.lab.connect(self.lab.peer_b_ns, ("127.0.0.1", self.port), timeout=timeout)

    def wait_direct(self, timeout: float = 30.0, start: tuple[int, int] = (0, 0)) -> tuple[str, str]:
        """Wait until both sides logged a direct path; their (ip:port) for the other side."""
        a = self.serve.wait_for_line(DIRECT_RX, timeout=timeout, start=start[0])
        b = self.join.wait_for_line(DIRECT_RX, timeout=timeout, start=start[1])
        return f"{a.group(2)}:{a.group(3)}", f"{b.group(2)}:{b.group(3)}"

    def lines(self) -> tuple[int, int]:
        """How many log lines each side has printed (a `start` for later waits)."""
        return len(self.serve.lines()), len(self.join.lines())

    def log_text(self) -> str:
        return "\n".join(self.serve.lines() + self.join.lines())

    def open_download(self, total: int, rate: int = 0) -> Download:
        return Download(self, total, rate)

    def download(self, total: int, rate: int = 0, timeout: float = 120.0) -> Download:
        d = Download(self, total, rate, timeout=timeout)
        d.finish()
        return d


class Download:
    """One connection through the tunnel reading `total` bytes; progress is observable."""

    def __init__(self, tunnel: Tunnel, total: int, rate: int = 0, timeout: float = 120.0) -> None:
        self.tunnel = tunnel
        self.total = total
        self.received = 0
        self.started = time.monotonic()
        self.finished: float | None = None
        self.error: BaseException | None = None
        self._h = hashlib.sha256()
        self._progress = threading.Condition()
        self.sock = tunnel.connect(timeout=timeout)
        self.sock.sendall(struct.pack(">QQ", total, rate))
        self._thread = threading.Thread(target=self._read, name="lab-download", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                b = self.sock.recv(1 << 18)
                if not b:
                    break
                self._h.update(b)
                with self._progress:
                    self.received += len(b)
                    self._progress.notify_all()
        except BaseException as e:
            self.error = e
        finally:
            self.finished = time.monotonic()
            with self._progress:
                self._progress.notify_all()
            self.sock.close()

    def wait_for(self, nbytes: int, timeout: float) -> bool:
        """Wait until at least `nbytes` arrived (False on timeout or end)."""
        end = time.monotonic() + timeout
        with self._progress:
            while self.received < nbytes:
                left = end - time.monotonic()
                if left <= 0 or self.finished is not None:
                    return self.received >= nbytes
                self._progress.wait(left)
            return True

    def finish(self, timeout: float = 120.0) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"download stalled at {self.received} of {self.total} bytes")

    @property
    def digest(self) -> str:
        return self._h.hexdigest()

    @property
    def ok(self) -> bool:
        return self.received == self.total and self.digest in self.tunnel.source.sent_digests

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started
