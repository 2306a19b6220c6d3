"""`Carrier`: a PacketConn as the QUIC driver uses it. Any object with Go's PacketConn
methods works (read_from, write_to, set_read_deadline, local_addr); derpnet's own
PacketConn adds batches, path sizes, peer verification and events, used when present."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from derpnet.keys import PublicKey
from derpnet.paths import RELAY_PATH_MTU

__all__ = ["Carrier"]

log = logging.getLogger("derpquic")


class Carrier:
    """Datagrams out (never raising: a broken PacketConn shows up on the read side), batches
    in, and the read deadline as a monotonic time."""

    def __init__(self, pc: Any) -> None:
        self.pc = pc
        self._write_batch: Callable[[list[tuple[bytes, PublicKey]]], Any] | None = getattr(pc, "write_batch", None)
        self._read_batch: Callable[[int], Sequence[tuple[bytes, Any]]] | None = getattr(pc, "read_batch", None)
        self._note_verified: Callable[[PublicKey], None] | None = getattr(pc, "note_peer_verified", None)
        self._path_mtu: Callable[[PublicKey], int] | None = getattr(pc, "path_mtu", None)

    def read(self, most: int) -> Sequence[tuple[bytes, Any]]:
        """Up to `most` datagrams (at least one); TimeoutError at the read deadline, OSError
        when the PacketConn is closed or broken."""
        if self._read_batch is not None:
            return self._read_batch(most)
        return (self.pc.read_from(65536),)

    def send(self, data: bytes, peer: PublicKey) -> None:
        try:
            self.pc.write_to(data, peer)
        except (OSError, ValueError) as e:
            # Closed or broken PacketConn: the connection times out / is failed by the reader.
            log.debug("derpquic: write_to %s failed: %s", peer.b64(), e)

    def send_many(self, datagrams: list[bytes], peer: PublicKey) -> None:
        if len(datagrams) == 1 or self._write_batch is None:
            for data in datagrams:
                self.send(data, peer)
            return
        try:
            self._write_batch([(data, peer) for data in datagrams])
        except (OSError, ValueError) as e:
            log.debug("derpquic: write_batch to %s failed: %s", peer.b64(), e)

    def set_deadline(self, when: float | None) -> None:
        """Wake the reader at monotonic time `when` (None: never)."""
        try:
            self.pc.set_read_deadline(None if when is None else time.time() + (when - time.monotonic()))
        except (OSError, ValueError):
            pass

    def note_verified(self, peer: PublicKey) -> None:
        """Tell the PacketConn that `peer` proved its key (it may then try a direct path)."""
        if self._note_verified is None:
            return
        try:
            self._note_verified(peer)
        except Exception:  # pragma: no cover - a bug in the PacketConn
            log.exception("derpquic: note_peer_verified failed")

    def path_mtu(self, peer: PublicKey) -> int:
        return RELAY_PATH_MTU if self._path_mtu is None else int(self._path_mtu(peer))

    def listen(self, listener: Callable[[object], None]) -> None:
        if hasattr(self.pc, "add_event_listener"):
            self.pc.add_event_listener(listener)

    def unlisten(self, listener: Callable[[object], None]) -> None:
        if hasattr(self.pc, "remove_event_listener"):
            self.pc.remove_event_listener(listener)
