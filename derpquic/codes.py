"""Application error codes on the wire, and the exception a closed connection raises.

Pure: no aioquic connection, no clock. Our peers send these codes in CONNECTION_CLOSE
(application close) and RESET_STREAM / STOP_SENDING; `close_error` turns the reason a
connection ended into the one exception every waiting caller gets.
"""

from __future__ import annotations

from enum import IntEnum

from aioquic.quic.events import ConnectionTerminated

from derpnet.errors import AuthenticationError

__all__ = ["AppError", "STREAM_REFUSED", "QUIC_CONNECTION_REFUSED", "close_error"]


class AppError(IntEnum):
    """Application error codes of CONNECTION_CLOSE (our peers decode them into exceptions)."""

    CLOSED = 0x0          # normal close
    AUTH_FAILED = 0x1     # the peer's key proof did not verify
    NOT_ALLOWED = 0x2     # the peer's key is not in the allow-list
    AUTH_REQUIRED = 0x3   # the peer cannot prove its key (no derpnet-auth ALPN) but we require it


#: Stream error code: refused (listener backlog full, listener closed, unexpected stream).
STREAM_REFUSED = 0x10

#: QUIC transport error APPLICATION_ERROR: an application close sent before the handshake
#: finished (its code is hidden from the peer until then).
_QUIC_APPLICATION_ERROR = 0xC
#: QUIC transport error CONNECTION_REFUSED: a listener refused our Initial statelessly
#: (a key outside its allow-list, too many handshakes in progress).
QUIC_CONNECTION_REFUSED = 0x2
_IDLE = "Idle timeout"


def close_error(ev: ConnectionTerminated, *, peer: str, describe: str, handshaking: bool,
                heard_from_peer: bool, idle_timeout: float) -> BaseException:
    """The exception for a connection that ended with `ev`.

    `peer`: the peer's key as text; `describe`: "to <key>" / "from <key>"; `handshaking`:
    the QUIC handshake or the key proofs were not finished; `heard_from_peer`: any packet
    arrived; `idle_timeout`: the negotiated idle timeout in seconds."""
    reason = ev.reason_phrase or ""
    if reason == _IDLE:
        if ev.frame_type == 0 and not heard_from_peer:
            return TimeoutError(f"no answer from {peer}")
        return ConnectionAbortedError(
            f"connection {describe} timed out: nothing heard for {idle_timeout:.0f} s")
    if ev.frame_type is None:  # application close by the peer
        if ev.error_code == AppError.NOT_ALLOWED:
            return ConnectionRefusedError(f"{peer} refused the connection: our key is not in its allow-list")
        if ev.error_code == AppError.AUTH_REQUIRED:
            return AuthenticationError(f"{peer} requires peers to prove their key ({reason})")
        if ev.error_code == AppError.AUTH_FAILED:
            return AuthenticationError(f"{peer} rejected our key proof ({reason})")
        return ConnectionResetError(f"{peer} closed the connection" + (f": {reason}" if reason else ""))
    if ev.error_code == _QUIC_APPLICATION_ERROR and handshaking:
        return ConnectionRefusedError(f"{peer} refused the connection during the handshake")
    if ev.error_code == QUIC_CONNECTION_REFUSED:
        if reason == "not allowed":
            return ConnectionRefusedError(f"{peer} refused the connection: our key is not in its allow-list")
        return ConnectionRefusedError(f"{peer} refused the connection" + (f": {reason}" if reason else ""))
    return ConnectionResetError(
        f"connection {describe} closed: QUIC error 0x{ev.error_code:x}" + (f" ({reason})" if reason else ""))
