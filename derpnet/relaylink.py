"""`RelayLink`: one DERP relay connection that re-establishes itself, for PacketConn.

Layer: relay link (the job of Tailscale's derphttp.Client plus magicsock's backoff).
It owns the current `DerpClient`, replaces it when it dies (trying the other members of
the relay's mesh in turn when given `alternates`), and reports `LinkUp` /
`LinkDown` and the relay's frames to its owner. Sending while the link is down raises
`ConnectionError`: the owner decides what that means (PacketConn drops, like UDP).

Reconnect: ``min(n² × 10 ms × uniform[0.5, 1.5), 5 s)`` (n = consecutive failures; a link
that lived at least a second resets n; the cap holds after the jitter); a relay's
``Restarting`` frame replaces the first wait by its ``reconnect_in``, capped at 5 s (it is
advice, as for Tailscale's client, which keeps its own backoff) and honoured once, only if
the link dies within 10 s of the frame (a stale one is forgotten); while its ``try_for``
lasts (at most 10 s), failed reconnects are retried at least every 250 ms. Threads: none
of its own; after a link dies, that link's reader thread runs the reconnect loop and exits
once the new link (with its own reader) is up. `close()` joins them all. Logging: one
warning when the link goes, a reminder a minute at most while the relay stays unreachable,
one line when it is back (`OutageReport`).
"""

from __future__ import annotations

import errno
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import frames as F
from .client import DerpClient, RelayAddress
from .events import Event
from .keys import PrivateKey, PublicKey
from .outage import OutageReport

__all__ = ["RelayLink", "LinkUp", "LinkDown", "backoff_delay", "restart_delay", "retry_delay",
           "MAX_RECONNECT_DELAY", "RESTART_HINT_TTL", "RESTART_RETRY_STEP"]

log = logging.getLogger(__name__)

_RESET_AFTER = 1.0  # a link that lived this long resets the backoff
#: The longest wait before a reconnect: Tailscale's backoff cap, also the most a relay's
#: Restarting frame may make us wait (it could say 49.7 days: 2³² ms).
MAX_RECONNECT_DELAY = 5.0
#: A Restarting frame counts only for a link that dies within this time after it.
RESTART_HINT_TTL = 10.0
#: While a Restarting frame's try-for lasts, a failed reconnect is retried at least this often.
RESTART_RETRY_STEP = 0.25


@dataclass(frozen=True)
class LinkUp(Event):
    """on_event: a relay link is up (generation 1 = the first connect)."""

    server_key: PublicKey
    generation: int


@dataclass(frozen=True)
class LinkDown(Event):
    """on_event: the relay link ended; a reconnect follows unless the conn is closed."""

    error: BaseException | None


def backoff_delay(failures: int, rng: Callable[[], float] = random.random) -> float:
    """Tailscale's reconnect delay, n² × 10 ms × uniform[0.5, 1.5), never above the 5 s cap
    (Tailscale applies the jitter after its cap, up to 7.5 s; ours is the documented cap)."""
    return min(failures * failures * 0.010 * (0.5 + rng()), MAX_RECONNECT_DELAY)


def restart_delay(hint: F.Restarting | None, hint_at: float, died_at: float, failures: int,
                  rng: Callable[[], float] = random.random) -> float:
    """The wait before reconnecting after a link died at `died_at`: the relay's Restarting
    advice (received at `hint_at`) if it is fresh, capped; else the backoff."""
    if hint is not None and 0 <= died_at - hint_at <= RESTART_HINT_TTL:
        return min(max(hint.reconnect_in, 0.0), MAX_RECONNECT_DELAY)
    return backoff_delay(failures, rng)


def retry_delay(failures: int, now: float, try_until: float, rng: Callable[[], float] = random.random) -> float:
    """The wait after a failed reconnect: the backoff, but at most RESTART_RETRY_STEP while a
    Restarting frame's try-for lasts (until `try_until`): the relay said it is coming back."""
    delay = backoff_delay(failures, rng)
    return min(delay, RESTART_RETRY_STEP) if now < try_until else delay


