"""The outgoing side of one registered relay client: batched writes from its `Outbox`.

Layer: relay server, on the event loop. A flush is scheduled once per loop turn
(`RelayServer.flush_soon`: one loop callback flushes every sender that has something) and
writes everything queued as few `transport.write`s of up to 128 KiB;
while the transport is paused (flow control) nothing is drained and the queues drop
their oldest packets. Keep-alives are due every `keepalive_interval` (+ up to 1/12
jitter). The relay's counters are kept here.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

from .. import frames as F
from ..keys import PublicKey
from .outbox import Outbox, TokenBucket
from .relay import looks_like_disco

if TYPE_CHECKING:  # pragma: no cover
    from .conn import ClientProtocol

__all__ = ["Sender"]


class Sender:
    """Queues and writes what one client of the relay is sent (see the module docstring)."""

    __slots__ = ("conn", "relay", "loop", "outbox", "not_here", "flush_pending", "_ka_timer", "_ka_period")

    def __init__(self, conn: ClientProtocol) -> None:
        opts = conn.options
        self.conn = conn
        self.relay = conn.relay
        self.loop = conn.loop
        self.outbox = Outbox(opts.queue_depth)
        self.not_here = TokenBucket(opts.not_here_rate, opts.not_here_burst, self.loop.time())
        self.flush_pending = False
        self._ka_timer: asyncio.TimerHandle | None = None
        self._ka_period = 0.0
        interval = opts.keepalive_interval
        if interval and interval > 0:
            self._ka_period = interval + random.uniform(0, interval / 12)  # 60 s + [0, 5 s)
            self._ka_timer = self.loop.call_later(self._ka_period, self._keepalive_tick)

    def stop(self) -> None:
        """The client left: stop the timer, stop watching senders, count what is dropped."""
        if self._ka_timer is not None:
            self._ka_timer.cancel()
            self._ka_timer = None
        relay = self.relay
        for src in self.outbox.seen:
            relay.unwatch(src, self.conn.endpoint)
        dropped = self.outbox.clear()
        if dropped:
            relay.drop("gone_disconnected", dropped)

    # ------------------------------------------------------------ queueing

    def packet(self, src: PublicKey, data: bytes) -> None:
        """Queue a RecvPacket; never blocks, drops the oldest when full."""
        outbox = self.outbox
        disco = looks_like_disco(data)
        if not disco and len(outbox.pkts) < outbox.depth:  # the hot path: room in the queue
            outbox.pkts.append((src, data))
            if not self.flush_pending:
                self.schedule_flush()
            return
        if outbox.is_full(disco) and not self.conn.paused:
            # One read from a fast sender can carry thousands of packets for us before the
            # loop gets to our flush. derper's send goroutine would be draining the queue
            # meanwhile, so do the same now: move the queue into the pending batch (written
            # once it is big enough) unless the transport is full. Only a client that really
            # is not keeping up loses packets.
            self._stage_packets()
            if outbox.batch_full:
                self._write_batch()
        if outbox.add_packet(src, data, disco):
            self.relay.drop("queue_head")
        self.schedule_flush()

    def peer_gone(self, key: PublicKey, reason: int) -> None:
        """Queue PeerGone(key, reason) as a control frame (bounded)."""
        if self.conn.draining:  # a restart: the peers leaving now are coming back (restart.py)
            return
        if reason == F.PeerGoneReason.DISCONNECTED:
            # Tracked again if the key comes back and sends to us (derper would stay silent).
            self.outbox.seen.discard(key)
        if self.outbox.add_control(F.encode_peer_gone(key, reason)):
            if reason == F.PeerGoneReason.NOT_HERE:
                self.relay.peer_gone_not_here += 1
            else:
                self.relay.peer_gone_disconnected += 1
            self.schedule_flush()

    def maybe_not_here(self, dst: PublicKey) -> None:
        """PeerGone(NotHere) for a packet to an unknown key, paced by the token bucket (derper's
        1/s, burst 3). derper sends it for disco packets only; we send it for any packet, so a
        QUIC dial to a key nobody holds fails in one round trip instead of at its timeout.
        Clients that do not know the frame ignore it (the Go derpnet does)."""
        if self.not_here.take(self.loop.time()):
            self.peer_gone(dst, F.PeerGoneReason.NOT_HERE)

    def pong(self, data: bytes) -> None:
        if self.outbox.add_pong(data):
            self.schedule_flush()

    # ------------------------------------------------------------ writing

    def _keepalive_tick(self) -> None:
        self.outbox.keepalive_due = True
        self.schedule_flush()
        self._ka_timer = self.loop.call_later(self._ka_period, self._keepalive_tick)

    def schedule_flush(self) -> None:
        """Flush in this loop turn's batch of flushes (one loop callback for every sender)."""
        if not self.flush_pending and not self.conn.closed:
            self.flush_pending = True
            self.conn.server.flush_soon(self)

    def flush(self) -> None:
        """Write everything queued, in batches, until the outbox is empty or the transport is full."""
        self.flush_pending = False
        conn, relay, outbox = self.conn, self.relay, self.outbox
        while not conn.paused and not conn.closed and outbox.pending:
            self._stage_packets()
            if outbox.control_pending:
                pong, keepalive = outbox.stage_control()
                relay.pongs_sent += pong
                relay.keepalives_sent += keepalive
            if not self._write_batch():
                return

    def _stage_packets(self) -> None:
        for src in self.outbox.stage_packets(self._watch):
            # The sender left while its packet waited here: written behind the packets.
            self.peer_gone(src, F.PeerGoneReason.DISCONNECTED)

    def _watch(self, src: PublicKey) -> bool:
        return self.relay.watch(src, self.conn.endpoint)

    def _write_batch(self) -> bool:
        """Hand the staged batch to the transport as one write (which may pause us); False if empty."""
        batch = self.outbox.take_parts()
        if batch is None:
            return False
        parts, packets, payload = batch
        relay, transport = self.relay, self.conn.transport
        if transport is None or transport.is_closing():  # lost; connection_lost() is on its way
            relay.drop("gone_disconnected", packets)
        else:
            relay.packets_forwarded += packets
            relay.bytes_forwarded += payload
            self.conn.send_parts(parts)  # may call pause_writing() right here
        return True
