"""The interfaces between derpquic's layers, as protocols (the relay's `Endpoint` is the model).

* `StreamEndpoint`: what a connection calls on its streams (`Stream` implements it);
* `ConnOwner`: what a connection tells the Listener or Dialer it belongs to;
* `Acceptor`: what the driver asks of the Listener when a new connection arrives;
* `ConnHost`: what a connection needs from its driver (`Driver` implements it).

Every method here is called with the driver's lock held and must not block.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from derpnet.keys import PublicKey

if TYPE_CHECKING:  # pragma: no cover
    from .auth import AuthPolicy
    from .config import Options
    from .conn import Conn
    from .stream import Stream

__all__ = ["StreamEndpoint", "ConnOwner", "Acceptor", "ConnHost"]


class StreamEndpoint(Protocol):
    """A stream as its connection sees it."""

    @property
    def stream_id(self) -> int: ...

    @property
    def closed(self) -> bool:
        """The application closed (or aborted) the stream."""

    def data_received(self, data: bytes, end: bool) -> None:
        """Bytes from the peer (`end`: its FIN)."""

    def reset_received(self, code: int) -> None:
        """The peer reset its sending side (RESET_STREAM)."""

    def stop_sending_received(self, code: int) -> None:
        """The peer stopped reading (STOP_SENDING)."""

    def connection_lost(self, error: BaseException) -> None:
        """The connection is unusable: every blocked and later call raises a copy of `error`."""

    def wake_writer(self) -> bool:
        """Wake a writer blocked for send-buffer room if it may proceed now; True if so."""

    def lingering(self) -> bool:
        """Closed or shut for writing, but the peer has not acknowledged all our data yet."""

    def refuse(self, error: BaseException) -> None:
        """Reset a stream the application never got (RESET_STREAM + STOP_SENDING)."""


class ConnOwner(Protocol):
    """The Listener or Dialer a connection belongs to."""

    def conn_ready(self, conn: Conn) -> None:
        """The connection may carry streams (handshake and key proofs done)."""

    def conn_closed(self, conn: Conn) -> None:
        """The connection became unusable."""

    def stream_opened(self, stream: Stream) -> None:
        """The peer opened `stream` on a ready connection: hand it out (or refuse it)."""

    def datagram_received(self, conn: Conn, data: bytes) -> None:
        """A DATAGRAM frame arrived on a ready connection (must not block)."""


class Acceptor(ConnOwner, Protocol):
    """The Listener, as the driver sees it when an Initial packet arrives from a new peer."""

    opts: Options
    policy: AuthPolicy

    @property
    def closed(self) -> bool: ...

    def refusal(self, peer: PublicKey) -> str | None:
        """None: make a connection for this Initial from `peer`. Else no state at all: ""
        drops it (busy: the dialler retransmits, like a SYN to a full backlog), any other
        text is answered with a stateless CONNECTION_REFUSED carrying it."""

    def conn_accepted(self, conn: Conn) -> None:
        """A new incoming connection (not yet ready)."""

    def driver_failed(self, error: BaseException) -> None:
        """The driver stopped for good (its PacketConn failed): wake accept()."""


class ConnHost(Protocol):
    """The driver, as its connections see it."""

    lock: threading.Lock
    local: PublicKey

    def now(self) -> float:
        """Monotonic seconds (aioquic's clock)."""

    def send_datagram(self, data: bytes, peer: PublicKey) -> None: ...

    def send_datagrams(self, datagrams: list[bytes], peer: PublicKey) -> None:
        """Send several datagrams to `peer` at once (one relay write where possible)."""

    def add_route(self, conn: Conn, cid: bytes) -> None:
        """Datagrams for (conn.peer, cid) go to `conn`."""

    def remove_route(self, conn: Conn, cid: bytes) -> None: ...

    def forget(self, conn: Conn) -> None:
        """`conn` ended: no more routes, timers or datagrams."""

    def schedule(self, conn: Conn, when: float | None) -> None:
        """Run `conn.timer_fired` at monotonic time `when` (None: no timer)."""

    def flushed(self, conn: Conn) -> None:
        """`conn` sent what it could (wakes Listener/Dialer.close waiting for acknowledgements)."""

    def peer_verified(self, peer: PublicKey) -> None:
        """`peer` proved its key (derpnet-auth) on a connection."""

    def path_mtu(self, peer: PublicKey) -> int:
        """The largest datagram the current path to `peer` carries."""
