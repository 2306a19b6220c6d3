"""The relay connection's side of access control, rate limits and graceful restarts.

Layer: relay server. Functions of one `ClientProtocol` (conn.py), kept apart so that
the connection's class stays small: refusing a client with a reason (access.py), pacing
its reads (ratelimit.py), running an admission verdict that came back from a thread,
and the restart drain (restart.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import frames as F
from ..errors import DerpError, LocalProtocolError

if TYPE_CHECKING:  # pragma: no cover
    from .conn import ClientProtocol

__all__ = ["pace", "refuse", "restarting", "drained", "run_deferred"]


def restarting(conn: ClientProtocol, reconnect_in: float, try_for: float) -> None:
    """The relay is going away: stop forwarding this client's packets and queue a Restarting
    frame behind what it is still to be sent (restart.py closes the connection later)."""
    conn.draining = True
    sender = conn.sender
    if not conn.closed and sender is not None and sender.outbox.add_control(
            F.encode_restarting(reconnect_in, try_for)):
        sender.schedule_flush()


def refuse(conn: ClientProtocol, text: str) -> None:
    """Not admitted: say why in a Health frame (before any ServerInfo), then close."""
    if conn.closed:
        return
    conn.send(F.encode_health(text))
    conn.finish()


def pace(conn: ClientProtocol, n: int) -> None:
    """Charge `n` bytes read to the rate limit; over it, stop reading for the debt's time
    (TCP back-pressure slows the client; nothing it sent is dropped)."""
    assert conn.limiter is not None
    delay = conn.limiter.charge(n, conn.loop.time())
    if delay > 0 and not conn.closed and conn.transport is not None:
        conn.server.rate_limit_waits += 1
        conn.transport.pause_reading()
        conn.loop.call_later(delay, _resume_reading, conn)


def _resume_reading(conn: ClientProtocol) -> None:
    if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
        conn.transport.resume_reading()


def run_deferred(conn: ClientProtocol, step: Callable[[], None]) -> None:
    """Run a handshake step that waited off the loop (an admission verdict), handling its
    errors as those of received data: the frames pipelined behind the hello run in it."""
    try:
        step()
    except Exception as e:  # noqa: BLE001 - sorted below, as in _on_plaintext
        if isinstance(e, LocalProtocolError):
            return
        if isinstance(e, DerpError):
            conn.server.protocol_errors += 1
            conn.abort(f"protocol error: {e}", rate_limited=True)
            return
        conn.server.error_log.log(logging.WARNING, "relay: internal error admitting %s; closing it", conn.name,
                                  exc_info=True)
        conn.abort("internal error", level=logging.DEBUG)


def drained(conn: ClientProtocol) -> bool:
    """Nothing left to write: no queued packets or control frames, an empty transport buffer."""
    sender, t = conn.sender, conn.transport
    if sender is not None and (sender.outbox.queued_packets or sender.outbox.ctrl or sender.flush_pending):
        return False
    return t is None or t.is_closing() or not t.get_write_buffer_size()
