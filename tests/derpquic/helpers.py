"""Small helpers shared by the derpquic tests (threads are always joined)."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable

import derpquic


class Background:
    """Run a function in a thread; `result()` joins and re-raises its exception."""

    def __init__(self, fn: Callable, *args, name: str = "test-bg") -> None:
        self._result = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to result()
            self._error = e

    def result(self, timeout: float = 60.0):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("background thread did not finish")
        if self._error is not None:
            raise self._error
        return self._result

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()


def echo_stream(s: derpquic.Stream) -> int:
    """Echo until EOF, then close; returns the byte count."""
    n = 0
    with s:
        s.settimeout(60)
        while True:
            b = s.recv(65536)
            if not b:
                break
            s.sendall(b)
            n += len(b)
        s.shutdown(socket.SHUT_WR)
    return n


class EchoServer:
    """Accepts on a Listener and echoes every stream in its own thread."""

    def __init__(self, ln: derpquic.Listener) -> None:
        self.ln = ln
        self.handlers: list[Background] = []
        self.accepted = 0
        self._thread = Background(self._loop, name="test-echo-accept")

    def _loop(self) -> None:
        while True:
            try:
                s = self.ln.accept()
            except OSError:
                return
            self.accepted += 1
            self.handlers.append(Background(echo_stream, s, name="test-echo"))

    def close(self) -> None:
        """Wait for the streams accepted so far to finish (their clients must have sent
        FIN), then close the listener and join."""
        for h in list(self.handlers):
            h.result()
        self.ln.close()
        self._thread.result()
        for h in self.handlers:
            h.result()


def dial_pair(ln: derpquic.Listener, d: derpquic.Dialer,
              timeout: float = 30.0) -> tuple[derpquic.Stream, derpquic.Stream]:
    """A stream `d` dialled to `ln` and the stream `ln` accepted for it, both with `timeout`."""
    acc = Background(lambda: ln.accept(timeout=10))
    s = d.dial(ln.addr, timeout=10)
    r = acc.result()
    s.settimeout(timeout)
    r.settimeout(timeout)
    return s, r


def recv_exactly(s, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(min(65536, n - len(buf)))
        if not b:
            break
        buf += b
    return bytes(buf)


def recv_all(s) -> bytes:
    buf = bytearray()
    while True:
        b = s.recv(65536)
        if not b:
            return bytes(buf)
        buf += b


def sha256_stream_sink(s) -> tuple[int, bytes]:
    h = hashlib.sha256()
    n = 0
    while True:
        b = s.recv(1 << 16)
        if not b:
            return n, h.digest()
        h.update(b)
        n += len(b)
