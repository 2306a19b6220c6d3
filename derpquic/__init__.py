"""derpquic: reliable, encrypted, authenticated streams between derpnet peers.

QUIC (aioquic, driven by threads: no asyncio visible) over a derpnet PacketConn, wire
compatible with the Go `github.com/ntnj/derpnet/derpquic` (quic-go v0.46)::

    ln = derpquic.listen("https://derp.example.com", key)      # server
    s = ln.accept(); data = s.recv(65536); s.sendall(data); s.close()

    d = derpquic.Dialer("https://derp.example.com")           # client
    s = d.dial(server_public_key); s.sendall(b"hi"); s.shutdown(socket.SHUT_WR)

Both ends prove their node key inside the QUIC session (derpquic.auth), so the relay
cannot impersonate a peer; Go peers cannot prove theirs (see Listener/Dialer options).
With `datagrams=True` on both sides, QUIC DATAGRAM frames too (RFC 9221: unreliable,
encrypted): `Dialer.datagram_channel(peer)`, `recv_datagram()` on either side.
Modules: api (Listener, Dialer), stream (Stream), datagrams (DatagramChannel), conn (one
QUIC connection), driver (the receive thread: routing, timers), auth (key proofs), config
(tunables), _quic (our aioquic adjustments), hooks (the protocols between them); sans-IO:
auth's KeyProof, streamstate, timers, codes. Design notes: docs/derpquic.md.
"""

from __future__ import annotations

from derpnet.errors import AuthenticationError

from .api import Dialer, Listener, listen
from .config import Options
from .datagrams import DatagramChannel
from .stream import Stream

__all__ = ["listen", "Listener", "Dialer", "Stream", "DatagramChannel", "Options", "AuthenticationError"]
