"""`TimerHeap`: when each connection next wants to run, earliest first (sans-IO).

The QUIC driver keeps one wanted time per connection (aioquic's loss/idle timer, our
keepalive, the key-proof deadline) and sleeps until the earliest. Wanted times change
after almost every packet, mostly to a later time, so scheduling a later time does not
touch the heap: the old, earlier entry stays and is moved when it reaches the top.
Time is an argument everywhere; the heap never reads a clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["TimerHeap"]

K = TypeVar("K", bound=Hashable)


class TimerHeap(Generic[K]):
    """At most one wanted time per key; `schedule` supersedes it (earlier or later)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        # key -> (time, seq) it wants; seq orders equal times by the order of schedule() calls
        self._want: dict[K, tuple[float, int]] = {}
        self._entry: dict[K, tuple[float, int]] = {}  # key -> its one live heap entry
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._want)

    def __contains__(self, key: object) -> bool:
        return key in self._want

    def when(self, key: K) -> float | None:
        """The time `key` wants, or None if it is not scheduled."""
        want = self._want.get(key)
        return None if want is None else want[0]

    def schedule(self, key: K, when: float | None) -> None:
        """`key` wants to run at `when` (None: never; same as `cancel`)."""
        if when is None:
            self.cancel(key)
            return
        current = self._want.get(key)
        if current is not None and current[0] == when:
            return  # unchanged
        entry = self._entry.get(key)
        want = self._want[key] = (when, next(self._seq))
        if entry is None or when < entry[0]:
            self._push(key, want)
        # else: the live entry is earlier; it is moved to `when` once it reaches the top

    def cancel(self, key: K) -> None:
        """Forget `key` (its heap entries become stale)."""
        self._want.pop(key, None)
        self._entry.pop(key, None)

    def clear(self) -> None:
        self._heap.clear()
        self._want.clear()
        self._entry.clear()

    def earliest(self) -> float | None:
        """The earliest wanted time of all keys, None if nothing is scheduled."""
        self._settle()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[K]:
        """Unschedule and return every key whose time is at or before `now`, earliest first
        (equal times in the order of the `schedule` calls that set them)."""
        due: list[K] = []
        while True:
            self._settle()
            if not self._heap or self._heap[0][0] > now:
                return due
            _, _, key = heapq.heappop(self._heap)
            del self._entry[key]
            del self._want[key]
            due.append(key)

    def _push(self, key: K, entry: tuple[float, int]) -> None:
        self._entry[key] = entry
        heapq.heappush(self._heap, (entry[0], entry[1], key))
        if len(self._heap) > 2 * len(self._entry) + 64:
            # Mostly stale entries (keys that kept moving earlier): keep the live ones.
            self._heap = [(t, s, k) for k, (t, s) in self._entry.items()]
            heapq.heapify(self._heap)

    def _settle(self) -> None:
        """Drop stale entries from the top, and move a live one that is earlier than what
        its key wants now, until the top entry is exact (or the heap is empty)."""
        while self._heap:
            t, seq, key = self._heap[0]
            if self._entry.get(key) != (t, seq):
                heapq.heappop(self._heap)
                continue
            want = self._want[key]
            if want == (t, seq):
                return
            heapq.heappop(self._heap)  # the key wants a later time now
            self._push(key, want)  # (may rebuild self._heap)
