"""UDP forwarding's wire format and flow tables (sans-IO: no sockets, time is an argument).

`join --udp` receives datagrams from local clients and sends each to `serve --udp` as one
QUIC DATAGRAM frame (derpquic.datagrams) on the one connection between the two peers;
`serve` sends it on from a UDP socket of its own per flow, so that the service's answers
come back to that flow's client. A flow is one client address (host, port) at `join`;
both sides forget a flow after `idle` seconds without a datagram either way.

Wire format of a DATAGRAM frame: ``flow id (a QUIC variable-length integer, RFC 9000
16) ‖ payload``. The flow id is chosen by `join` (0, 1, 2, ... per connection) and means
nothing to anyone else; `serve` keys its sockets by (connection, flow id), so flows of
different joiners never mix. No flow setup or teardown messages: a datagram of a flow
`serve` does not know (new, or forgotten after idling) simply opens it again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["encode", "decode", "Flows", "ClientFlows", "MAX_FLOW_ID"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_FLOW_ID = (1 << 30) - 1  # ids fit a 4-byte varint; they wrap after that


def encode(flow: int, payload: bytes) -> bytes:
    """A DATAGRAM frame's payload for `flow`."""
    if not 0 <= flow <= MAX_FLOW_ID:
        raise ValueError(f"flow id {flow} out of range")
    if flow < 1 << 6:
        head = bytes((flow,))
    elif flow < 1 << 14:
        head = (0x4000 | flow).to_bytes(2, "big")
    else:
        head = (0x8000_0000 | flow).to_bytes(4, "big")
    return head + payload


def decode(datagram: bytes) -> tuple[int, bytes]:
    """(flow id, payload); ValueError for a datagram too short for its flow id."""
    if not datagram:
        raise ValueError("empty datagram")
    size = 1 << (datagram[0] >> 6)
    if len(datagram) < size:
        raise ValueError("datagram shorter than its flow id")
    flow = int.from_bytes(datagram[:size], "big") & ((1 << (8 * size - 2)) - 1)
    return flow, datagram[size:]


class Flows(Generic[K, V]):
    """Flows by key with idle expiry and a bound on their number (the least recently used
    goes first)."""

    def __init__(self, idle: float, limit: int) -> None:
        self.idle = idle
        self.limit = limit
        self._flows: OrderedDict[K, tuple[V, float]] = OrderedDict()  # oldest use first

    def get(self, key: K, now: float) -> V | None:
        """The flow's value, and it counts as used now."""
        item = self._flows.get(key)
        if item is None:
            return None
        self._flows[key] = (item[0], now)
        self._flows.move_to_end(key)
        return item[0]

    def add(self, key: K, value: V, now: float) -> list[tuple[K, V]]:
        """A new flow; returns the flows evicted to stay within `limit`."""
        self._flows[key] = (value, now)
        self._flows.move_to_end(key)
        evicted = []
        while len(self._flows) > self.limit:
            k, (v, _) = self._flows.popitem(last=False)
            evicted.append((k, v))
        return evicted

    def expire(self, now: float) -> list[tuple[K, V]]:
        """Remove and return the flows idle for `idle` seconds or more."""
        gone = []
        while self._flows:
            k, (v, used) = next(iter(self._flows.items()))
            if now - used < self.idle:
                break
            del self._flows[k]
            gone.append((k, v))
        return gone

    def remove(self, key: K) -> V | None:
        item = self._flows.pop(key, None)
        return None if item is None else item[0]

    def items(self) -> list[tuple[K, V]]:
        return [(k, v) for k, (v, _) in self._flows.items()]

    def __len__(self) -> int:
        return len(self._flows)


class ClientFlows(Generic[K]):
    """join's flows: client address <-> flow id, both ways, with idle expiry."""

    def __init__(self, idle: float, limit: int) -> None:
        self._by_addr: Flows[K, int] = Flows(idle, limit)
        self._by_id: dict[int, K] = {}
        self._next = 0

    def flow_for(self, addr: K, now: float) -> tuple[int, bool]:
        """(flow id, whether it is new) for a datagram from `addr`."""
        flow = self._by_addr.get(addr, now)
        if flow is not None:
            return flow, False
        flow = self._next
        self._next = 0 if flow == MAX_FLOW_ID else flow + 1
        for _, old in self._by_addr.add(addr, flow, now):
            self._by_id.pop(old, None)
        self._by_id[flow] = addr
        return flow, True

    def addr_for(self, flow: int, now: float) -> K | None:
        """The client of `flow` (an answer for it came back), if it is still known."""
        addr = self._by_id.get(flow)
        if addr is not None:
            self._by_addr.get(addr, now)
        return addr

    def expire(self, now: float) -> list[int]:
        gone = [flow for _, flow in self._by_addr.expire(now)]
        for flow in gone:
            self._by_id.pop(flow, None)
        return gone

    def __len__(self) -> int:
        return len(self._by_addr)
