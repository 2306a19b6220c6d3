"""`RelayRoutes`: which of several relays reaches each peer (sans-IO: time is an argument).

A PacketConn on several relays (derpnet.relayset) is reachable on all of them, but a
relay only forwards to peers connected to it, and drops packets to others silently
(derper answers PeerGone(NotHere) only for disco packets). So the route to a peer is
learnt from the peer itself:

* a peer is sent to through the relay it was last heard on, while our link to that
  relay is up;
* a peer not heard from yet, or whose relay's link is down, or that the relay said left
  (PeerGone), is sent to through every relay whose link is up, until it is heard from
  again (a datagram may then arrive more than once, as UDP allows);
* routes of peers silent for `FORGET_AFTER` seconds are forgotten;
* routes are sticky: a peer heard on another relay too (it sent through all of its
  relays) keeps its route while the route's relay carried something from it within
  `STICKY` seconds, so that one flow does not flap between relays and reorder itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .keys import PublicKey

__all__ = ["RelayRoutes", "Route", "STICKY"]

#: A route is kept while its relay carried a packet from the peer this recently (seconds).
STICKY = 1.0
#: Routes of peers silent this long are forgotten (bounded memory with many passing peers);
#: such a peer is sent to through every relay again until it is heard from.
FORGET_AFTER = 600.0


@dataclass
class Route:
    """The relay (index) a peer was last heard on, and when."""

    relay: int
    heard_at: float


class RelayRoutes:
    """The route to each peer over `count` relays (indices 0..count-1, in the order given)."""

    def __init__(self, count: int, sticky: float = STICKY, forget_after: float = FORGET_AFTER) -> None:
        if count < 1:
            raise ValueError("at least one relay")
        self.count = count
        self.sticky = sticky
        self.forget_after = forget_after
        self._routes: dict[PublicKey, Route] = {}
        self._absent: dict[PublicKey, set[int]] = {}  # relays that said the peer is not there, since heard
        self._swept_at: float | None = None

    def heard(self, peer: PublicKey, relay: int, now: float) -> bool:
        """A packet from `peer` arrived through `relay`; True if its route changed."""
        if self._absent:
            self._absent.pop(peer, None)
        route = self._routes.get(peer)
        if route is None:
            self._sweep(now)
            self._routes[peer] = Route(relay, now)
            return True
        if route.relay == relay:
            route.heard_at = now
            return False
        if now - route.heard_at <= self.sticky:
            return False
        route.relay, route.heard_at = relay, now
        return True

    def _sweep(self, now: float) -> None:
        """Forget the routes of long-silent peers (at most once per `forget_after`)."""
        if self._swept_at is not None and now - self._swept_at < self.forget_after:
            return
        self._swept_at = now
        for peer in [p for p, r in self._routes.items() if now - r.heard_at >= self.forget_after]:
            del self._routes[peer]

    def via(self, peer: PublicKey) -> int | None:
        """The relay `peer` was last heard on, if any."""
        route = self._routes.get(peer)
        return None if route is None else route.relay

    def targets(self, peer: PublicKey, up: Sequence[bool]) -> list[int]:
        """The relays to send a packet for `peer` through: its route while that link is up,
        else every relay whose link is up (none: the packet is dropped)."""
        route = self._routes.get(peer)
        if route is not None and up[route.relay]:
            return [route.relay]
        return [i for i, ok in enumerate(up) if ok]

    def peer_left(self, peer: PublicKey, relay: int, up: Sequence[bool]) -> bool:
        """`relay` said `peer` is not connected to it (PeerGone): forget that route. True when
        every relay whose link is up has said so since the peer was last heard: it is on none
        of them (then the owner may fail dials to it at once)."""
        route = self._routes.get(peer)
        if route is not None and route.relay == relay:
            del self._routes[peer]
        absent = self._absent.setdefault(peer, set())
        absent.add(relay)
        if len(self._absent) > 4096:  # bounded: the oldest entries go first
            del self._absent[next(iter(self._absent))]
        return all(i in absent for i, ok in enumerate(up) if ok)

    def link_down(self, relay: int) -> list[PublicKey]:
        """Our link to `relay` went down: forget every route through it; returns their peers."""
        gone = [peer for peer, route in self._routes.items() if route.relay == relay]
        for peer in gone:
            del self._routes[peer]
        return gone

    def routes(self) -> dict[PublicKey, int]:
        """Every known route: peer -> relay index."""
        return {peer: route.relay for peer, route in self._routes.items()}
