"""Copying bytes between a TCP socket and a derpquic stream, both ways, with half-close.

One `Tunnel` per forwarded connection, two named threads per tunnel (one per direction);
a `Tunnels` registry bounds how many are open at once and can abort them all on exit.
Both ends only need the socket-like subset `recv`, `sendall`, `shutdown(SHUT_WR)`, `close`,
which `socket.socket` and `derpquic.Stream` share.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Optional

log = logging.getLogger("derpnet.cmd")

BUF_SIZE = 64 * 1024


def abort(obj) -> None:
    """End `obj` abruptly, waking any thread blocked in its recv() (a plain close() does not
    wake a blocked recv on a Linux socket; shutdown(SHUT_RDWR) does). A TCP socket is reset
    (RST), so that its client sees an error rather than a clean end of a truncated
    transfer; a stream is reset where the library can (`abort()`), else shut both ways."""
    if obj is None:
        return
    if isinstance(obj, socket.socket):
        try:
            obj.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    else:
        reset = getattr(obj, "abort", None)
        if callable(reset):
            try:
                reset()
                return
            except Exception:
                pass
    try:
        obj.shutdown(socket.SHUT_RDWR)
    except Exception:  # not connected, already closed, or a stream without SHUT_RDWR
        pass
    try:
        obj.close()
    except Exception:
        pass


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # not reached


class Tunnels:
    """The set of open tunnels: a bound on their number and a way to end them all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._open: dict[int, "Tunnel"] = {}
        self._next_id = 1
        self._closing = False

    def acquire(self, stop: threading.Event, poll: float = 0.2) -> bool:
        """Wait for a free slot; False when `stop` is set first."""
        warned = False
        while not stop.is_set():
            if self._slots.acquire(timeout=poll):
                return True
            if not warned:
                log.warning("%d connections open (the --max-conns limit): waiting for one to end", self.limit)
                warned = True
        return False

    def release_slot(self) -> None:
        self._slots.release()

    def start(self, local, remote, *, peer: str, what: str) -> "Tunnel":
        """Start copying between `local` (TCP) and `remote` (stream). The slot taken by
        `acquire()` is released when the tunnel ends."""
        with self._lock:
            tid = self._next_id
            self._next_id += 1
            t = Tunnel(self, tid, local, remote, peer=peer, what=what)
            self._open[tid] = t
            closing = self._closing
        if closing:
            t.abort()
        t.start()
        return t

    def _done(self, t: "Tunnel") -> None:
        with self._lock:
            self._open.pop(t.id, None)
        self._slots.release()

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def close_all(self, timeout: float = 0.5) -> int:
        """Abort every open tunnel and wait (bounded) for their threads; returns how many
        were still open."""
        with self._lock:
            self._closing = True
            tunnels = list(self._open.values())
        for t in tunnels:
            t.abort()
        deadline = time.monotonic() + timeout
        for t in tunnels:
            t.join(max(0.0, deadline - time.monotonic()))
        return len(tunnels)


class Tunnel:
    """One forwarded connection: `local` <-> `remote`, each direction in its own thread.
    When one side ends its sending (EOF) the other side's sending is shut down (half-close)
    and the other direction goes on; both ends are closed when both directions are done,
    or at once when either side fails."""

    def __init__(self, registry: Tunnels, tid: int, local, remote, *, peer: str, what: str) -> None:
        self.registry = registry
        self.id = tid
        self.local = local
        self.remote = remote
        self.peer = peer
        self.what = what
        self.sent = 0  # local -> remote
        self.received = 0  # remote -> local
        self.started = time.monotonic()
        self.error: Optional[str] = None
        self._lock = threading.Lock()
        self._running = 2
        self._aborted = False
        self._threads = [
            threading.Thread(target=self._copy, args=(local, remote, True),
                             name=f"tunnel-{tid}-to-peer", daemon=True),
            threading.Thread(target=self._copy, args=(remote, local, False),
                             name=f"tunnel-{tid}-from-peer", daemon=True),
        ]

    def start(self) -> None:
        log.info("conn #%d %s %s: open", self.id, self.what, self.peer)
        for th in self._threads:
            th.start()

    def join(self, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for th in self._threads:
            if th is threading.current_thread():
                continue
            th.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
        abort(self.local)
        abort(self.remote)

    def _copy(self, src, dst, outbound: bool) -> None:
        failed = False
        end = src
        try:
            while True:
                end = src
                data = src.recv(BUF_SIZE)
                if not data:
                    break
                end = dst
                dst.sendall(data)
                with self._lock:
                    if outbound:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
            with self._lock:
                aborted = self._aborted
            if aborted:  # woken by abort(), not a real end of data: do not pass on a clean FIN
                raise ConnectionAbortedError("aborted")
            end = dst
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except Exception as e:  # a reset or a closed end: tear the whole tunnel down
            failed = True
            with self._lock:
                if self.error is None and not self._aborted:
                    self.error = f"{'peer' if end is self.remote else 'local'} side: {_err(e)}"
        if failed:
            abort(self.local)
            abort(self.remote)
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        for end in (self.local, self.remote):
            try:
                end.close()
            except Exception:
                pass
        dur = time.monotonic() - self.started
        if self.error is not None:
            how = f"failed ({self.error})"
        elif self._aborted:
            how = "aborted (shutting down)"
        else:
            how = "closed"
        log.info("conn #%d %s %s: %s after %.1f s; sent %s, received %s", self.id, self.what, self.peer,
                 how, dur, fmt_bytes(self.sent), fmt_bytes(self.received))
        self.registry._done(self)


def _err(e: BaseException) -> str:
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, ConnectionAbortedError):
        return "connection aborted"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(e, BrokenPipeError):
        return "broken pipe"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
