"""The relay's STUN responder: answers STUN Binding requests on UDP (default port 3478) with the
address each came from, as derper does, so that nodes learn their public address.

Relay server layer; every byte is made and parsed by `derpnet.stun`.

It is an asyncio DatagramProtocol on the relay's own event loop, not a thread of its own:
an answer costs a few microseconds (one parse, one `sendto`); asyncio reads one datagram
per readiness event, so a flood of requests interleaves with DERP forwarding instead of
starving it; and `RelayServer.stats()` reads the counters on the same thread without locks.
A thread would contend with the loop for the GIL anyway.

Bounds: only Binding requests are answered, everything else is dropped and counted by
reason; a datagram longer than `MAX_REQUEST_SIZE` is dropped unparsed; while the socket's
send buffer is full (`pause_writing`) requests are dropped rather than their answers
queued, so memory stays bounded. An answer (32 bytes, 44 for IPv6) is at most about twice
the smallest request (20 bytes): the reflection any STUN server offers a spoofed source.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections import Counter
from typing import Any

from .. import stun
from ..udpaddr import host_port
from . import loops

__all__ = ["StunServer", "DEFAULT_PORT", "MAX_REQUEST_SIZE", "DROP_REASONS"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 3478
MAX_REQUEST_SIZE = 1024  # Tailscale's request is 40 bytes; ICE's (with USERNAME, MESSAGE-INTEGRITY) ~100
DROP_REASONS = (
    "too_large",            # longer than MAX_REQUEST_SIZE
    "not_stun",             # no STUN header (garbage, other protocols)
    "not_binding_request",  # STUN, but another message, malformed, or a bad FINGERPRINT
    "bad_source",           # a source address the answer cannot carry
    "congested",            # the socket's send buffer was full
)


class StunServer(asyncio.DatagramProtocol):
    """One UDP socket answering Binding requests; `start()` it on the relay's loop, `close()` when done."""

    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self._paused = False
        self._port: int | None = None
        self.address = ""  # HOST:PORT once bound
        self.answered = 0
        self.send_errors = 0
        self.drops: Counter[str] = Counter({r: 0 for r in DROP_REASONS})

    async def start(self, host: str | None, port: int) -> None:
        """Bind UDP `host:port` (no host: every interface, dual-stack when possible). Raises OSError."""
        loop = asyncio.get_running_loop()
        if host:
            try:
                await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
            except OSError as e:
                raise loops.bind_error(e) from None
        else:
            await loop.create_datagram_endpoint(lambda: self, sock=_wildcard_socket(port))
        assert self._transport is not None
        h, p = self._transport.get_extra_info("sockname")[:2]
        self._port = p
        self.address = host_port(h, p)
        log.debug("stun: answering Binding requests on udp %s", self.address)

    @property
    def port(self) -> int:
        """The bound UDP port."""
        if self._port is None:
            raise RuntimeError("STUN responder is not started")
        return self._port

    def close(self) -> None:
        """Close the socket (idempotent); the counters stay readable."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def stats(self) -> dict[str, Any]:
        """Counters: requests answered, datagrams dropped (total and by reason), send errors."""
        return {"port": self._port, "answered": self.answered, "dropped": sum(self.drops.values()),
                "dropped_by": dict(self.drops), "send_errors": self.send_errors}

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reason = self._answer(data, addr)
        if reason is not None:
            self.drops[reason] += 1

    def _answer(self, data: bytes, addr: tuple[Any, ...]) -> str | None:
        """Answer one datagram if it is a Binding request; else the reason it is dropped."""
        if self._transport is None:  # closed
            return None
        if self._paused:
            return "congested"
        if len(data) > MAX_REQUEST_SIZE:
            return "too_large"
        if not stun.is_stun(data):
            return "not_stun"
        try:
            tx_id = stun.parse_binding_request(data)
        except stun.StunError:
            return "not_binding_request"
        try:
            answer = stun.binding_response(tx_id, addr)
        except ValueError:
            return "bad_source"
        self._transport.sendto(answer, addr)
        self.answered += 1
        return None

    def error_received(self, exc: Exception) -> None:
        self.send_errors += 1
        log.debug("stun: socket error: %s", exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False


def _wildcard_socket(port: int) -> socket.socket:
    """A non-blocking UDP socket on every interface: IPv6 dual-stack, else IPv4 only."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        s = None
    if s is not None:
        try:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", port))
            s.setblocking(False)
            return s
        except OSError as e:
            s.close()
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s
