"""The bytes of one relay connection: TLS reads into the server's shared buffers, writes in pieces.

Layer: relay server, the I/O edge of `ClientProtocol` (conn.py), kept apart so that the
connection's class stays small. A read arrives as a view of the server's one receive
buffer (`RelayServer.rx_view`); with TLS it is decrypted into the second one
(`plain_view`) record after record (`TLSSession.read_into`). Both are valid only during
the call: everything that must outlive it is copied (the TLS input, the frame decoder,
the payloads). Writes take frames as pieces, so that large payloads are never joined.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from ..tlsbio import TLSSession

if TYPE_CHECKING:  # pragma: no cover
    from .conn import ClientProtocol

__all__ = ["receive", "write", "finish"]

log = logging.getLogger(__name__)


def receive(conn: ClientProtocol, data: bytes | memoryview) -> None:
    """Bytes from the socket: decrypted when serving TLS, then handed to the connection."""
    transport = conn.transport
    if conn.closed or transport is None:
        return
    ctx = conn.server.ssl_context
    if ctx is None:
        conn.on_plaintext(data)
        return
    tls = conn.tls
    if tls is None:
        tls = conn.tls = TLSSession(ctx, server_side=True)
    try:
        if tls.feed(data):
            plain = conn.server.plain_view
            while not conn.closed:
                n = tls.read_into(plain)
                if n:
                    conn.on_plaintext(plain[:n])
                if n < len(plain):  # all there was (read_into fills the buffer otherwise)
                    break
    except ssl.SSLError as e:
        conn.server.tls_errors += 1
        conn.abort(f"TLS: {e.reason or e}", level=logging.DEBUG)  # scanners, plain HTTP on the TLS port
        return
    if tls.has_pending and not transport.is_closing():
        transport.write(tls.pending())  # handshake messages, a KeyUpdate's answer
    if tls.closed_by_peer and not conn.closed:
        log.debug("relay: %s closed TLS (close_notify)", conn.name)
        conn.finish()  # answers with our close_notify


def write(conn: ClientProtocol, parts: list[bytes], raw: bool) -> None:
    """Write pieces in order: in one WebSocket message unless `raw`, encrypted when serving
    TLS (large pieces without a join), else as they are (uvloop: one writev)."""
    transport = conn.transport
    assert transport is not None
    if conn.ws is not None and not raw:
        parts = [conn.ws.wrap(b"".join(parts))]
    transport.writelines(parts if conn.tls is None else [conn.tls.encrypt_parts(parts)])


def finish(conn: ClientProtocol) -> asyncio.TimerHandle | None:
    """Close after the pending bytes: our close_notify first when serving TLS; returns the
    timer that aborts the connection if they are not written within the write timeout."""
    transport = conn.transport
    assert transport is not None
    if conn.tls is not None:
        transport.write(conn.tls.close_notify())
    transport.close()
    if transport.get_write_buffer_size() and conn.options.write_timeout:
        return conn.loop.call_later(conn.options.write_timeout, transport.abort)
    return None
