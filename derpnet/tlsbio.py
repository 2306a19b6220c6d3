"""TLS without a socket: one `ssl.SSLObject` on two `MemoryBIO`s, for both ends of a link.

Layer: relay link and relay server (sans-IO: ciphertext in, plaintext out, and the
reverse; the caller moves the bytes and serialises the calls). The client uses it so
that a write never waits for a read; the relay so that it controls TLS buffering itself
(asyncio's SSL transport preallocates a large read buffer per connection). Why, in
DEVELOPERS.md "TLS on memory BIOs".
"""

from __future__ import annotations

import ssl
from typing import cast

__all__ = ["TLSSession", "READ_CHUNK", "RECORD_BYTES"]

READ_CHUNK = 64 << 10
RECORD_BYTES = 16 << 10  # a full TLS record of plaintext


class TLSSession:
    """One end of one TLS connection (handshake, records, close_notify) without a socket.

    After every call that may produce TLS bytes (`start`, `receive`, `close_notify`) the
    caller sends `pending()`; `encrypt()` returns its records (and anything pending) itself.
    """

    __slots__ = ("_in", "_out", "_obj", "handshake_done", "closed_by_peer")

    def __init__(self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self.handshake_done = False
        self.closed_by_peer = False

    def start(self) -> bool:
        """Advance the handshake (a client calls it first, for its ClientHello); True once done.

        Raises ssl.SSLError (ssl.SSLCertVerificationError ...) when the handshake fails."""
        if not self.handshake_done:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.handshake_done = True
        return True

    def receive(self, data: bytes | memoryview) -> bytes:
        """Feed ciphertext from the peer; return the application data it completes (maybe b"").

        Raises ssl.SSLError for anything that is not valid TLS. Afterwards, send `pending()`;
        `closed_by_peer` tells whether the peer's close_notify has arrived.
        """
        if data:
            self._in.write(data)
        if not self.start():
            return b""
        chunks = []
        while True:
            try:
                chunk = self._obj.read(READ_CHUNK)
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

    def feed(self, data: bytes | memoryview) -> bool:
        """Buffer ciphertext from the peer (copied) and advance the handshake; True once it is
        done. Then `read_into()` the application data, and send `pending()`."""
        if data:
            self._in.write(data)
        return self.handshake_done or self.start()

    def read_into(self, buf: memoryview) -> int:
        """Decrypt buffered records into `buf`; the bytes written (0: nothing more for now).

        No allocation per record, and no exception when the input ends on a record
        boundary (the common case). Raises ssl.SSLError for anything that is not valid TLS;
        sets `closed_by_peer` on the peer's close_notify."""
        obj, inb = self._obj, self._in
        n, size = 0, len(buf)
        # OpenSSL holds decrypted bytes only when a read stopped short of a record's end:
        # that is, after a read that filled `buf`, so only a fresh call asks for them.
        while n < size and (inb.pending or (not n and obj.pending())):
            try:
                got = cast(int, obj.read(size - n, buf[n:]))  # with a buffer: a count
            except ssl.SSLWantReadError:  # a partial record: the rest is still on its way
                break
            except ssl.SSLZeroReturnError:
                self.closed_by_peer = True
                break
            if not got:
                self.closed_by_peer = True
                break
            n += got
        return n

    def encrypt(self, data: bytes) -> bytes:
        """Application data → the TLS records to send (plus anything else pending)."""
        self._write(data)
        return self._out.read()

    def encrypt_parts(self, parts: list[bytes]) -> bytes:
        """Like encrypt(b"".join(parts)), without copying large parts: runs of small parts are
        joined (few records), a part of RECORD_BYTES or more is encrypted as it is."""
        small: list[bytes] = []
        for part in parts:
            if len(part) < RECORD_BYTES:
                small.append(part)
                continue
            if small:
                self._write(small[0] if len(small) == 1 else b"".join(small))
                small.clear()
            self._write(part)
        if small:
            self._write(small[0] if len(small) == 1 else b"".join(small))
        return self._out.read()

    def _write(self, data: bytes) -> None:
        n = self._obj.write(data)
        if n < len(data):  # a memory BIO takes everything; never seen, but SSL_write may stop short
            view = memoryview(data)[n:]
            while view:
                view = view[self._obj.write(view):]

    @property
    def has_pending(self) -> bool:
        """TLS bytes wait to be sent (e.g. an answer to a KeyUpdate produced while reading)."""
        return self._out.pending > 0

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
    def version(self) -> str | None:
        """The negotiated TLS version, once the handshake is done."""
        return self._obj.version()

    @property
    def alpn_protocol(self) -> str | None:
        """The protocol chosen by ALPN, if any."""
        return self._obj.selected_alpn_protocol()
