"""`Stream`: one bidirectional QUIC stream with the blocking semantics of a TCP socket.

* `send`/`sendall` block while the stream's send buffer (`send_buffer` bytes not yet
  put on the wire) is full, i.e. while QUIC flow control or congestion control holds
  the data back: a slow peer slows the writer down, memory stays bounded.
* `recv` blocks until data, end of stream (``b""``) or an error. Received bytes wait in
  the stream until read; the peer may only send `stream_window` bytes beyond what the
  application has read (the QUIC window is raised as the application reads, never
  before), so a slow reader bounds memory too.
* `shutdown(socket.SHUT_WR)` sends FIN: the peer reads ``b""`` and can still answer.
  `close()` sends FIN if not done yet and, if the peer's data has not all been read,
  STOP_SENDING (like a TCP close with unread data); idempotent; wakes blocked callers.
* Errors: peer reset (RESET_STREAM) or peer stopped reading (STOP_SENDING) ->
  `ConnectionResetError`; connection lost (idle timeout, relay gone) ->
  `ConnectionAbortedError`; peer closed the connection -> `ConnectionResetError`;
  timeout -> `TimeoutError`; use after close -> `OSError(EBADF)`; send after
  shutdown(SHUT_WR) -> `BrokenPipeError`. Never silence.

All state is guarded by the driver's lock (see derpquic.driver).
"""

from __future__ import annotations

import errno
import io
import socket
import threading
import time
from typing import TYPE_CHECKING, Optional

from derpnet.keys import PublicKey

if TYPE_CHECKING:  # pragma: no cover
    from .driver import Conn

__all__ = ["Stream"]


def _copy_error(err: BaseException) -> BaseException:
    """A fresh exception of the same type (raising one object from several threads
    would tangle their tracebacks)."""
    try:
        new = type(err)(*err.args)
    except Exception:  # pragma: no cover
        new = ConnectionAbortedError(str(err))
    return new


