"""Fault scenarios shared by tests/faults and bench/faults.py (plain code, no pytest).

A `Pair` is a derpquic sender (Dialer) and receiver (Listener), each on its own
PacketConn, each optionally behind its own `FaultProxy`, with their link events
recorded. `run_transfer()` streams random bytes from one to the other, SHA-256 checked
at the end, optionally applying a fault once the receiver has a given share of the data,
and measures the outage:

    outage = (first byte the receiver gets after the faulted link(s) are back up)
             - (the moment the fault was applied)

i.e. the whole interruption a user sees: detection + reconnect + QUIC's retransmission
(its probe timer backs off exponentially while the path is down). `detect` (fault to
LinkDown) and `relink` (fault to the new LinkUp) are reported next to it, and `stall`,
the longest time without progress at the receiver after the fault (the measure for
faults that change no link, such as a burst of drops).

The receiver (`Sink`) also records the most it ever had buffered (received, not yet read,
including QUIC's out-of-order reassembly buffer) and the longest PacketConn queue.

Every wait is on an event, a condition or a poll with a deadline; nothing sleeps to
synchronise.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import derpnet
import derpquic
from derpnet.packetconn import LinkDown, LinkUp
from tests.derpquic.helpers import Background
from tests.faults.proxy import FaultProxy

MiB = 1 << 20


# ---------------------------------------------------------------- relays

@contextlib.contextmanager
def relay_of(kind: str, workdir=None) -> Iterator[object]:
    """A running plain-HTTP relay that can `restart()` on the same port with the same key:
    "ours" (tests.relays.OurRelay) or "go" (Tailscale's derper, tests.interop_peers.GoDerper).
    Both have .url, .port, .restart(), .kill() and .proc (ours: Popen; go: LoggedProcess)."""
    from tests.interop_peers import GoDerper
    from tests.relays import OurRelay
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"faults-{kind}-"))
        if kind == "ours":
            relay = stack.enter_context(OurRelay(workdir=str(workdir)))
        elif kind == "go":
            relay = stack.enter_context(GoDerper(workdir))
        else:
            raise ValueError(f"unknown relay kind {kind!r}")
        yield relay


def relay_pid(relay) -> int:
    proc = relay.proc
    return proc.pid


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0])
    return out


# ---------------------------------------------------------------- observation

class LinkLog:
    """An on_event recorder for a PacketConn: LinkUp/LinkDown with their times."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ups: list[tuple[float, LinkUp]] = []
        self.downs: list[tuple[float, LinkDown]] = []

    def __call__(self, ev: object) -> None:
        if isinstance(ev, (LinkUp, LinkDown)):
            with self.cond:
                (self.ups if isinstance(ev, LinkUp) else self.downs).append((time.monotonic(), ev))
                self.cond.notify_all()

    def wait_down(self, count: int, timeout: float) -> tuple[float, LinkDown]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.downs) >= count, timeout):
                raise AssertionError(f"no LinkDown #{count} within {timeout:g}s (downs: {self.downs})")
            return self.downs[count - 1]

    def wait_up(self, generation: int, timeout: float) -> tuple[float, LinkUp]:
        with self.cond:
            if not self.cond.wait_for(lambda: any(e.generation >= generation for _, e in self.ups), timeout):
                raise AssertionError(f"no LinkUp of generation {generation} within {timeout:g}s "
                                     f"(ups: {self.ups}, downs: {self.downs})")
            return next((t, e) for t, e in self.ups if e.generation >= generation)


