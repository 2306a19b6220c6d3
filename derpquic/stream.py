"""`Stream`: one bidirectional QUIC stream with the blocking semantics of a TCP socket.

send/sendall block while `send_buffer` bytes wait for QUIC to put them on the wire (a
slow peer slows the writer down); recv blocks until data, end of stream (``b""``) or an
error, and the peer may send only `stream_window` bytes beyond what was read (a slow
reader bounds memory too). shutdown(SHUT_WR) sends FIN; close() also stops the peer's
sending if its data was not all read (like TCP); abort() resets. Errors are never
silence: ConnectionResetError (peer reset or stopped reading, peer closed the
connection), ConnectionAbortedError (connection lost), TimeoutError, BrokenPipeError
(send after SHUT_WR), OSError EBADF (use after close).

The state lives in a sans-IO `StreamState`; this class adds the waiting and aioquic.
All of it is guarded by the driver's lock (see derpquic.driver).
"""

from __future__ import annotations

import errno
import io
import socket
import threading
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from derpnet.keys import PublicKey

from .codes import STREAM_REFUSED
from .hooks import StreamEndpoint
from .streamstate import Readable, StreamState, bad_fd, window_credit

if TYPE_CHECKING:  # pragma: no cover
    from .conn import Conn

__all__ = ["Stream"]


class SocketTimeout:
    """Socket-style timeouts for blocking calls that wait on `_cond`: None blocks, 0.0 never
    waits (BlockingIOError), a number bounds the whole call (TimeoutError)."""

    _cond: threading.Condition
    _timeout: float | None = None

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def _deadline(self) -> float | None:
        t = self._timeout
        return None if t is None else time.monotonic() + t

    def _wait(self, deadline: float | None) -> None:
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


