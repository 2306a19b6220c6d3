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
from typing import Protocol

log = logging.getLogger("derpnet.cmd")

BUF_SIZE = 64 * 1024


class End(Protocol):
    """One end of a tunnel: the subset of `socket.socket` that `derpquic.Stream` shares."""

    def recv(self, bufsize: int, /) -> bytes: ...
    def sendall(self, data: bytes, /) -> None: ...
    def shutdown(self, how: int, /) -> None: ...
    def close(self) -> None: ...


#: How often a tunnel thread blocked on its TCP socket checks whether the tunnel broke
#: (a thread blocked in send() cannot be woken otherwise without sending a FIN).
WAKE_INTERVAL = 0.25


def _linger0(sock: socket.socket) -> None:
    """Make the coming close() a reset: RST, never a FIN (SO_LINGER on, 0 seconds)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def abort(obj: End | None) -> None:
    """End `obj` abruptly, for its only user (nobody else is blocked in it). A TCP socket is
    reset: SO_LINGER 0, then close, so its client sees a reset (RST) rather than the clean
    end (FIN) of a truncated transfer; no shutdown() first, which would send a FIN ahead of
    the RST. A stream is reset where the library can (`abort()`: RESET_STREAM and
    STOP_SENDING), else shut both ways."""
    if obj is None:
        return
    if isinstance(obj, socket.socket):
        _linger0(obj)
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


def _break(obj: End) -> None:
    """Mark `obj` for a reset and wake the tunnel threads blocked in it, without ending it
    cleanly: a TCP socket gets SO_LINGER 0 (its close, when both threads are done, sends an
    RST) and shutdown(SHUT_RD), which wakes a blocked recv() and sends nothing (SHUT_WR or
    SHUT_RDWR would send a FIN); a thread blocked in send() notices within WAKE_INTERVAL.
    A stream is reset at once (`abort()`), which wakes its blocked callers with errors."""
    if isinstance(obj, socket.socket):
        _linger0(obj)
        try:
            obj.shutdown(socket.SHUT_RD)
        except OSError:
            pass
    else:
        abort(obj)


def fmt_bytes(n: float) -> str:
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
        self._open: dict[int, Tunnel] = {}
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

    def start(self, local: End, remote: End, *, peer: str, what: str) -> Tunnel:
        """Start copying between `local` (TCP) and `remote` (stream). The slot taken by
        `acquire()` is released when the tunnel ends."""
        t = self._new(local, remote, peer=peer, what=what)
        t.start()
        return t

    def run(self, local: End, remote: End, *, peer: str, what: str) -> None:
        """Like start(), with the calling thread (a per-connection thread that is done with
        its own work) copying local -> remote itself until that direction ends: one thread
        less to start, which a new connection's first byte feels."""
        self._new(local, remote, peer=peer, what=what).run()

    def _new(self, local: End, remote: End, *, peer: str, what: str) -> Tunnel:
        with self._lock:
            tid = self._next_id
            self._next_id += 1
            t = Tunnel(self, tid, local, remote, peer=peer, what=what)
            self._open[tid] = t
            closing = self._closing
        if closing:
            t.abort()
        return t

    def _done(self, t: Tunnel) -> None:
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
    When one side ends its sending cleanly (EOF: the peer's FIN, the client's FIN) the
    other side's sending is shut down (half-close, a FIN) and the other direction goes on;
    both ends are closed when both directions are done. When either side fails (a reset,
    the connection to the peer lost, an error), both ends are reset at once: the stream
    with RESET_STREAM, the TCP connection with an RST, so that neither side can take a
    truncated transfer for a complete one."""

    def __init__(self, registry: Tunnels, tid: int, local: End, remote: End, *, peer: str, what: str) -> None:
        self.registry = registry
        self.id = tid
        self.local = local
        self.remote = remote
        self.peer = peer
        self.what = what
        self.sent = 0  # local -> remote
        self.received = 0  # remote -> local
        self.started = time.monotonic()
        self.error: str | None = None
        self._lock = threading.Lock()
        self._running = 2
        self._aborted = False
        self._broken = False  # a direction failed or abort(): both ends are reset
        for end in (local, remote):
            if isinstance(end, socket.socket):
                end.settimeout(WAKE_INTERVAL)  # see _recv/_send
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

    def run(self) -> None:
        """start(), but the local -> remote direction runs in the calling thread."""
        log.info("conn #%d %s %s: open", self.id, self.what, self.peer)
        me = threading.current_thread()
        me.name = f"tunnel-{self.id}-to-peer"
        self._threads[0] = me
        self._threads[1].start()
        self._copy(self.local, self.remote, True)

    def join(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for th in self._threads:
            if th is threading.current_thread():
                continue
            th.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def abort(self) -> None:
        """End the tunnel now (shutting down): both ends are reset, never closed cleanly."""
        with self._lock:
            self._aborted = True
        self._break()

    def _break(self) -> None:
        """One direction failed (or abort()): reset both ends. The stream is reset at once;
        the TCP socket is reset (RST) when the last thread closes it, and its threads are
        woken now. Only an end of data that came before a break is passed on as a FIN."""
        with self._lock:
            if self._broken:
                return
            self._broken = True
        _break(self.local)
        _break(self.remote)

    def _recv(self, src: End) -> bytes:
        if not isinstance(src, socket.socket):
            return src.recv(BUF_SIZE)
        while True:
            try:
                return src.recv(BUF_SIZE)
            except TimeoutError:  # the WAKE_INTERVAL timeout: still wanted?
                if self._broken:
                    raise ConnectionAbortedError("tunnel broken") from None

    def _send(self, dst: End, data: bytes) -> None:
        if not isinstance(dst, socket.socket):
            dst.sendall(data)
            return
        view = memoryview(data)
        while view:
            try:
                n = dst.send(view)
            except TimeoutError:  # the client is not reading: is the tunnel still wanted?
                if self._broken:
                    raise ConnectionAbortedError("tunnel broken") from None
                continue
            view = view[n:]

    def _copy(self, src: End, dst: End, outbound: bool) -> None:
        end = src
        try:
            while True:
                end = src
                data = self._recv(src)
                if not data:
                    break
                end = dst
                self._send(dst, data)
                with self._lock:
                    if outbound:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
            if self._broken:  # woken by a break (SHUT_RD), not a real end of data: no FIN
                raise ConnectionAbortedError("tunnel broken")
            end = dst
            try:
                dst.shutdown(socket.SHUT_WR)  # the clean end: pass the FIN on
            except OSError:
                pass
        except Exception as e:  # a reset or a closed end: tear the whole tunnel down
            with self._lock:
                if self.error is None and not self._aborted and not self._broken:
                    self.error = f"{'peer' if end is self.remote else 'local'} side: {_err(e)}"
            self._break()
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
