"""`StreamState`: what one stream has received, how it ended and what may still be done
with it (sans-IO: no lock, no aioquic, no clock), and `window_credit`, when a receive
window is raised.

`derpquic.stream.Stream` wraps it with the blocking, socket-like calls; the connection
feeds it the peer's data, resets and STOP_SENDINGs.
"""

from __future__ import annotations

import errno
from enum import Enum

__all__ = ["StreamState", "Readable", "window_credit", "copy_error"]


def copy_error(err: BaseException) -> BaseException:
    """A fresh exception of the same type (raising one object from several threads
    would tangle their tracebacks)."""
    try:
        return type(err)(*err.args)
    except Exception:  # pragma: no cover - an exception type with another signature
        return ConnectionAbortedError(str(err))


def window_credit(consumed: int, window: int, limit: int) -> int | None:
    """The receive limit to advertise now that the application has consumed `consumed`
    bytes: `consumed + window`, or None while that is less than a quarter window above
    the current `limit` (fewer MAX_DATA / MAX_STREAM_DATA frames, same throughput)."""
    target = consumed + window
    return target if target - limit >= window // 4 else None


def bad_fd(what: str) -> OSError:
    return OSError(errno.EBADF, f"Bad file descriptor ({what})")


class Readable(Enum):
    DATA = "data"   # bytes are buffered
    EOF = "eof"     # nothing more will come (FIN, or reading shut down)
    WAIT = "wait"   # nothing yet


class StreamState:
    """One stream's receive buffer, its end (FIN, reset, STOP_SENDING, connection lost)
    and the application's shutdowns. Errors are kept and raised again as copies."""

    __slots__ = ("rbuf", "read_total", "eof", "reset_error", "stop_error", "conn_error", "written",
                 "shut_rd", "shut_wr", "closed", "aborted")

    def __init__(self) -> None:
        self.rbuf = bytearray()
        self.read_total = 0      # bytes the application has read
        self.eof = False         # the peer's FIN arrived
        self.reset_error: BaseException | None = None  # the peer reset its sending side
        self.stop_error: BaseException | None = None   # the peer stopped reading ours
        self.conn_error: BaseException | None = None   # the connection is unusable
        self.written = 0         # bytes the application has queued
        self.shut_rd = False
        self.shut_wr = False
        self.closed = False
        self.aborted = False     # reset by us (abort, refusal): reads raise, never return b""

    # -- from the peer -----------------------------------------------------------------------

    def data_received(self, data: bytes, end: bool) -> int:
        """Buffer `data` (dropped once reading is shut down); returns the bytes buffered."""
        kept = 0
        if data and not (self.closed or self.shut_rd):
            self.rbuf += data
            kept = len(data)
        if end:
            self.eof = True
        return kept

    def reset_received(self, code: int) -> None:
        if self.reset_error is None and not self.eof:
            self.reset_error = ConnectionResetError(
                errno.ECONNRESET, f"stream reset by the peer (QUIC application error {code})")

    def stop_sending_received(self, code: int) -> None:
        if self.stop_error is None:
            self.stop_error = ConnectionResetError(
                errno.ECONNRESET, f"the peer stopped reading this stream (QUIC application error {code})")

    def connection_lost(self, error: BaseException) -> None:
        if self.conn_error is None:
            self.conn_error = error

    # -- reading -----------------------------------------------------------------------------

    def readable(self) -> Readable:
        """Whether a read returns data, end of stream or must wait; raises the stream's error
        (reset, connection lost, closed) when that is all a read can return. Only the peer's
        FIN, or our own shutdown of reading, is an end of stream: a stream reset by either
        side, or lost with its connection, never reads as one."""
        if self.rbuf:
            return Readable.DATA
        if self.reset_error is not None:
            raise copy_error(self.reset_error)
        if self.eof:
            return Readable.EOF
        if self.aborted:
            raise copy_error(self.conn_error) if self.conn_error is not None else bad_fd("stream aborted")
        if self.shut_rd:
            return Readable.EOF
        if self.conn_error is not None:
            raise copy_error(self.conn_error)
        if self.closed:
            raise bad_fd("stream closed")
        return Readable.WAIT

    def take(self, n: int) -> bytes:
        n = min(n, len(self.rbuf))
        data = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        self.read_total += n
        return data

    def take_into(self, view: memoryview) -> int:
        n = min(len(view), len(self.rbuf))
        view[:n] = self.rbuf[:n]
        del self.rbuf[:n]
        self.read_total += n
        return n

    def shut_read(self) -> int:
        """Stop reading: drop what is buffered (returns its size). Idempotent."""
        self.shut_rd = True
        dropped = len(self.rbuf)
        self.rbuf.clear()
        return dropped

    @property
    def peer_may_send(self) -> bool:
        """The peer's sending side is still open (STOP_SENDING would mean something)."""
        return not self.eof and self.reset_error is None

    # -- writing -----------------------------------------------------------------------------

    def write_error(self) -> BaseException | None:
        """Why a write fails now, or None if it may proceed."""
        if self.closed:
            return bad_fd("stream closed")
        if self.shut_wr:
            return BrokenPipeError(errno.EPIPE, "Broken pipe (stream shut down for writing)")
        if self.stop_error is not None:
            return copy_error(self.stop_error)
        if self.conn_error is not None:
            return copy_error(self.conn_error)
        return None

    def writer_may_proceed(self, room: int, wanted: int = 1) -> bool:
        """A writer blocked for send-buffer room may wake: at least `wanted` bytes of room
        (waking it for every few freed bytes costs a thread switch each), or an end."""
        return (room >= wanted or self.closed or self.shut_wr or self.stop_error is not None
                or self.conn_error is not None)

    def lingering(self, sender_finished: bool) -> bool:
        """The application is done writing but the peer has not acknowledged everything."""
        return ((self.shut_wr or self.closed) and self.stop_error is None and self.conn_error is None
                and not sender_finished)