class Stream(SocketTimeout, StreamEndpoint):
    """A reliable, ordered byte stream to one peer (see the module docstring)."""

    def __init__(self, conn: Conn, stream_id: int) -> None:
        self._conn = conn
        self._driver = conn.host  # (tests/faults/harness.py reads ._driver.pc)
        self._cond = threading.Condition(conn.lock)
        self._sid = stream_id
        self._qs = conn.quic.stream(stream_id)
        self._window = conn.opts.stream_window
        self._send_buffer = conn.opts.send_buffer
        self._state = StreamState()

    # ------------------------------------------------------------------ properties

    def remote_addr(self) -> PublicKey:
        """The key the packets came from (Go's RemoteAddr()): what the relay says, proven
        only when `authenticated` is True. To act on who the peer is, use `peer_key`."""
        return self._conn.peer

    @property
    def peer_key(self) -> PublicKey | None:
        """The peer's key if it proved, in this QUIC session, that it holds the private key;
        None otherwise (a Go derpconnect, or anyone the relay passes off as that key)."""
        return self._conn.peer if self._conn.authenticated else None

    def local_addr(self) -> PublicKey:
        """Our key (Go's LocalAddr())."""
        return self._conn.local

    def getpeername(self) -> PublicKey:
        return self._conn.peer

    def getsockname(self) -> PublicKey:
        return self._conn.local

    @property
    def authenticated(self) -> bool:
        """True if the peer proved, inside this QUIC session, that it holds `remote_addr()`'s
        private key (a derpnet peer); False for a peer that cannot (the Go derpconnect)."""
        return self._conn.authenticated

    @property
    def stream_id(self) -> int:
        return self._sid

    @property
    def closed(self) -> bool:
        return self._state.closed

    @property
    def _rbuf(self) -> bytearray:  # (tests/faults/harness.py reads it)
        return self._state.rbuf

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._state.closed else "open"
        return (f"<derpquic.Stream {self._sid} {state} local={self._conn.local.b64()} "
                f"remote={self._conn.peer.b64()} authenticated={self._conn.authenticated}>")

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
            data = self._state.take(bufsize)
            self._consumed(len(data))
            return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
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
            n = self._state.take_into(view[:nbytes])
            self._consumed(n)
            return n

    def _wait_readable(self, want: int) -> bool:
        """True when data is buffered; False at end of stream; raises on errors (lock held)."""
        if self._state.closed:
            raise bad_fd("stream closed")
        if want == 0:
            return False
        deadline = self._deadline()
        while True:
            readable = self._state.readable()
            if readable is not Readable.WAIT:
                return readable is Readable.DATA
            self._wait(deadline)

    def _consumed(self, n: int) -> None:
        """The application read n bytes: give the peer credit (lock held)."""
        conn = self._conn
        conn.streams.unread -= n
        qs = self._qs
        if qs is None or self._state.eof or conn.closed:
            return
        credit = window_credit(self._state.read_total, self._window, qs.max_stream_data_local)
        granted = credit is not None and conn.quic.grant_stream(self._sid, credit)
        used, limit = conn.quic.connection_receive_window()
        if granted or window_credit(used - conn.streams.unread, conn.opts.connection_window, limit) is not None:
            conn.flush()  # sends MAX_STREAM_DATA / MAX_DATA

    # ------------------------------------------------------------------ StreamEndpoint (lock held)

    def data_received(self, data: bytes, end: bool) -> None:
        self._conn.streams.unread += self._state.data_received(data, end)
        self._cond.notify_all()

    def reset_received(self, code: int) -> None:
        self._state.reset_received(code)
        self._cond.notify_all()

    def stop_sending_received(self, code: int) -> None:
        self._state.stop_sending_received(code)
        self._cond.notify_all()

    def connection_lost(self, error: BaseException) -> None:
        self._state.connection_lost(error)
        self._cond.notify_all()

    def wake_writer(self) -> bool:
        if not self._state.writer_may_proceed(self._room(), self._send_buffer // 4):
            return False
        self._cond.notify_all()
        return True

    def lingering(self) -> bool:
        qs = self._qs
        return self._state.lingering(qs is None or qs.sender.is_finished)

    def refuse(self, error: BaseException) -> None:
        self._abort(error, STREAM_REFUSED)
        self._cond.notify_all()
        if not self._conn.closed:
            self._conn.flush()

    # ------------------------------------------------------------------ sending

    def send(self, data: Any, flags: int = 0) -> int:
        """Queue up to len(data) bytes; blocks while the send buffer is full. Returns the count."""
        if flags:
            raise ValueError("flags are not supported")
        view = memoryview(data).cast("B")
        with self._cond:
            self._check_writable()
            if not len(view):
                return 0
            room = self._wait_room(self._deadline())
            return self._push(view, room)

    def sendall(self, data: Any, flags: int = 0) -> None:
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
        self._state.written += n
        self._conn.flush()
        return n

    def _room(self) -> int:
        qs = self._qs
        sent = qs.sender.highest_offset if qs is not None else self._state.written
        return self._send_buffer - (self._state.written - sent)

    def _check_writable(self) -> None:
        error = self._state.write_error()
        if error is not None:
            raise error

    def _wait_room(self, deadline: float | None) -> int:
        while True:
            self._check_writable()
            room = self._room()
            if room > 0:
                return room
            self._conn.streams.blocked_writers.add(self)
            try:
                self._wait(deadline)
            finally:
                self._conn.streams.blocked_writers.discard(self)

    # ------------------------------------------------------------------ shutting down

    def shutdown(self, how: int) -> None:
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise ValueError("how must be SHUT_RD, SHUT_WR or SHUT_RDWR")
        with self._cond:
            if self._state.closed:
                raise bad_fd("stream closed")
            if how in (socket.SHUT_WR, socket.SHUT_RDWR):
                self._shut_write()
            if how in (socket.SHUT_RD, socket.SHUT_RDWR):
                self._shut_read()
            self._cond.notify_all()
            if not self._conn.closed:
                self._conn.flush()

    def _live(self) -> bool:
        return not self._conn.closed and not self._conn.quic.state_closed

    def _shut_write(self) -> None:
        state = self._state
        if state.shut_wr:
            return
        state.shut_wr = True
        if state.stop_error is None and self._live():
            with suppress(ValueError, RuntimeError):  # already reset / finished
                self._conn.quic.send_stream_data(self._sid, b"", end_stream=True)

    def _shut_read(self, code: int = 0) -> None:
        state = self._state
        if state.shut_rd:
            return
        self._conn.streams.unread -= state.shut_read()
        if state.peer_may_send and self._live():
            with suppress(ValueError, RuntimeError):
                self._conn.quic.stop_stream(self._sid, code)

    def close(self) -> None:
        """FIN (if not sent), STOP_SENDING (if unread data may still come). Idempotent."""
        with self._cond:
            if self._state.closed:
                return
            self._shut_write()
            self._shut_read()
            self._state.closed = True
            self._conn.streams.closed(self)
            self._cond.notify_all()
            if not self._conn.closed:
                self._conn.flush()

    def abort(self, code: int = 0) -> None:
        """Abortive close (like a TCP RST): RESET_STREAM and STOP_SENDING with `code`,
        unsent data dropped; the peer's recv/send raise ConnectionResetError. Wakes blocked
        callers here (they get OSError EBADF). Idempotent; no-op after close()."""
        with self._cond:
            if self._state.closed:
                return
            self._abort(bad_fd("stream aborted"), code)
            self._cond.notify_all()
            if not self._conn.closed:
                self._conn.flush()

    def _abort(self, err: BaseException, code: int) -> None:
        """RESET_STREAM and STOP_SENDING, so the peer sees an error rather than a clean end."""
        state = self._state
        state.connection_lost(err)
        if state.closed:
            return
        state.aborted = True
        state.shut_wr = True
        if self._live():
            with suppress(ValueError, RuntimeError):
                self._conn.quic.reset_stream(self._sid, code)
        self._shut_read(code)
        state.closed = True
        self._conn.streams.closed(self)

    # ------------------------------------------------------------------ file objects

    def makefile(self, mode: str = "r", buffering: int | None = None, *, encoding: str | None = None,
                 errors: str | None = None, newline: str | None = None) -> Any:
        """A file object reading/writing this stream, as socket.makefile()."""
        return makefile(self, mode, buffering, encoding=encoding, errors=errors, newline=newline)


def makefile(stream: Stream, mode: str = "r", buffering: int | None = None, *,
             encoding: str | None = None, errors: str | None = None, newline: str | None = None) -> Any:
    """A file object over `stream`, as socket.makefile() makes one over a socket."""
    if not set(mode) <= {"r", "w", "b"}:
        raise ValueError(f"invalid mode {mode!r} (only 'r', 'w', 'b')")
    writing = "w" in mode
    reading = "r" in mode or not writing
    binary = "b" in mode
    raw = _StreamIO(stream, ("r" if reading else "") + ("w" if writing else ""))
    if buffering is None or buffering < 0:
        buffering = io.DEFAULT_BUFFER_SIZE
    if buffering == 0:
        if not binary:
            raise ValueError("unbuffered streams must be binary")
        return raw
    buf: io.BufferedIOBase
    if reading and writing:
        buf = io.BufferedRWPair(raw, raw, buffering)
    elif reading:
        buf = io.BufferedReader(raw, buffering)
    else:
        buf = io.BufferedWriter(raw, buffering)
    if binary:
        return buf
    text = io.TextIOWrapper(buf, encoding, errors, newline)  # type: ignore[type-var]
    text.mode = mode  # type: ignore[misc]
    return text


class _StreamIO(io.RawIOBase):
    """Raw I/O over a Stream (closing it does not close the stream, as with sockets)."""

    def __init__(self, stream: Stream, mode: str) -> None:
        super().__init__()
        self._stream = stream
        self._reading = "r" in mode
        self._writing = "w" in mode
        self.mode = mode + "b"

    def readinto(self, b: Any) -> int:
        self._checkClosed()
        if not self._reading:
            raise io.UnsupportedOperation("not readable")
        return self._stream.recv_into(b)

    def write(self, b: Any) -> int:
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
