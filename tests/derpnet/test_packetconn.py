"""derpnet.PacketConn through real relays (ours and Tailscale's derper, HTTP and TLS) and
through scripted broken ones: framing, sizes, deadlines, close, queueing, reconnect."""

from __future__ import annotations

import errno
import threading
import time

import pytest

import derpnet
from derpnet import frames as F
from derpnet.client import DerpClient
from derpnet.errors import UpgradeError
from derpnet.keys import PrivateKey, PublicKey
from derpnet.packetconn import (
    MAX_DATAGRAM_SIZE,
    LinkDown,
    LinkUp,
    PacketConn,
    ShortBufferError,
    backoff_delay,
    listen_packet,
)
from tests.conftest import missing_go_peer
from tests.derpnet.fakes import (
    FakeRelay,
    StatusHTTPServer,
    TcpProxy,
    derp_accept,
    drain_until_stop,
    real_relay,
    relay_params,
)
from tests.interop_peers import GoDerper, derper_path, free_port, skip_reason
from tests.relays import OurRelay


def reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("derpnet-reader-")]


@pytest.fixture
def conns():
    """Open PacketConns with `conns(relay_or_url, **kw)`; all are closed (and their threads
    checked gone) at the end of the test."""
    opened = []

    def open_(relay, **kw):
        if isinstance(relay, str):
            pc = listen_packet(relay, **kw)
        else:
            pc = listen_packet(relay.url, ssl_context=relay.ssl_context, **kw)
        opened.append(pc)
        return pc

    yield open_
    for pc in opened:
        pc.close()
    assert reader_threads() == [], "relay link readers still running after close()"


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our relay (plain HTTP), shared by the API tests of this module."""
    with real_relay("ours", tmp_path_factory.mktemp("ours")) as r:
        yield r


@pytest.fixture(scope="module", params=relay_params())
def relay(request, tmp_path_factory):
    with real_relay(request.param, tmp_path_factory.mktemp(request.param)) as r:
        yield r


class Events:
    """An on_event recorder with waitable conditions."""

    def __init__(self) -> None:
        self.items = []
        self.cond = threading.Condition()

    def __call__(self, ev) -> None:
        with self.cond:
            self.items.append((time.monotonic(), ev))
            self.cond.notify_all()

    def wait_for(self, kind, count=1, timeout=10.0):
        """Wait for `count` events of type `kind`; return the last one's (time, event)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.of(kind)) >= count, timeout)
            assert ok, f"no {count} x {kind.__name__} within {timeout}s: {self.items}"
            return self.of(kind)[count - 1]

    def of(self, kind):
        return [(t, e) for t, e in self.items if isinstance(e, kind)]


def roundtrip(a, b, payload, timeout=5.0):
    assert a.write_to(payload, b.local_addr()) == len(payload)
    b.settimeout(timeout)
    data, src = b.read_from()
    assert (data, src) == (payload, a.local_addr())


# ---------------------------------------------------------------- through every relay kind

def test_exchange_both_ways(relay, conns):
    a, b = conns(relay), conns(relay)
    assert a.connected and b.connected and a.generation == 1
    roundtrip(a, b, b"hello from a")
    roundtrip(b, a, b"hello from b")
    roundtrip(a, b, b"")  # an empty datagram is still a datagram
    # every address form
    for addr in (b.local_addr(), bytes(b.local_addr()), str(b.local_addr()), b.local_addr().hex(),
                 b.local_addr().b64()):
        assert a.write_to(b"form", addr) == 4
        assert b.read_from() == (b"form", a.local_addr())
    st = a.stats()
    assert st["packets_out"] == 7 and st["bytes_out"] == 12 + 0 + 4 * 5
    assert b.stats()["packets_in"] == 7


def test_send_to_self(relay, conns):
    a = conns(relay)
    roundtrip(a, a, b"boomerang")


def test_largest_datagram_passes_one_more_is_refused(relay, conns):
    a, b = conns(relay), conns(relay)
    big = bytes(range(256)) * 255 + bytes(range(255))
    assert len(big) == MAX_DATAGRAM_SIZE == 65535
    roundtrip(a, b, big)
    before = a.stats()["packets_out"]
    with pytest.raises(ValueError, match="65536 bytes exceeds"):
        a.write_to(big + b"!", b.local_addr())
    with pytest.raises(ValueError):
        a.write_batch([(b"ok", b.local_addr()), (big + b"!", b.local_addr())])
    assert a.stats()["packets_out"] == before
    roundtrip(a, b, b"still fine")  # nothing half-sent before the refusal


