"""`Routes`: which connection a datagram belongs to, by (peer key, destination connection
ID), and which peers the relay says have left. Pure bookkeeping, guarded by the driver's lock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from derpnet.keys import PublicKey

if TYPE_CHECKING:
    from .conn import Conn

__all__ = ["Routes"]


class Routes:
    """Every live connection of a driver and the connection IDs that lead to each."""

    def __init__(self) -> None:
        self.by_cid: dict[tuple[PublicKey, bytes], Conn] = {}
        self.conns: set[Conn] = set()
        #: Peers the relay said are not connected (PeerGone), until a datagram from them arrives.
        self.gone: dict[PublicKey, float] = {}

    def __len__(self) -> int:
        return len(self.conns)

    def __iter__(self) -> Iterator[Conn]:
        return iter(list(self.conns))  # a copy: callers close connections as they go

    def to(self, peer: PublicKey) -> list[Conn]:
        """The connections to `peer`."""
        return [c for c in self.conns if c.peer == peer]

    def register(self, conn: Conn, *cids: bytes) -> None:
        """A new connection, reached by `cids`."""
        for cid in cids:
            conn.cids.add(cid)
            self.add(conn, cid)
        self.conns.add(conn)

    def add(self, conn: Conn, cid: bytes) -> None:
        self.by_cid[(conn.peer, cid)] = conn

    def remove(self, conn: Conn, cid: bytes) -> None:
        if self.by_cid.get((conn.peer, cid)) is conn:
            del self.by_cid[(conn.peer, cid)]

    def forget(self, conn: Conn) -> None:
        """`conn` ended: no datagram reaches it any more."""
        for cid in conn.cids:
            self.remove(conn, cid)
        self.conns.discard(conn)

    def lookup(self, peer: PublicKey, cid: bytes) -> Conn | None:
        """The connection for a datagram from `peer` to `cid`; hearing from a peer the relay
        said had left means it is back."""
        if self.gone:
            self.gone.pop(peer, None)
        return self.by_cid.get((peer, cid))

    def peer_left(self, peer: PublicKey, now: float) -> list[Conn]:
        """The relay says `peer` left: remember it and return its connections."""
        self.gone[peer] = now
        return self.to(peer)
