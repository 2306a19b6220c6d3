"""A lying relay for end-to-end authentication tests: our DerpServer with its routing table
rigged so that one client is passed off as another key.

    with RogueRelay() as rogue:
        rogue.pass_off(impostor_key, as_key=victim_key)
        ... rogue.url ...

From then on packets addressed to `victim_key` are delivered to the impostor's
connection, and everything the impostor sends arrives stamped with `victim_key` as its
source: exactly what a compromised relay (or one run by an attacker) can do, and what
no client of an honest relay can (the relay authenticates ClientInfo). Only derpnet's
end-to-end key proofs can tell.
"""

from __future__ import annotations

from derpnet.keys import PublicKey, PublicKeyLike
from derpnet.server import DerpServer


class _Restamp:
    """Wraps a destination connection: packets from the impostor get the victim's key as source."""

    __slots__ = ("inner", "rogue")

    def __init__(self, inner, rogue: RogueRelay) -> None:
        self.inner = inner
        self.rogue = rogue

    def enqueue_packet(self, src: PublicKey, data: bytes) -> None:
        if self.rogue.impostor is not None and src == self.rogue.impostor:
            src = self.rogue.victim
            self.rogue.forged += 1
        self.inner.enqueue_packet(src, data)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class RogueRelay(DerpServer):
    """An in-process relay that, once `pass_off()` is called, impersonates a key."""

    def __init__(self, **kwargs) -> None:
        super().__init__(keepalive_interval=0, **kwargs)
        self.impostor: PublicKey | None = None
        self.victim: PublicKey | None = None
        self.forged = 0       # packets restamped with the victim's key
        self.redirected = 0   # packets for the victim handed to the impostor

    def start(self) -> RogueRelay:
        super().start()
        relay = self._core.relay  # type: ignore[union-attr]
        honest_lookup = relay.lookup

        def lookup(dst: PublicKey) -> tuple[object, int]:  # runs on the relay's loop thread
            if self.victim is not None and dst == self.victim:
                dst = self.impostor
                self.redirected += 1
            ep, n = honest_lookup(dst)
            return (_Restamp(ep, self) if ep is not None else None), n

        relay.lookup = lookup  # the protocol objects call relay.lookup for every SendPacket
        return self

    def pass_off(self, impostor: PublicKeyLike, as_key: PublicKeyLike) -> None:
        """Deliver `as_key`'s packets to `impostor`, and stamp the impostor's packets as `as_key`'s."""
        self.impostor = PublicKey.coerce(impostor)
        self.victim = PublicKey.coerce(as_key)