def test_write_batch(relay, conns):
    a, b = conns(relay), conns(relay)
    items = [(b"%d" % i * (i + 1), b.local_addr()) for i in range(20)]
    assert a.write_batch(items) == 20
    b.settimeout(5)
    got = [b.read_from()[0] for _ in range(20)]
    assert got == [d for d, _ in items]
    assert a.write_batch([]) == 0


# ---------------------------------------------------------------- API behaviour (our relay)

def test_keys_given_in_every_form(ours, conns):
    k = PrivateKey.generate()
    for form in (k, k.raw, k.to_text()):
        pc = conns(ours, key=form)
        assert pc.local_addr() == k.public_key and isinstance(pc.local_addr(), PublicKey)
        pc.close()
    assert isinstance(conns(ours).local_addr(), PublicKey)  # None: a fresh key
    with pytest.raises(ValueError):
        listen_packet(ours.url, key="privkey:nothex")


def test_lazy_package_exports(ours, conns):
    assert derpnet.listen_packet is listen_packet and derpnet.PacketConn is PacketConn


def test_read_deadline_and_timeout(ours, conns):
    a = conns(ours)
    a.set_read_deadline(time.time() + 0.1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        a.read_from()
    assert 0.08 <= time.monotonic() - t0 < 2
    a.set_read_deadline(time.time() - 1)  # in the past: immediate
    with pytest.raises(TimeoutError):
        a.read_from()
    a.set_read_deadline(None)
    a.settimeout(0.1)
    assert a.gettimeout() == 0.1
    with pytest.raises(TimeoutError):
        a.read_from()
    a.settimeout(0)
    with pytest.raises(BlockingIOError):
        a.read_from()
    a.settimeout(None)
    a.set_deadline(time.time() - 1)  # both
    with pytest.raises(TimeoutError):
        a.read_from()
    with pytest.raises(TimeoutError):
        a.write_to(b"x", a.local_addr())
    a.set_deadline(None)
    roundtrip(a, a, b"after deadlines")
    with pytest.raises(ValueError):
        a.settimeout(-1)


def _wait_blocked(pc, n=1, timeout=5.0):
    """Wait until `n` threads sleep inside pc's read wait (test-only introspection)."""
    deadline = time.monotonic() + timeout
    while len(pc._cond._waiters) < n:
        assert time.monotonic() < deadline, "reader never blocked"
        time.sleep(0.002)


def _blocked_read(pc):
    out = {}

    def run():
        t0 = time.monotonic()
        try:
            out["value"] = pc.read_from()
        except BaseException as e:
            out["error"] = e
        out["after"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    _wait_blocked(pc)
    return t, out


def test_moving_the_read_deadline_wakes_a_blocked_reader(ours, conns):
    a = conns(ours)
    a.set_read_deadline(time.time() + 60)
    t, out = _blocked_read(a)
    t0 = time.monotonic()
    a.set_read_deadline(time.time() + 0.05)  # earlier, from another thread
    t.join(5)
    assert not t.is_alive()
    assert isinstance(out["error"], TimeoutError) and time.monotonic() - t0 < 2


def test_clearing_the_deadline_lets_the_reader_wait_for_data(ours, conns):
    a = conns(ours)
    a.set_read_deadline(time.time() + 60)
    t, out = _blocked_read(a)
    a.set_read_deadline(None)
    a.write_to(b"data", a.local_addr())
    t.join(5)
    assert out["value"] == (b"data", a.local_addr())


def test_close_wakes_a_blocked_reader_and_later_calls_fail(ours, conns):
    a = conns(ours)
    t, out = _blocked_read(a)
    t0 = time.monotonic()
    a.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert isinstance(out["error"], OSError) and out["error"].errno == errno.EBADF
    for call in (lambda: a.read_from(), lambda: a.write_to(b"x", a.local_addr()),
                 lambda: a.write_batch([(b"x", a.local_addr())])):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.EBADF and "closed" in str(ei.value)
    a.close()  # idempotent
    assert a.closed and "closed" in repr(a)


def test_context_manager_threads_and_repr(ours):
    with listen_packet(ours.url) as a:
        names = [t.name for t in reader_threads()]
        assert names == [f"derpnet-reader-{a.local_addr().b64()[:8]}"]
        r = repr(a)
        assert str(a.local_addr()) in r and ours.url in r and "connected" in r
    assert reader_threads() == []


def test_short_buffer_keeps_the_datagram(ours, conns):
    a = conns(ours)
    a.write_to(b"x" * 100, a.local_addr())
    a.settimeout(5)
    with pytest.raises(ShortBufferError) as ei:
        a.read_from(10)
    assert ei.value.size == 100 and ei.value.errno == errno.EMSGSIZE
    assert a.read_from(100) == (b"x" * 100, a.local_addr())
    a.write_to(b"into", a.local_addr())
    buf = bytearray(3)
    with pytest.raises(ShortBufferError):
        a.read_from_into(buf)
    buf = bytearray(10)
    assert a.read_from_into(buf) == (4, a.local_addr()) and buf[:4] == b"into"


def test_bad_framing_is_dropped_and_counted(ours, conns):
    a = conns(ours)
    raw = DerpClient(ours.url, PrivateKey.generate()).connect()
    try:
        raw.send_packet(a.local_addr(), b"\x01not a datagram")
        raw.send_packet(a.local_addr())  # empty: no framing byte at all
        raw.send_packet(a.local_addr(), b"\x00", b"good")
        a.settimeout(5)
        assert a.read_from() == (b"good", raw.public_key)  # the relay keeps order per sender
    finally:
        raw.close()
    st = a.stats()
    assert st["drops"]["bad_framing"] == 2 and st["packets_in"] == 1


def test_full_queue_drops_the_oldest(ours, conns):
    a = conns(ours, queue_size=4)
    for i in range(10):
        a.write_to(b"%d" % i, a.local_addr())
    a.write_to(b"last", a.local_addr())
    deadline = time.monotonic() + 5
    while a.stats()["packets_in"] < 11:  # no event for "the reader queued it": poll the counter
        assert time.monotonic() < deadline
        time.sleep(0.005)
    got = [a.read_from()[0] for _ in range(4)]
    assert got == [b"7", b"8", b"9", b"last"]
    assert a.stats()["drops"]["queue_full"] == 7 and a.stats()["queued"] == 0


def test_on_packet_callback_replaces_the_queue(ours, conns):
    got = []
    done = threading.Event()
    a = conns(ours, on_packet=lambda data, src: (got.append((data, src)), done.set()))
    a.write_to(b"cb", a.local_addr())
    assert done.wait(5)
    assert got == [(b"cb", a.local_addr())] and a.stats()["queued"] == 0


def test_link_up_event_and_server_key(ours, conns):
    ev = Events()
    a = conns(ours, on_event=ev)
    _, up = ev.wait_for(LinkUp)
    assert up.generation == 1 and up.server_key == a.server_key == ours.process.public_key


def test_peer_gone_is_observable(relay, conns):
    ev = Events()
    a, b = conns(relay, on_event=ev), conns(relay)
    roundtrip(b, a, b"I was here")  # a has received from b: the relay will tell a when b leaves
    b.close()
    _, gone = ev.wait_for(F.PeerGone)
    assert gone.key == b.local_addr() and gone.reason == F.PeerGoneReason.DISCONNECTED
    assert a.stats()["peer_gone"] == 1


# ---------------------------------------------------------------- connect failures

def test_initial_connect_failure_raises_and_leaves_no_thread():
    with StatusHTTPServer(404) as web:
        with pytest.raises(UpgradeError) as ei:
            listen_packet(web.url)
        assert ei.value.status == 404
    port = free_port()
    with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1:{port}"):
        listen_packet(f"http://127.0.0.1:{port}")
    assert reader_threads() == []


def test_backoff_delay_formula():
    assert backoff_delay(1, lambda: 0.0) == pytest.approx(0.005)
    assert backoff_delay(1, lambda: 0.5) == pytest.approx(0.010)
    assert backoff_delay(3, lambda: 0.5) == pytest.approx(0.090)
    assert backoff_delay(22, lambda: 0.5) == pytest.approx(4.84)
    assert backoff_delay(23, lambda: 0.5) == pytest.approx(5.0)  # capped
    assert backoff_delay(22, lambda: 0.999) == pytest.approx(5.0)  # the cap holds after the jitter
    assert max(backoff_delay(n, lambda: 0.999) for n in range(1, 1000)) <= 5.0  # as documented


# ---------------------------------------------------------------- reconnect

def _restartable(kind, workdir):
    """(start, kill) for a relay of `kind` that comes back on the same port with the same key."""
    if kind == "go":
        if derper_path() is None:
            missing_go_peer(skip_reason("derper"))
        port = free_port()
        holder = {}

        def start():
            holder["d"] = GoDerper(workdir, port=port).start()
            return holder["d"].url

        def kill():
            holder["d"].proc.proc.kill()
            holder["d"].stop()

        def stop():
            if "d" in holder:
                holder["d"].stop()
        return start, kill, stop
    relay = OurRelay(workdir=str(workdir))

    def start_ours():
        return (relay.start() if not relay.port else relay.restart()).url
    return start_ours, relay.kill, relay.stop


@pytest.mark.parametrize("kind", relay_params(("ours", "go")))
def test_reconnects_after_the_relay_is_killed_and_restarted(kind, tmp_path, conns):
    start, kill, stop = _restartable(kind, tmp_path)
    try:
        url = start()
        ev_a, ev_b = Events(), Events()
        a, b = conns(url, on_event=ev_a), conns(url, on_event=ev_b)
        roundtrip(a, b, b"before")
        kill()
        ev_a.wait_for(LinkDown)
        ev_b.wait_for(LinkDown)
        # During the outage writes are dropped like UDP, never blocking, never raising.
        t0 = time.monotonic()
        assert a.write_to(b"into the void", b.local_addr()) == 13
        assert time.monotonic() - t0 < 0.5
        assert a.stats()["drops"]["offline"] >= 1 and not a.connected
        assert start() == url
        assert a.wait_connected(15, min_generation=2) and b.wait_connected(15, min_generation=2)
        roundtrip(a, b, b"after")
        roundtrip(b, a, b"and back")
        assert a.stats()["reconnects"] >= 1 and a.generation >= 2
        # One reader per link: each old reader ran the reconnect and then ends (nothing to wait on).
        deadline = time.monotonic() + 5
        while len(reader_threads()) != 2:
            assert time.monotonic() < deadline, reader_threads()
            time.sleep(0.005)
    finally:
        stop()


@pytest.mark.parametrize("kind", relay_params(("ours", "go", "go-tls")))
def test_reconnects_after_the_connection_is_cut(kind, tmp_path, conns):
    with real_relay(kind, tmp_path) as relay, TcpProxy(int(relay.url.rsplit(":", 1)[1])) as proxy:
        scheme, host = relay.url.split("://")[0], relay.url.split("://")[1].rsplit(":", 1)[0]
        via = f"{scheme}://{host}:{proxy.port}"
        ev = Events()
        a = conns(via, ssl_context=relay.ssl_context, on_event=ev)
        b = conns(relay)
        roundtrip(a, b, b"before the cut")
        assert proxy.cut() == 1
        _, down = ev.wait_for(LinkDown)
        assert isinstance(down.error, OSError)
        assert a.wait_connected(10, min_generation=2)
        roundtrip(a, b, b"after the cut")
        roundtrip(b, a, b"reply")
        assert proxy.connections == 2


def test_restarting_frame_sets_the_first_reconnect_delay(conns):
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        if n == 0:
            sock.sendall(F.encode_restarting(0.4, 5.0))
            return  # and hang up
        drain_until_stop(sock, relay)

    with FakeRelay(handler) as relay:
        ev = Events()
        a = conns(relay.url, on_event=ev)
        t_down, _ = ev.wait_for(LinkDown)
        t_up, up = ev.wait_for(LinkUp, count=2)
        assert up.generation == 2
        assert t_up - t_down >= 0.4  # not the 5-15 ms of the first backoff step
        assert len(ev.of(F.Restarting)) == 1
        assert a.stats()["reconnects"] == 1


def test_restart_delay_is_capped_and_must_be_fresh():
    """Issue 9, item 11: a Restarting frame can say 2³² ms (49.7 days); it is capped at
    Tailscale's 5 s backoff ceiling, and counts only for a link that dies soon after it."""
    from derpnet.relaylink import MAX_RECONNECT_DELAY, RESTART_HINT_TTL, restart_delay
    huge = F.Restarting((2**32 - 1) / 1000, 5.0)
    assert MAX_RECONNECT_DELAY == 5.0
    assert restart_delay(huge, 100.0, 100.5, 1) == 5.0
    assert restart_delay(F.Restarting(0.4, 5.0), 100.0, 100.5, 1) == 0.4
    stale = restart_delay(F.Restarting(0.4, 5.0), 100.0, 100.0 + RESTART_HINT_TTL + 1, 1, rng=lambda: 0.5)
    assert stale == backoff_delay(1, rng=lambda: 0.5) == 0.01
    assert restart_delay(None, 0.0, 100.0, 3, rng=lambda: 0.5) == backoff_delay(3, rng=lambda: 0.5)
    assert restart_delay(F.Restarting(0.0, 0.0), 100.0, 100.0, 1) == 0.0


def _reconnect_gaps(conns, handler, n: int) -> list[float]:
    """A PacketConn on a scripted relay: seconds from each of its first `n` link losses to
    the next link up."""
    with FakeRelay(handler) as relay:
        ev = Events()
        conns(relay.url, on_event=ev)
        gaps = []
        for k in range(1, n + 1):
            t_down, _ = ev.wait_for(LinkDown, count=k)
            t_up, _ = ev.wait_for(LinkUp, count=k + 1, timeout=5)
            gaps.append(t_up - t_down)
        return gaps


def test_restarting_frame_cannot_stall_reconnects(conns, monkeypatch):
    """A hostile relay says "come back in 49.7 days" and hangs up: we are back within the cap
    (shortened to 0.5 s here so the test is quick; its value is checked above)."""
    monkeypatch.setattr("derpnet.relaylink.MAX_RECONNECT_DELAY", 0.5)

    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        if n == 0:
            sock.sendall(F.encode_restarting((2**32 - 1) / 1000, 5.0))
            return
        drain_until_stop(sock, relay)

    [gap] = _reconnect_gaps(conns, handler, 1)
    assert 0.4 <= gap < 2.5


def test_stale_restarting_frame_is_forgotten(conns, monkeypatch):
    """A Restarting frame early in a link's life says nothing about its death much later,
    nor about the next link's: only the backoff applies then."""
    monkeypatch.setattr("derpnet.relaylink.RESTART_HINT_TTL", 0.3)

    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        if n == 0:
            sock.sendall(F.encode_restarting(3.0, 5.0))
            relay.stop.wait(1.0)  # ... then the link dies for another reason, later
            return
        if n == 1:
            return  # the next link dies at once, with no Restarting of its own
        drain_until_stop(sock, relay)

    first, second = _reconnect_gaps(conns, handler, 2)
    assert first < 1.5 and second < 1.5  # the backoff's first steps, not the stale 3 s


def test_health_frames_are_observable(conns):
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        sock.sendall(F.encode_health("overloaded"))
        drain_until_stop(sock, relay)

    with FakeRelay(handler) as relay:
        ev = Events()
        a = conns(relay.url, on_event=ev)
        _, h = ev.wait_for(F.Health)
        assert h.problem == "overloaded" and a.health == "overloaded"


def test_relay_that_stops_reading_then_reconnect(conns):
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        if n == 0:
            relay.stop.wait(20)  # never read: the client's writes time out
        else:
            drain_until_stop(sock, relay)

    with FakeRelay(handler, rcvbuf=4096) as relay:
        ev = Events()
        a = conns(relay.url, write_timeout=0.3, on_event=ev)
        dst = PrivateKey.generate().public_key
        t0 = time.monotonic()
        for _ in range(2000):
            assert a.write_to(bytes(60000), dst) == 60000  # never raises: dropped once the link is dead
            if ev.of(LinkDown):
                break
        assert time.monotonic() - t0 < 10
        _, down = ev.wait_for(LinkDown)
        assert isinstance(down.error, TimeoutError)
        assert a.wait_connected(10, min_generation=2)


def test_no_reconnect_mode_dies_with_its_link(conns):
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)  # then hang up

    with FakeRelay(handler) as relay:
        ev = Events()
        a = conns(relay.url, reconnect=False, on_event=ev)
        ev.wait_for(LinkDown)
        with pytest.raises(ConnectionResetError):
            a.read_from()
        with pytest.raises(ConnectionResetError):
            a.write_to(b"x", a.local_addr())
        assert not a.wait_connected(0.1)
        assert relay.accepted == 1


def test_close_during_reconnect_backoff_is_prompt(conns):
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        sock.sendall(F.encode_restarting(30.0, 5.0))  # "come back in 30 s"

    with FakeRelay(handler) as relay:
        ev = Events()
        a = conns(relay.url, on_event=ev)
        ev.wait_for(LinkDown)
        t0 = time.monotonic()
        a.close()
        assert time.monotonic() - t0 < 2
        assert reader_threads() == []
