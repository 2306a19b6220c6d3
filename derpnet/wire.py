"""The byte pipe of a connected relay link: a blocking socket, TLS or not, shared by threads.

Layer: relay link. Any thread may `write()`; writes are serialised by a send lock and
bounded by the socket's send timeout. One reader thread calls `recv()`. OpenSSL objects
are not safe for a concurrent read and write, so the `TLSSession` is only touched under a
short TLS lock while the raw socket I/O happens outside it; TLS records produced while
reading (a KeyUpdate answer, say) are sent by whoever next holds the send lock.
"""

from __future__ import annotations

import errno
import socket
import threading
from typing import Protocol

from .dial import RECV_SIZE
from .tlsbio import TLSSession

__all__ = ["Wire", "WireBroken", "Framing"]


class Framing(Protocol):
    """A layer between the DERP bytes and the socket (DERP over WebSocket)."""

    def wrap(self, data: bytes) -> bytes:
        """What to send for `data` (called under the send lock)."""

    def unwrap(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """(DERP bytes in what was received, replies to send, whether the peer ended the stream)."""


class WireBroken(Exception):
    """A write could not be completed; `cause` says why (None: the wire was shut down)."""

    def __init__(self, cause: OSError | None) -> None:
        super().__init__(str(cause) if cause is not None else "shut down")
        self.cause = cause


class Wire:
    """A connected socket (in blocking mode, with its send/receive timeouts set) and its TLS session."""

    def __init__(self, sock: socket.socket, tls: TLSSession | None, *, url: str, write_timeout: float | None,
                 framing: Framing | None = None) -> None:
        self.sock = sock
        self.tls = tls
        self.framing = framing  # WebSocket messages around the DERP bytes (wsclient.py), if any
        self._ctl = b""  # framing replies the reader left to send (WebSocket Pongs, the Close echo)
        self.url = url
        self.write_timeout = write_timeout
        self.shut = False  # shutdown() was called
        self.eof: str | None = None  # what the relay closed: "connection" or "TLS session"
        self._send_lock = threading.Lock()
        self._tls_lock = threading.Lock()
        self._tls_out = False  # the reader left TLS records to send
        # The reader's receive buffer, reused: recv() of RECV_SIZE bytes would allocate (and
        # map, and unmap) a fresh 256 KiB every read, ~30 us each, one read per few packets.
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)

    def write(self, data: bytes, lock_timeout: float | None = None) -> None:
        """Send `data` whole. TimeoutError if other writers hold the wire longer than
        `lock_timeout` (nothing sent); WireBroken if the send fails or the wire is shut."""
        lock = self._send_lock
        if lock_timeout is None:
            lock.acquire()
        elif not lock.acquire(timeout=max(lock_timeout, 0.0)):
            raise TimeoutError(errno.ETIMEDOUT, "timed out waiting for other writers on the relay link")
        try:
            if self.shut:
                raise WireBroken(None)
            if self.framing is not None:
                data = self.framing.wrap(data)
                if self._ctl:
                    with self._tls_lock:
                        data, self._ctl = self._ctl + data, b""
            tls = self.tls
            if tls is not None:
                with self._tls_lock:
                    data = tls.encrypt(data)  # with anything the reader left pending
                    self._tls_out = False
            try:
                self.sock.sendall(data)
            except (TimeoutError, BlockingIOError):  # SO_SNDTIMEO, or the settimeout() fallback
                raise WireBroken(TimeoutError(errno.ETIMEDOUT, f"relay {self.url} did not take {len(data)} bytes "
                                              f"within {self.write_timeout}s (it stopped reading)")) from None
            except OSError as e:
                raise WireBroken(e) from e
        finally:
            lock.release()
        if self._tls_out:
            self.flush_tls()

    def flush_tls(self) -> None:
        """Send TLS records the reader produced, unless a writer holds the lock right now
        (that writer checks the flag again after releasing it). WireBroken if sending fails."""
        tls = self.tls
        while self._tls_out and self._send_lock.acquire(blocking=False):
            try:
                with self._tls_lock:
                    out, self._ctl = self._ctl, b""
                    if tls is not None:
                        out = tls.encrypt(out) if out else tls.pending()
                    self._tls_out = False
                if out and not self.shut:
                    try:
                        self.sock.sendall(out)
                    except OSError as e:
                        raise WireBroken(e) from e
            finally:
                self._send_lock.release()

    def recv(self) -> bytes | None:
        """The next plaintext (reader thread only): None when the receive timeout passed,
        b"" at the end (then `eof` says what the relay closed, unless we shut the wire)."""
        try:
            n = self.sock.recv_into(self._rbuf)
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO, or the settimeout() fallback
            return None
        if not n:
            self.eof = "connection"
            return b""
        tls = self.tls
        if tls is None:
            data = bytes(self._rview[:n])
        else:
            with self._tls_lock:
                data = tls.receive(self._rview[:n])  # copied into the TLS input buffer
                if tls.closed_by_peer:
                    self.eof = "TLS session"
                if tls.has_pending:
                    self._tls_out = True
        if self.framing is not None and data:
            data, replies, ended = self.framing.unwrap(data)
            if ended:
                self.eof = "WebSocket"
            if replies:
                with self._tls_lock:
                    self._ctl += replies
                    self._tls_out = True
        if self._tls_out:
            self.flush_tls()
        return data

    def shutdown(self) -> None:
        """Stop both directions now (wakes a blocked reader); any thread, idempotent."""
        self.shut = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket once no writer is using it."""
        with self._send_lock:
            self.shut = True
            self.sock.close()