class Sink:
    """Reads a stream to EOF in a named thread: SHA-256, byte count, progress timeline,
    and (sampled after every recv) the largest amount the receiver had buffered."""

    def __init__(self, stream, *, chunk: int = 1 << 16, delay: float = 0.0, name: str = "faults-sink") -> None:
        self.stream = stream
        self.chunk = chunk
        self.delay = delay  # a slow reader: seconds of "work" per recv
        self.cond = threading.Condition()
        self.received = 0
        self.timeline: list[tuple[float, int]] = []
        self.max_buffered = 0  # bytes received on the stream but not yet read by us (incl. out of order)
        self.max_queued = 0  # datagrams waiting in the receiver's PacketConn
        self._bg = Background(self._run, name=name)

    def _run(self) -> tuple[int, bytes]:
        h = hashlib.sha256()
        s = self.stream
        pc = s._driver.pc
        while True:
            b = s.recv(self.chunk)
            if not b:
                return self.received, h.digest()
            h.update(b)
            now = time.monotonic()
            with s._cond:  # the driver lock: a consistent look at the buffers
                # unread in our Stream + aioquic's reassembly buffer (out-of-order data)
                buffered = len(s._rbuf) + len(s._qs.receiver._buffer)
            queued = pc.stats()["queued"]
            with self.cond:
                self.received += len(b)
                self.timeline.append((now, self.received))
                self.max_buffered = max(self.max_buffered, buffered)
                self.max_queued = max(self.max_queued, queued)
                self.cond.notify_all()
            if self.delay:
                time.sleep(self.delay)  # slowness on purpose, not synchronisation

    def wait_bytes(self, n: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.received >= n or self._bg.done, timeout):
                raise AssertionError(f"receiver stuck at {self.received} bytes (waiting for {n}) after {timeout:g}s")

    def first_progress_after(self, t: float) -> float | None:
        with self.cond:
            return next((ts for ts, _ in self.timeline if ts > t), None)

    def longest_stall_after(self, t: float) -> float:
        """The longest time without progress from `t` to the end of the stream."""
        with self.cond:
            times = [t] + [ts for ts, _ in self.timeline if ts > t]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def result(self, timeout: float) -> tuple[int, bytes]:
        return self._bg.result(timeout)


# ---------------------------------------------------------------- endpoints

class Pair:
    """Sender A (Dialer) and receiver B (Listener) on their own PacketConns.

    `relay_url`: where both connect, unless `proxy_a`/`proxy_b` (a FaultProxy) is given
    for that side. `pc_opts` go to derpnet.listen_packet, `quic_opts` to both derpquic
    endpoints (`listener_opts`/`dialer_opts` for one side only)."""

    def __init__(self, relay_url: str, *, proxy_a: FaultProxy | None = None, proxy_b: FaultProxy | None = None,
                 pc_opts: dict | None = None, quic_opts: dict | None = None,
                 listener_opts: dict | None = None, dialer_opts: dict | None = None) -> None:
        pc_opts = {"direct": False, **(pc_opts or {})}  # faults are injected on the relay path
        self.proxy_a, self.proxy_b = proxy_a, proxy_b
        self.log_a, self.log_b = LinkLog(), LinkLog()
        self._closers: list[Callable[[], None]] = []
        try:
            self.pc_a = derpnet.listen_packet(proxy_a.url if proxy_a else relay_url, on_event=self.log_a, **pc_opts)
            self._closers.append(self.pc_a.close)
            self.pc_b = derpnet.listen_packet(proxy_b.url if proxy_b else relay_url, on_event=self.log_b, **pc_opts)
            self._closers.append(self.pc_b.close)
            self.listener = derpquic.listen(self.pc_b, **{**(quic_opts or {}), **(listener_opts or {})})
            self._closers.append(lambda: self.listener.close(linger=0))
            self.dialer = derpquic.Dialer(self.pc_a, **{**(quic_opts or {}), **(dialer_opts or {})})
            self._closers.append(lambda: self.dialer.close(linger=0))
        except BaseException:
            self.close()
            raise

    def proxy(self, side: str) -> FaultProxy:
        p = self.proxy_a if side == "a" else self.proxy_b
        assert p is not None, f"side {side} has no proxy"
        return p

    def log(self, side: str) -> LinkLog:
        return self.log_a if side == "a" else self.log_b

    def open_stream(self, timeout: float = 15.0):
        """(sender stream, receiver stream)."""
        acc = Background(lambda: self.listener.accept(timeout=timeout), name="faults-accept")
        s = self.dialer.dial(self.listener.addr, timeout=timeout)
        r = acc.result(timeout + 5)
        return s, r

    def close(self) -> None:
        for c in reversed(self._closers):
            try:
                c()
            except Exception:
                pass
        self._closers.clear()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- transfers

@dataclass
class Outcome:
    size: int
    received: int
    intact: bool
    seconds: float
    fault: str | None = None
    detect: float | None = None  # fault -> LinkDown of the faulted link
    relink: float | None = None  # fault -> LinkUp of the new link(s)
    outage: float | None = None  # fault -> data flowing again (see module docstring)
    stall: float | None = None  # longest time without progress at the receiver after the fault
    sink: Sink | None = None
    extra: dict = field(default_factory=dict)

    @property
    def mbps(self) -> float:
        return self.size / self.seconds / 1e6

    def line(self) -> str:
        parts = [f"{self.size / MiB:.0f} MiB in {self.seconds:.2f}s = {self.mbps:.1f} MB/s",
                 "sha256 ok" if self.intact else "SHA-256 MISMATCH"]
        if self.fault:
            parts.append(f"fault={self.fault}")
        for name in ("detect", "relink", "outage", "stall"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name}={v:.3f}s")
        parts += [f"{k}={v}" for k, v in self.extra.items()]
        return ", ".join(parts)


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