class RelayLink:
    """The relay connection of a PacketConn: connects at once (raising on failure), then
    keeps itself up. `on_packet(src, data)` and `on_event(event)` run in a reader thread.
    With `connect=False` it starts down and connects in the background (a thread named
    `derpnet-relay-<host>`), with the reconnect backoff: one relay of several that did not
    answer at start."""

    def __init__(self, relay: RelayAddress, key: PrivateKey, *, client_opts: dict[str, Any],
                 on_packet: Callable[[PublicKey, bytes], None], on_event: Callable[[object], None],
                 reconnect: bool = True, alternates: Sequence[RelayAddress] = (),
                 connect: bool = True) -> None:
        self.relay = relay
        #: Where a reconnect may go: `relay` first, then other members of its mesh (region),
        #: each tried in turn after a failed attempt (derphttp tries a region's nodes in order).
        self.relays = [relay, *(a for a in alternates if a != relay)]
        self._tries = 0  # connect attempts since the last link was up
        self._key = key
        self._client_opts = client_opts
        self._on_packet = on_packet
        self._on_event = on_event
        self.health = ""  # the relay's last Health problem text ("" = healthy)
        self._reconnect = reconnect
        self.cond = threading.Condition(threading.Lock())
        self._link: DerpClient | None = None
        self._pending: DerpClient | None = None  # a reconnect attempt in progress
        self._old_readers: list[threading.Thread] = []
        self._closing = threading.Event()
        self.closed = False
        self.dead: BaseException | None = None   # reconnect=False and the link died
        self.generation = 0
        self.reconnects = 0
        self._failures = 0
        self._restart_hint: tuple[F.Restarting, float] | None = None  # (frame, when), until used
        self.outage = OutageReport()
        if not connect:  # (the owner said it did not answer: the outage starts now)
            self._failures = 1
            self.outage.lost(time.monotonic())
            retry = threading.Thread(target=self._reconnect_loop, args=(0.0,), name=f"derpnet-relay-{relay.host}",
                                     daemon=True)
            self._old_readers.append(retry)
            retry.start()
            return
        client = self._new_client()
        client.connect(start=False)  # raises: no silent retry at start
        self._install(client)

    # ------------------------------------------------------------ use

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def client(self) -> DerpClient | None:
        """The current DerpClient (None while reconnecting)."""
        return self._link

    @property
    def server_key(self) -> PublicKey | None:
        link = self._link
        return link.server_key if link is not None else None

    def send(self, dst: PublicKey, *parts: bytes, lock_timeout: float | None = None) -> None:
        """One packet to `dst`; ConnectionError while down, TimeoutError waiting for writers."""
        link = self._link
        if link is None:
            raise ConnectionResetError(errno.ENOTCONN, "relay link is down")
        link.send_packet(dst, *parts, lock_timeout=lock_timeout)

    def send_many(self, items: Sequence[tuple[PublicKey, Sequence[bytes]]],
                  lock_timeout: float | None = None) -> None:
        link = self._link
        if link is None:
            raise ConnectionResetError(errno.ENOTCONN, "relay link is down")
        link.send_packets(items, lock_timeout=lock_timeout)

    def wait_connected(self, timeout: float | None = None, *, min_generation: int = 1) -> bool:
        """Wait until a link of generation ≥ `min_generation` is up; False on timeout or close."""
        end = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not (self._link is not None and self.generation >= min_generation):
                if self.closed or self.dead is not None:
                    return False
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def close(self) -> None:
        """Close (idempotent): the current link, a reconnect in progress, their threads."""
        with self.cond:
            if self.closed:
                return
            self.closed = True
            link, pending = self._link, self._pending
            self._link = None
            self.cond.notify_all()
        self._closing.set()
        for c in (pending, link):
            if c is not None:
                c.close()
        with self.cond:
            threads = list(self._old_readers)
        for t in threads:
            if t is not threading.current_thread():
                t.join()

    # ------------------------------------------------------------ internals

    def _new_client(self) -> DerpClient:
        if self._tries and len(self.relays) > 1:  # the last attempt failed: the next member
            self.relay = self.relays[(self.relays.index(self.relay) + 1) % len(self.relays)]
            log.info("trying relay %s (another member of the mesh)", self.relay.url)
        self._tries += 1
        return DerpClient(self.relay, self._key, on_packet=self._on_packet, on_event=self._on_frame,
                          on_close=self._on_link_closed, **self._client_opts)

    def _on_frame(self, ev: object) -> None:
        if isinstance(ev, F.Health):
            if ev.problem:
                log.warning("relay %s health problem: %s", self.relay.url, ev.problem)
            elif self.health:
                log.info("relay %s healthy again", self.relay.url)
            self.health = ev.problem
        elif isinstance(ev, F.Restarting):
            self._restart_hint = (ev, time.monotonic())
            log.info("relay %s is restarting: reconnect in %.3gs (at most %gs), try for %.3gs", self.relay.url,
                     ev.reconnect_in, MAX_RECONNECT_DELAY, ev.try_for)
        self._on_event(ev)

    def _install(self, client: DerpClient) -> bool:
        """Make a connected client the current link and start its reader; False if closed."""
        with self.cond:
            ok = not self.closed
            if ok:
                self._link = client
                self._tries = 0
                self.generation += 1
                gen = self.generation
                self.cond.notify_all()
        if not ok or not client.start():  # close() came first
            client.close()
            return False
        assert client.server_key is not None
        self._on_event(LinkUp(client.server_key, gen))
        return True

    def _on_link_closed(self, client: DerpClient, err: BaseException | None) -> None:
        # Runs in the dead link's reader thread, which then runs the reconnect loop.
        with self.cond:
            if client is not self._link:
                return
            self._link = None
            closed = self.closed
            if not closed and not self._reconnect:
                self.dead = err or ConnectionResetError(errno.ECONNRESET, "relay link closed")
            self.cond.notify_all()
            if not closed:  # close() joins it: it runs the reconnect loop, or just ends
                self._old_readers = [t for t in self._old_readers if t.is_alive()]
                self._old_readers.append(threading.current_thread())
        self._on_event(LinkDown(err))
        if closed or not self._reconnect:
            if not closed:
                log.warning("relay link to %s lost: %s (reconnect disabled)", self.relay.url, err)
            return
        if client.uptime >= _RESET_AFTER:
            self._failures = 0
        self._failures += 1
        hint, self._restart_hint = self._restart_hint, None  # used once, never remembered
        now = time.monotonic()
        delay = restart_delay(hint[0] if hint else None, hint[1] if hint else 0.0, now, self._failures)
        try_until = now + delay + min(hint[0].try_for, RESTART_HINT_TTL) if hint else 0.0
        if self.outage.lost(now):
            log.warning("relay link to %s lost: %s; reconnecting (retries every %g s at most)", self.relay.url,
                        self._why(err), MAX_RECONNECT_DELAY)
        log.debug("reconnecting to relay %s in %.3fs", self.relay.url, delay)
        self._reconnect_loop(delay, try_until)

    def _why(self, err: BaseException | None) -> str:
        """An error's text for a line that already names the relay (the client's errors do too)."""
        if err is None:
            return "closed"
        text = (err.strerror if isinstance(err, OSError) and err.strerror else str(err)) or type(err).__name__
        url = self.relay.url
        return str(text).replace(f"relay {url}: ", "").replace(f"relay {url} ", "the relay ")

    def _reconnect_loop(self, delay: float, try_until: float = 0.0) -> None:
        while True:
            if self._closing.wait(delay):
                return
            client = self._new_client()
            with self.cond:
                if self.closed:
                    return
                self._pending = client
            try:
                client.connect(start=False)
            except Exception as e:
                with self.cond:
                    self._pending = None
                    if self.closed:
                        return
                self._failures += 1
                delay = retry_delay(self._failures, time.monotonic(), try_until)
                log.debug("reconnecting to relay %s failed: %s; next try in %.3fs", self.relay.url, e, delay)
                if self.outage.failed(time.monotonic()):
                    assert self.outage.down_since is not None
                    log.warning("relay %s still unreachable after %.0f s (%d tries; last: %s); retrying every "
                                "%g s at most", self.relay.url, time.monotonic() - self.outage.down_since,
                                self.outage.attempts, self._why(e), MAX_RECONNECT_DELAY)
                continue
            with self.cond:
                self._pending = None
                self.reconnects += 1
            if self._install(client):
                took = self.outage.restored(time.monotonic())
                log.info("reconnected to relay %s%s", self.relay.url,
                         f" after {took:.1f} s" if took is not None else "")
            return
