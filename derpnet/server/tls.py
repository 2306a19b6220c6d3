"""Server-side TLS over memory BIOs, so the relay controls TLS buffering itself.

asyncio's own SSL transport (3.11) preallocates a 256 KiB read buffer per connection,
before the handshake even starts: 10,000 abandoned TLS sockets would cost 2.5 GiB. An
`ssl.SSLObject` on two `MemoryBIO`s costs ~10 KiB before the handshake and ~25 KiB
after, and is only created once the client has sent its first bytes.

`TLSSession` is sans-IO: ciphertext in, plaintext out, and the reverse; the caller
writes whatever `pending()` returns to the socket.
"""

from __future__ import annotations

import ssl
from typing import Optional

__all__ = ["TLSSession"]

_READ_CHUNK = 64 << 10


class TLSSession:
    """The server end of one TLS connection (handshake, records, close_notify) without a socket."""

    __slots__ = ("_in", "_out", "_obj", "handshake_done", "closed_by_peer")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshake_done = False
        self.closed_by_peer = False

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext from the peer; return the application data it completes (maybe b"").

        Raises ssl.SSLError for anything that is not valid TLS. Afterwards, send `pending()`.
        """
        self._in.write(data)
        if not self.handshake_done:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.handshake_done = True
        chunks = []
        while True:
            try:
                chunk = self._obj.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify (older Pythons raise it)
                self.closed_by_peer = True
                break
            if not chunk:  # close_notify: CPython returns b"" once the peer's shutdown is received
                self.closed_by_peer = True
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def encrypt(self, data: bytes) -> bytes:
        """Application data → the TLS records to send (plus anything else pending)."""
        view = memoryview(data)
        while view:
            n = self._obj.write(view)
            view = view[n:]
        return self._out.read()

    def pending(self) -> bytes:
        """TLS bytes waiting to be sent (handshake messages, session tickets, alerts)."""
        return self._out.read()

    def close_notify(self) -> bytes:
        """The close_notify alert to send before closing (empty if the handshake never finished)."""
        if not self.handshake_done:
            return b""
        try:
            self._obj.unwrap()
        except ssl.SSLError:  # SSLWantReadError: the peer's close_notify is not awaited
            pass
        return self._out.read()

    @property
    def version(self) -> Optional[str]:
        """The negotiated TLS version, once the handshake is done."""
        return self._obj.version()