@dataclass
class Fault:
    """What to do mid-transfer and which links must come back afterwards."""

    name: str
    apply: Callable[[], dict | None]  # may return figures for Outcome.extra
    sides: tuple[str, ...]  # links that go down and must come back ("a", "b")
    detect_timeout: float = 30.0


def cut(pair: Pair, side: str) -> Fault:
    def apply() -> None:
        assert pair.proxy(side).cut() >= 1, "no connection to cut"
    return Fault(f"cut-{side}", apply, (side,))


def blackhole(pair: Pair, side: str, detect_timeout: float = 30.0) -> Fault:
    def apply() -> None:
        assert pair.proxy(side).blackhole() >= 1, "no connection to black-hole"
    return Fault(f"blackhole-{side}", apply, (side,), detect_timeout)


def restart(relay) -> Fault:
    def apply() -> None:
        relay.restart()  # kill -9, start again on the same port with the same key; waits until ready
    return Fault("restart", apply, ("a", "b"))


def burst(pair: Pair, side: str, count: int, timeout: float = 20.0) -> Fault:
    """Drop the next `count` SendPackets of side's relay link, in a row (no link change)."""
    def apply() -> dict:
        proxy = pair.proxy(side)
        t0 = time.monotonic()
        proxy.drop_burst(count)
        if not proxy.wait_burst_done(timeout):
            raise AssertionError(f"the burst of {count} was not used up within {timeout:g}s "
                                 f"({proxy.stats()})")
        return {"burst_s": round(time.monotonic() - t0, 3)}
    return Fault(f"burst-{count}", apply, ())


class CrossTraffic:
    """Small datagrams from `pc` to `dst` at a steady pace, in a named thread: other
    traffic sharing a relay link (as magicsock multiplexes every peer over one)."""

    def __init__(self, pc, dst, *, interval: float = 0.001, size: int = 64) -> None:
        self.pc, self.dst = pc, dst
        self.interval, self.payload = interval, b"x" * size
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults-cross-traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):  # the pace, and the stop signal
            self.pc.write_to(self.payload, self.dst)
            self.sent += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> CrossTraffic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_transfer(pair: Pair, data: bytes, *, fault: Fault | None = None, fault_at: float = 0.4,
                 timeout: float = 300.0, sink_delay: float = 0.0, sink_chunk: int = 1 << 16) -> Outcome:
    """Stream `data` from A to B (FIN at the end); optionally apply `fault` once B has
    `fault_at` of it. Returns the Outcome (SHA-256 compared, outage measured)."""
    s, r = pair.open_stream()
    s.settimeout(timeout)
    r.settimeout(timeout)
    want = hashlib.sha256(data).digest()
    sink = Sink(r, delay=sink_delay, chunk=sink_chunk)
    t0 = time.monotonic()

    def send() -> None:
        view = memoryview(data)
        for i in range(0, len(data), 1 << 20):
            s.sendall(view[i:i + (1 << 20)])
        s.shutdown(socket.SHUT_WR)

    sender = Background(send, name="faults-send")
    out = Outcome(size=len(data), received=0, intact=False, seconds=0.0, sink=sink)
    try:
        if fault is not None:
            out.fault = fault.name
            downs = {side: len(pair.log(side).downs) for side in fault.sides}
            gens = {side: (pair.pc_a if side == "a" else pair.pc_b).generation for side in fault.sides}
            sink.wait_bytes(int(len(data) * fault_at), timeout)
            t_fault = time.monotonic()
            out.extra.update(fault.apply() or {})
            t_up = t_fault
            if fault.sides:  # links that must go down and come back
                t_down = max(pair.log(side).wait_down(downs[side] + 1, fault.detect_timeout)[0]
                             for side in fault.sides)
                t_up = max(pair.log(side).wait_up(gens[side] + 1, fault.detect_timeout + 30)[0]
                           for side in fault.sides)
                out.detect, out.relink = t_down - t_fault, t_up - t_fault
        n, digest = sink.result(timeout)
        out.seconds = time.monotonic() - t0
        sender.result(30)
        out.received = n
        out.intact = n == len(data) and digest == want
        if fault is not None:
            out.stall = sink.longest_stall_after(t_fault)
            if fault.sides:
                resumed = sink.first_progress_after(t_up)
                if resumed is not None:
                    out.outage = resumed - t_fault
    finally:
        s.close()
        r.close()
    return out
