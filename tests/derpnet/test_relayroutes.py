"""RelayRoutes: which relay of several reaches each peer (pure: explicit time)."""

from __future__ import annotations

import pytest

from derpnet.keys import PrivateKey
from derpnet.relayroutes import STICKY, RelayRoutes

P = PrivateKey.generate().public_key
Q = PrivateKey.generate().public_key


def test_an_unknown_peer_goes_through_every_relay_that_is_up():
    r = RelayRoutes(3)
    assert r.targets(P, [True, True, True]) == [0, 1, 2]
    assert r.targets(P, [False, True, True]) == [1, 2]
    assert r.targets(P, [False, False, False]) == []


def test_a_peer_heard_on_a_relay_is_sent_to_through_it_only():
    r = RelayRoutes(2)
    assert r.heard(P, 1, now=10.0)
    assert r.via(P) == 1
    assert r.targets(P, [True, True]) == [1]
    assert r.targets(Q, [True, True]) == [0, 1]  # per peer


def test_its_relay_down_means_every_relay_again_until_heard():
    r = RelayRoutes(2)
    r.heard(P, 0, now=1.0)
    assert r.targets(P, [False, True]) == [1]  # link down, route not yet forgotten: the others
    assert r.link_down(0) == [P]
    assert r.via(P) is None
    assert r.targets(P, [True, True]) == [0, 1]
    assert r.heard(P, 1, now=2.0)
    assert r.targets(P, [True, True]) == [1]


def test_routes_are_sticky_while_their_relay_carries_the_peer():
    r = RelayRoutes(2)
    r.heard(P, 0, now=100.0)
    assert not r.heard(P, 1, now=100.0 + STICKY / 2)  # the same packet through both relays
    assert r.via(P) == 0
    assert not r.heard(P, 0, now=100.0 + STICKY)  # still carried by relay 0
    assert not r.heard(P, 1, now=100.0 + 1.5 * STICKY)
    assert r.via(P) == 0
    assert r.heard(P, 1, now=100.0 + 2.5 * STICKY)  # relay 0 silent for longer than STICKY
    assert r.via(P) == 1


def test_peer_gone_forgets_only_the_route_through_that_relay():
    r = RelayRoutes(2)
    r.heard(P, 0, now=1.0)
    assert not r.peer_left(P, 1, [True, True])
    assert r.via(P) == 0
    r.peer_left(P, 0, [True, True])
    assert r.via(P) is None


def test_a_peer_is_gone_once_every_connected_relay_said_so_since_it_was_heard():
    r = RelayRoutes(3)
    assert not r.peer_left(Q, 0, [True, True, False])
    assert r.peer_left(Q, 1, [True, True, False])  # relay 2 is down: 0 and 1 are all there is
    r.heard(Q, 1, now=5.0)  # it is back: what the relays said before no longer counts
    assert not r.peer_left(Q, 0, [True, True, False])
    assert r.peer_left(P, 2, [False, False, True])


def test_link_down_forgets_the_routes_of_that_relay_only():
    r = RelayRoutes(2)
    r.heard(P, 0, now=1.0)
    r.heard(Q, 1, now=1.0)
    assert r.link_down(0) == [P]
    assert r.routes() == {Q: 1}


def test_at_least_one_relay():
    with pytest.raises(ValueError):
        RelayRoutes(0)


def test_routes_of_long_silent_peers_are_forgotten():
    r = RelayRoutes(2, forget_after=100.0)
    r.heard(P, 0, now=0.0)  # the first sweep happens here
    r.heard(Q, 1, now=50.0)
    r.heard(PrivateKey.generate().public_key, 0, now=99.0)  # a new peer: too soon for another sweep
    assert r.via(P) == 0
    r.heard(PrivateKey.generate().public_key, 0, now=120.0)  # a new peer: P silent for 120 s goes
    assert r.via(P) is None and r.via(Q) == 1
