"""`RelaySet`: one PacketConn on several relays at once, with one `RelayLink` per relay.

The PacketConn is reachable through every relay; each datagram to a peer goes through the
relay that peer was last heard on, or through every connected relay while that is not
known (see derpnet.relayroutes for the rules, `RelayRoutes` for the state machine). When a
relay fails, its link reconnects by itself while the others carry the traffic.

It offers what PacketConn uses of a `RelayLink` (send, send_many, connected, dead,
generation, wait_connected, ...), so the PacketConn above does not care how many relays
it has. Events: `LinkUp`/`LinkDown` of every link are passed on as they come; a relay's
`PeerGone` forgets that route, and is passed on only once every connected relay has said
the peer is not there (it may well be on another relay).

Start: every relay is dialled at once; the set is up when one link is, and raises the
first relay's error when none answers. Links that did not answer keep trying in the
background (`RelayLink(connect=False)`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import frames as F
from .client import RelayAddress, parse_relay
from .keys import PrivateKey, PublicKey, PublicKeyLike
from .relaylink import LinkDown, LinkUp, RelayLink
from .relayroutes import RelayRoutes

__all__ = ["RelaySet", "RelayViews", "parse_relays", "RelaySpec", "open_link", "first_link", "relay_via"]

#: One relay (a host name, URL or RelayAddress), several as a list, or one string with commas.
RelaySpec = str | RelayAddress | Sequence[str | RelayAddress]

log = logging.getLogger(__name__)


def parse_relays(spec: RelaySpec) -> list[RelayAddress]:
    """The relays of `spec`, in order, each once; ValueError if there are none."""
    items: list[str | RelayAddress] = []
    for item in ([spec] if isinstance(spec, (str, RelayAddress)) else list(spec)):
        if isinstance(item, str):
            items.extend(part.strip() for part in item.split(",") if part.strip())
        else:
            items.append(item)
    relays = list(dict.fromkeys(parse_relay(item) for item in items))
    if not relays:
        raise ValueError("no relay given")
    return relays


class RelaySet:
    """Several RelayLinks as one (the interface PacketConn uses of a RelayLink)."""

    def __init__(self, relays: Sequence[RelayAddress], key: PrivateKey, *, client_opts: dict[str, Any],
                 on_packet: Callable[[PublicKey, bytes], None], on_event: Callable[[object], None],
                 reconnect: bool = True) -> None:
        self.relays = list(relays)
        self.relay = self.relays[0]
        self._on_packet = on_packet
        self._on_event = on_event
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a link went up or down, or close()
        self._closed = False
        self.routes = RelayRoutes(len(self.relays))
        self.links: list[RelayLink] = self._connect(key, client_opts, reconnect)

    def _connect(self, key: PrivateKey, client_opts: dict[str, Any], reconnect: bool) -> list[RelayLink]:
        slots: list[RelayLink | BaseException | None] = [None] * len(self.relays)

        def dial(i: int) -> None:
            try:
                slots[i] = RelayLink(self.relays[i], key, client_opts=client_opts, on_packet=self._packet_from(i),
                                     on_event=self._event_from(i), reconnect=reconnect)
            except Exception as e:  # noqa: BLE001 - reported below
                slots[i] = e

        threads = [threading.Thread(target=dial, args=(i,), name=f"derpnet-dial-{r.host}", daemon=True)
                   for i, r in enumerate(self.relays)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [s for s in slots if isinstance(s, BaseException)]
        if len(errors) == len(slots):
            raise errors[0]
        links = []
        for i, s in enumerate(slots):
            if isinstance(s, RelayLink):
                links.append(s)
                continue
            log.warning("relay %s did not answer (%s): trying it in the background", self.relays[i].url, s)
            links.append(RelayLink(self.relays[i], key, client_opts=client_opts, on_packet=self._packet_from(i),
                                   on_event=self._event_from(i), reconnect=reconnect, connect=False))
        return links

    # ------------------------------------------------------------ callbacks (reader threads)

    def _packet_from(self, i: int) -> Callable[[PublicKey, bytes], None]:
        def on_packet(src: PublicKey, data: bytes) -> None:
            with self._lock:
                changed = self.routes.heard(src, i, time.monotonic())
            if changed:
                log.info("peer %s: through relay %s", src.b64(), self.relays[i].url)
            self._on_packet(src, data)
        return on_packet

    def _event_from(self, i: int) -> Callable[[object], None]:
        def on_event(ev: object) -> None:
            if isinstance(ev, F.PeerGone):
                up = [link.connected for link in self._links_so_far()] or [True]
                with self._lock:
                    nowhere = self.routes.peer_left(ev.key, i, up)
                if not nowhere:
                    log.debug("relay %s: peer %s gone there; the other relays may reach it", self.relays[i].url,
                              ev.key.b64())
                    return
            elif isinstance(ev, LinkDown):
                with self._lock:
                    moved = self.routes.link_down(i)
                    self._changed.notify_all()
                if moved:
                    log.info("relay %s lost: %d peer(s) move to the other relays", self.relays[i].url, len(moved))
            elif isinstance(ev, LinkUp):
                with self._lock:
                    self._changed.notify_all()
            self._on_event(ev)
        return on_event

    def _links_so_far(self) -> list[RelayLink]:
        return list(getattr(self, "links", ()))  # (events can come before the constructor is done)

    # ------------------------------------------------------------ RelayLink's interface

    def _up(self) -> list[bool]:
        return [link.connected for link in self.links]

    def send(self, dst: PublicKey, *parts: bytes, lock_timeout: float | None = None) -> None:
        """One packet to `dst` through its relay (or every connected one); ConnectionError if none is up."""
        with self._lock:
            targets = self.routes.targets(dst, self._up())
        if not targets:
            raise ConnectionResetError("no relay link is up")
        sent = False
        for i in targets:
            try:
                self.links[i].send(dst, *parts, lock_timeout=lock_timeout)
                sent = True
            except ConnectionError:
                continue
        if not sent:
            raise ConnectionResetError("no relay link is up")

    def send_many(self, items: Sequence[tuple[PublicKey, Sequence[bytes]]],
                  lock_timeout: float | None = None) -> None:
        up = self._up()
        batches: dict[int, list[tuple[PublicKey, Sequence[bytes]]]] = {}
        with self._lock:
            for dst, parts in items:
                for i in self.routes.targets(dst, up):
                    batches.setdefault(i, []).append((dst, parts))
        sent = False
        for i, batch in batches.items():
            try:
                self.links[i].send_many(batch, lock_timeout=lock_timeout)
                sent = True
            except ConnectionError:
                continue
        if not sent:
            raise ConnectionResetError("no relay link is up")

    @property
    def connected(self) -> bool:
        return any(link.connected for link in self.links)

    @property
    def dead(self) -> BaseException | None:
        """reconnect=False: the first link's error once every link is dead."""
        deads = [link.dead for link in self.links]
        return deads[0] if all(d is not None for d in deads) else None

    @property
    def generation(self) -> int:
        """Successful relay connections so far, all links together."""
        return sum(link.generation for link in self.links)

    @property
    def reconnects(self) -> int:
        return sum(link.reconnects for link in self.links)

    @property
    def health(self) -> str:
        return "; ".join(f"{link.relay.url}: {link.health}" for link in self.links if link.health)

    @property
    def server_key(self) -> PublicKey | None:
        for link in self.links:
            if link.server_key is not None:
                return link.server_key
        return None

    @property
    def client(self) -> Any:
        for link in self.links:
            if link.client is not None:
                return link.client
        return None

    def wait_connected(self, timeout: float | None = None, *, min_generation: int = 1) -> bool:
        """Wait until a link is up and `generation` (all links) is ≥ `min_generation`."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not (self.connected and self.generation >= min_generation):
                if self._closed or all(link.closed or link.dead is not None for link in self.links):
                    return False
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def via(self, peer: PublicKey) -> str | None:
        """The URL of the relay `peer` was last heard on."""
        with self._lock:
            i = self.routes.via(peer)
        return None if i is None else self.relays[i].url

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._changed.notify_all()
        for link in self.links:
            link.close()


def open_link(relays: Sequence[RelayAddress], key: PrivateKey, *, alternates: Sequence[RelayAddress] = (),
              **options: Any) -> RelayLink | RelaySet:
    """A RelayLink for one relay (failing over to `alternates`, its mesh), a RelaySet for
    several (same options)."""
    if len(relays) == 1:
        return RelayLink(relays[0], key, alternates=alternates, **options)
    if alternates:
        raise ValueError("alternates are the other members of one relay's mesh: with several relays, "
                         "give them as more relays instead")
    return RelaySet(relays, key, **options)


def first_link(link: RelayLink | RelaySet) -> RelayLink:
    """The link to the (first) relay."""
    return link.links[0] if isinstance(link, RelaySet) else link


def relay_via(link: RelayLink | RelaySet, peer: PublicKey) -> str | None:
    """The URL of the relay datagrams to `peer` go through (None: every relay, not known yet)."""
    return link.via(peer) if isinstance(link, RelaySet) else link.relay.url


class RelayViews:
    """What a PacketConn tells about its relay link(s) (one RelayLink, or a RelaySet)."""

    _link: RelayLink | RelaySet

    @property
    def relay_url(self) -> str:
        return self._link.relay.url  # after a failover, another member of the relay's mesh

    def relay_for(self, peer: PublicKeyLike) -> str | None:
        """The relay datagrams to `peer` go through (of several: None until it is heard from)."""
        return relay_via(self._link, PublicKey.coerce(peer))

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def generation(self) -> int:
        """Number of successful relay connections so far (1 after listen_packet)."""
        return self._link.generation

    def wait_connected(self, timeout: float | None = None, *, min_generation: int = 1) -> bool:
        """Wait until a relay link of generation ≥ `min_generation` is up; False on timeout or close."""
        return self._link.wait_connected(timeout, min_generation=min_generation)

    @property
    def relay_link(self) -> RelayLink:
        """The (first) relay connection (reconnecting); its `client` is the current DerpClient."""
        return first_link(self._link)

    @property
    def health(self) -> str:
        """The relay's last Health problem text ("" = healthy)."""
        return self._link.health

    @property
    def server_key(self) -> PublicKey | None:
        return self._link.server_key