class Stream:
    """A reliable, ordered byte stream to one peer (see the module docstring)."""

    def __init__(self, conn: "Conn", stream_id: int) -> None:
        self._conn = conn
        self._driver = conn.driver
        self._cond = threading.Condition(conn.driver.lock)
        self._sid = stream_id
        self._qs = conn.quic.stream(stream_id)
        self._window = conn.opts.stream_window
        self._send_buffer = conn.opts.send_buffer
        self._rbuf = bytearray()
        self._read_total = 0
        self._eof = False
        self._reset_error: Optional[BaseException] = None
        self._stop_error: Optional[BaseException] = None
        self._conn_error: Optional[BaseException] = None
        self._written = 0
        self._shut_rd = False
        self._shut_wr = False
        self._closed = False
        self._counted = True  # counted in conn.open_streams until closed
        self._timeout: Optional[float] = None

    # ------------------------------------------------------------------ properties

    @property
    def remote_addr(self) -> PublicKey:
        """The peer's key; proven when `authenticated` is True."""
        return self._conn.peer

    @property
    def local_addr(self) -> PublicKey:
        return self._driver.local

    def getpeername(self) -> PublicKey:
        return self._conn.peer

    def getsockname(self) -> PublicKey:
        return self._driver.local

    @property
    def authenticated(self) -> bool:
        """True if the peer proved, inside this QUIC session, that it holds `remote_addr`'s
        private key (a derpnet peer); False for a peer that cannot (the Go derpconnect)."""
        return self._conn.authenticated

    @property
    def stream_id(self) -> int:
        return self._sid

    @property
    def closed(self) -> bool:
        return self._closed

    def settimeout(self, value: Optional[float]) -> None:
        if value is not None:
            value = float(value)
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = value

    def gettimeout(self) -> Optional[float]:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<derpquic.Stream {self._sid} {state} local={self._driver.local.b64()} "
                f"remote={self._conn.peer.b64()} authenticated={self._conn.authenticated}>")

    # ------------------------------------------------------------------ waiting

    def _deadline(self) -> Optional[float]:
        t = self._timeout
        return None if t is None else time.monotonic() + t

    def _wait(self, deadline: Optional[float]) -> None:
        """Wait for a notification (lock held), or raise at the deadline."""
        if deadline is None:
            self._cond.wait()
            return
        left = deadline - time.monotonic()
        if left <= 0:
            if self._timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            raise TimeoutError("timed out")
        self._cond.wait(left)

    # ------------------------------------------------------------------ receiving

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to `bufsize` bytes; ``b""`` at end of stream."""
        if flags:
            raise ValueError("flags are not supported")
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        with self._cond:
            if not self._wait_readable(bufsize):
                return b""
            n = min(bufsize, len(self._rbuf))
            data = bytes(self._rbuf[:n])
            del self._rbuf[:n]
            self._consumed(n)
            return data

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        if flags:
            raise ValueError("flags are not supported")
        view = memoryview(buffer).cast("B")
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes == 0 or nbytes > len(view):
            nbytes = len(view)
        with self._cond:
            if not self._wait_readable(nbytes):
                return 0
            n = min(nbytes, len(self._rbuf))
            view[:n] = self._rbuf[:n]
            del self._rbuf[:n]
            self._consumed(n)
            return n

    def _wait_readable(self, want: int) -> bool:
        """True when data is buffered; False at end of stream; raises on errors (lock held)."""
        if self._closed:
            raise OSError(errno.EBADF, "Bad file descriptor (stream closed)")
        if want == 0:
            return False
        deadline = self._deadline()
        while True:
            if self._rbuf:
                return True
            if self._reset_error is not None:
                raise _copy_error(self._reset_error)
            if self._eof or self._shut_rd:
                return False
            if self._conn_error is not None:
                raise _copy_error(self._conn_error)
            if self._closed:
                raise OSError(errno.EBADF, "Bad file descriptor (stream closed)")
            self._wait(deadline)

    def _consumed(self, n: int) -> None:
        """The application read n bytes: give the peer credit (lock held)."""
        conn = self._conn
        self._read_total += n
        conn.unread -= n
        qs = self._qs
        if qs is None or self._eof or conn.state == "closed":
            return
        target = self._read_total + self._window
        granted = conn.quic.grant_stream(self._sid, target) if target - qs.max_stream_data_local >= self._window // 4 \
            else False
        used, value = conn.quic.connection_receive_window()
        cwin = conn.opts.connection_window
        if granted or used - conn.unread + cwin - value >= cwin // 4:
            self._driver.flush(conn)  # sends MAX_STREAM_DATA / MAX_DATA

    # called by the driver (lock held)

    def _on_data(self, data: bytes, end: bool) -> None:
        if data and not (self._closed or self._shut_rd):
            self._rbuf += data
            self._conn.unread += len(data)
        if end:
            self._eof = True
        self._cond.notify_all()

    def _on_reset(self, code: int) -> None:
        if self._reset_error is None and not self._eof:
            self._reset_error = ConnectionResetError(
                errno.ECONNRESET, f"stream reset by the peer (QUIC application error {code})")
        self._cond.notify_all()

    def _on_stop_sending(self, code: int) -> None:
        if self._stop_error is None:
            self._stop_error = ConnectionResetError(
                errno.ECONNRESET, f"the peer stopped reading this stream (QUIC application error {code})")
        self._conn.blocked_writers.discard(self)
        self._cond.notify_all()

    def _on_conn_error(self, err: BaseException) -> None:
        if self._conn_error is None:
            self._conn_error = err
        self._cond.notify_all()

    # ------------------------------------------------------------------ sending

    def send(self, data, flags: int = 0) -> int:
        """Queue up to len(data) bytes; blocks while the send buffer is full. Returns the count."""
        if flags:
            raise ValueError("flags are not supported")
        view = memoryview(data).cast("B")
        with self._cond:
            self._check_writable()
            if not len(view):
                return 0
            deadline = self._deadline()
            room = self._wait_room(deadline)
            return self._push(view, room)

    def sendall(self, data, flags: int = 0) -> None:
        """Send all of `data` (the timeout bounds the whole call, as for sockets)."""
        if flags:
            raise ValueError("flags are not supported")
        view = memoryview(data).cast("B")
        with self._cond:
            self._check_writable()
            deadline = self._deadline()
            off = 0
            while off < len(view):
                room = self._wait_room(deadline)
                off += self._push(view[off:], room)

    def _push(self, view: memoryview, room: int) -> int:
        n = min(room, len(view))
        self._conn.quic.send_stream_data(self._sid, bytes(view[:n]))
        self._written += n
        self._driver.flush(self._conn)
        return n

    def _room(self) -> int:
        qs = self._qs
        return self._send_buffer - (self._written - qs.sender.highest_offset)

    def _check_writable(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "Bad file descriptor (stream closed)")
        if self._shut_wr:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe (stream shut down for writing)")
        if self._stop_error is not None:
            raise _copy_error(self._stop_error)
        if self._conn_error is not None:
            raise _copy_error(self._conn_error)

    def _wait_room(self, deadline: Optional[float]) -> int:
        while True:
            self._check_writable()
            room = self._room()
            if room > 0:
                return room
            self._conn.blocked_writers.add(self)
            try:
                self._wait(deadline)
            finally:
                self._conn.blocked_writers.discard(self)

    def _writer_may_proceed(self) -> bool:
        return (self._room() > 0 or self._closed or self._shut_wr or self._stop_error is not None
                or self._conn_error is not None)

    def _lingering(self) -> bool:
        """The application is done writing but the peer has not acknowledged everything."""
        return ((self._shut_wr or self._closed) and self._stop_error is None and self._conn_error is None
                and self._qs is not None and not self._qs.sender.is_finished)

    # ------------------------------------------------------------------ shutting down

    def shutdown(self, how: int) -> None:
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise ValueError("how must be SHUT_RD, SHUT_WR or SHUT_RDWR")
        with self._cond:
            if self._closed:
                raise OSError(errno.EBADF, "Bad file descriptor (stream closed)")
            if how in (socket.SHUT_WR, socket.SHUT_RDWR):
                self._shut_write()
            if how in (socket.SHUT_RD, socket.SHUT_RDWR):
                self._shut_read()
            self._cond.notify_all()
            if self._conn.state != "closed":
                self._driver.flush(self._conn)

    def _shut_write(self) -> None:
        if self._shut_wr:
            return
        self._shut_wr = True
        conn = self._conn
        if conn.state != "closed" and self._stop_error is None and not conn.quic.state_closed:
            try:
                conn.quic.send_stream_data(self._sid, b"", end_stream=True)
            except (ValueError, RuntimeError):  # already reset / finished
                pass

    def _shut_read(self, code: int = 0) -> None:
        if self._shut_rd:
            return
        self._shut_rd = True
        conn = self._conn
        conn.unread -= len(self._rbuf)
        self._rbuf.clear()
        if (not self._eof and self._reset_error is None and conn.state != "closed"
                and not conn.quic.state_closed):
            try:
                conn.quic.stop_stream(self._sid, code)
            except (ValueError, RuntimeError):
                pass

    def close(self) -> None:
        """FIN (if not sent), STOP_SENDING (if unread data may still come). Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._shut_write()
            self._shut_read()
            self._closed = True
            conn = self._conn
            conn.blocked_writers.discard(self)
            if self._counted:
                self._counted = False
                conn.open_streams -= 1
            conn.zombies.add(self)
            self._cond.notify_all()
            if conn.state != "closed":
                self._driver.flush(conn)

    def abort(self, code: int = 0) -> None:
        """Abortive close (like a TCP RST): RESET_STREAM and STOP_SENDING with `code`,
        unsent data dropped; the peer's recv/send raise ConnectionResetError. Wakes blocked
        callers here (they get OSError EBADF or b""). Idempotent; no-op after close()."""
        with self._cond:
            if self._closed:
                return
            self._abort(OSError(errno.EBADF, "Bad file descriptor (stream aborted)"), code)
            self._cond.notify_all()
            if self._conn.state != "closed":
                self._driver.flush(self._conn)

    def _abort(self, err: BaseException, code: int = 0x10) -> None:
        """Refuse a stream the application never got (lock held): RESET_STREAM and
        STOP_SENDING, so the peer sees an error rather than a clean end."""
        self._on_conn_error(err)
        if not self._closed:
            conn = self._conn
            self._shut_wr = True
            if conn.state != "closed" and not conn.quic.state_closed:
                try:
                    conn.quic.reset_stream(self._sid, code)
                except (ValueError, RuntimeError):
                    pass
            self._shut_read(code)
            self._closed = True
            conn.zombies.add(self)
            if self._counted:
                self._counted = False
                self._conn.open_streams -= 1

    # ------------------------------------------------------------------ file objects

    def makefile(self, mode: str = "r", buffering: Optional[int] = None, *, encoding=None, errors=None,
                 newline=None):
        """A file object reading/writing this stream, as socket.makefile()."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only 'r', 'w', 'b')")
        writing = "w" in mode
        reading = "r" in mode or not writing
        binary = "b" in mode
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = _StreamIO(self, rawmode)
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        if reading and writing:
            buf = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buf = io.BufferedReader(raw, buffering)
        else:
            buf = io.BufferedWriter(raw, buffering)
        if binary:
            return buf
        text = io.TextIOWrapper(buf, encoding, errors, newline)
        text.mode = mode
        return text


class _StreamIO(io.RawIOBase):
    """Raw I/O over a Stream (closing it does not close the stream, as with sockets)."""

    def __init__(self, stream: Stream, mode: str) -> None:
        super().__init__()
        self._stream = stream
        self._reading = "r" in mode
        self._writing = "w" in mode
        self.mode = mode + "b"

    def readinto(self, b) -> int:
        self._checkClosed()
        if not self._reading:
            raise io.UnsupportedOperation("not readable")
        return self._stream.recv_into(b)

    def write(self, b) -> int:
        self._checkClosed()
        if not self._writing:
            raise io.UnsupportedOperation("not writable")
        self._stream.sendall(b)
        return memoryview(b).nbytes

    def readable(self) -> bool:
        return self._reading

    def writable(self) -> bool:
        return self._writing

    def seekable(self) -> bool:
        return False
