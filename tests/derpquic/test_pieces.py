"""Small pieces, pure (no sockets, no threads): a connection's StreamTable, the driver
registry, the Listener's AcceptQueue and the Dialer's DialedConns, Options."""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from derpnet.keys import PrivateKey, PublicKey
from derpquic.api import AcceptQueue, DialedConns
from derpquic.auth import AuthPolicy
from derpquic.config import Options
from derpquic.conn import StreamTable
from derpquic.driver import DriverRegistry


@dataclass(eq=False)
class FakeStream:
    """A StreamEndpoint that records what its connection told it."""

    stream_id: int
    closed: bool = False
    room: bool = False
    lingers: bool = False
    lost: list = field(default_factory=list)
    woken: int = 0
    refused: list = field(default_factory=list)
    _conn: Any = field(default_factory=lambda: SimpleNamespace(closed=True))  # accept() grants no window

    def data_received(self, data: bytes, end: bool) -> None: ...
    def reset_received(self, code: int) -> None: ...
    def stop_sending_received(self, code: int) -> None: ...

    def connection_lost(self, error: BaseException) -> None:
        self.lost.append(error)

    def wake_writer(self) -> bool:
        if self.room:
            self.woken += 1
        return self.room

    def lingering(self) -> bool:
        return self.lingers

    def refuse(self, error: BaseException) -> None:
        self.refused.append(error)
        self.closed = True

    def remote_addr(self):
        return PrivateKey.generate().public_key


# ---------------------------------------------------------------- StreamTable


def test_stream_table_add_close_sweep():
    t = StreamTable()
    a, b = FakeStream(0), FakeStream(4)
    t.add(a)
    t.add(b)
    assert len(t) == 2 and t.open == 2 and t.get(4) is b and t.get(8) is None
    t.blocked_writers.add(a)
    t.closed(a)
    assert t.open == 1 and a not in t.blocked_writers and a in t.zombies
    t.sweep(lambda sid: True)  # aioquic still knows stream 0
    assert t.get(0) is a
    t.sweep(lambda sid: sid != 0)
    assert t.get(0) is None and not t.zombies and len(t) == 1


def test_stream_table_wakes_only_writers_with_room():
    t = StreamTable()
    a, b = FakeStream(0, room=True), FakeStream(4)
    t.blocked_writers |= {a, b}
    t.wake_writers()
    assert a.woken == 1 and t.blocked_writers == {b}


def test_stream_table_lost_reaches_every_stream_once_pending_is_cleared():
    t = StreamTable()
    a, p = FakeStream(0), FakeStream(4)
    t.add(a)
    t.pending.append(p)
    t.blocked_writers.add(a)
    err = ConnectionAbortedError("gone")
    t.lost(err)
    assert a.lost == [err] and p.lost == [err] and not t.pending and not t.blocked_writers


def test_stream_table_lingering():
    t = StreamTable()
    t.add(FakeStream(0))
    assert not t.lingering()
    t.add(FakeStream(4, lingers=True))
    assert t.lingering()


def test_stream_table_refuses_once():
    calls = []

    class Quic:
        def stop_stream(self, sid, code):
            calls.append(("stop", sid, code))

        def reset_stream(self, sid, code):
            calls.append(("reset", sid, code))

    t = StreamTable()
    t.refuse(1, Quic())  # type: ignore[arg-type]
    t.refuse(1, Quic())  # type: ignore[arg-type]
    assert calls == [("stop", 1, 0x10), ("reset", 1, 0x10)] and t.refused == {1}


# ---------------------------------------------------------------- DriverRegistry


class FakeDriver:
    made = 0

    def __init__(self, pc, private_key) -> None:
        FakeDriver.made += 1
        self.pc = pc
        self.private_key = private_key
        self.stopped = False


def test_registry_shares_and_counts():
    reg, pc, key = DriverRegistry(), object(), PrivateKey.generate()
    a = reg.acquire(FakeDriver, pc, key)
    b = reg.acquire(FakeDriver, pc, key)
    assert a is b
    assert reg.release(a) is False  # one user left
    assert reg.release(a) is True   # the last one: stop it
    c = reg.acquire(FakeDriver, pc, key)
    assert c is not a  # a fresh driver after the last release


def test_registry_refuses_another_key_for_the_same_packetconn():
    reg, pc = DriverRegistry(), object()
    reg.acquire(FakeDriver, pc, PrivateKey.generate())
    with pytest.raises(ValueError, match="another private key"):
        reg.acquire(FakeDriver, pc, PrivateKey.generate())


def test_registry_replaces_a_stopped_driver():
    reg, pc, key = DriverRegistry(), object(), PrivateKey.generate()
    dead = reg.acquire(FakeDriver, pc, key)
    dead.stopped = True
    fresh = reg.acquire(FakeDriver, pc, key)
    assert fresh is not dead
    assert reg.release(dead) is True  # a replaced driver: its users stop it (it is stopped already)
    assert reg.release(fresh) is True


def test_registry_keeps_packetconns_apart():
    reg, key = DriverRegistry(), PrivateKey.generate()
    assert reg.acquire(FakeDriver, object(), key) is not reg.acquire(FakeDriver, object(), key)


# ---------------------------------------------------------------- AcceptQueue / DialedConns


def _queue(backlog: int = 2) -> tuple[AcceptQueue, threading.Lock]:
    lock = threading.Lock()  # the driver's: its hooks are called with it held
    return AcceptQueue(lock, Options(backlog=backlog), AuthPolicy()), lock


def test_accept_queue_hands_out_streams_in_order():
    q, lock = _queue()
    a, b = FakeStream(0), FakeStream(4)
    with lock:
        q.stream_opened(a)  # type: ignore[arg-type]
        q.stream_opened(b)  # type: ignore[arg-type]
    assert q.get(0) is a and q.get(0) is b
    with pytest.raises(TimeoutError):
        q.get(0)


def test_accept_queue_skips_streams_closed_while_queued():
    q, lock = _queue()
    a, b = FakeStream(0, closed=True), FakeStream(4)
    with lock:
        q.stream_opened(a)  # type: ignore[arg-type]
        q.stream_opened(b)  # type: ignore[arg-type]
    assert q.get(0) is b


def test_accept_queue_refuses_beyond_its_backlog():
    q, lock = _queue(backlog=1)
    a, b = FakeStream(0), FakeStream(4)
    with lock:
        q.stream_opened(a)  # type: ignore[arg-type]
        q.stream_opened(b)  # type: ignore[arg-type]
    assert b.refused and isinstance(b.refused[0], ConnectionRefusedError) and not a.refused


def test_accept_queue_close_refuses_what_waits():
    q, lock = _queue()
    a = FakeStream(0)
    with lock:
        q.stream_opened(a)  # type: ignore[arg-type]
        q.close()
    assert isinstance(a.refused[0], ConnectionAbortedError)
    with pytest.raises(OSError) as e:
        q.get(0)
    assert e.value.errno == errno.EBADF
    late = FakeStream(4)
    with lock:
        q.stream_opened(late)  # type: ignore[arg-type]
    assert late.refused


def test_accept_queue_reports_a_failed_driver_after_the_queue_drains():
    q, lock = _queue()
    a = FakeStream(0)
    with lock:
        q.stream_opened(a)  # type: ignore[arg-type]
        q.driver_failed(ConnectionAbortedError("the relay connection is gone"))
    assert q.get(0) is a
    with pytest.raises(ConnectionAbortedError, match="relay connection is gone"):
        q.get(0)


class _FakeConn:
    """What AcceptQueue reads of a connection (hashable, like Conn)."""

    def __init__(self, peer: PublicKey, windows: list[int]) -> None:
        self.peer = peer
        self.quic = SimpleNamespace(set_peer_stream_window=windows.append)


def _fake_conn(peer: PublicKey, windows: list[int]) -> Any:
    return _FakeConn(peer, windows)


def test_accept_queue_tracks_connections():
    q, lock = _queue()
    windows: list[int] = []
    conn = _fake_conn(PrivateKey.generate().public_key, windows)
    q.conn_accepted(conn)
    assert conn in q.conns and q.half_open_count == 1
    assert windows == [Options().unaccepted_window]  # small until accept()
    q.conn_closed(conn)
    assert conn not in q.conns and q.half_open_count == 0 and q.half_open == {}


def test_accept_queue_refuses_keys_outside_allow_before_any_state():
    """Issue 9, item 6: answered (a stateless CONNECTION_REFUSED), nothing kept."""
    friend, stranger = PrivateKey.generate().public_key, PrivateKey.generate().public_key
    q = AcceptQueue(threading.Lock(), Options(), AuthPolicy(allow=frozenset({friend})))
    assert q.refusal(stranger) == "not allowed" and q.refusal(friend) is None
    assert q.conns == set() and q.half_open_count == 0


def test_accept_queue_bounds_half_open_connections():
    """Per peer key and in all, like a socket backlog; beyond: dropped (""), not answered,
    so that an honest dialler's retransmission gets in once there is room."""
    q = AcceptQueue(threading.Lock(), Options(max_half_open=5, max_half_open_per_peer=2), AuthPolicy())
    a, b, c = (PrivateKey.generate().public_key for _ in range(3))
    conns = []
    for peer in (a, a, b, b):
        assert q.refusal(peer) is None
        conns.append(_fake_conn(peer, []))
        q.conn_accepted(conns[-1])
    assert q.refusal(a) == "" and q.refusal(b) == ""  # per key
    assert q.refusal(c) is None
    q.conn_accepted(_fake_conn(c, []))
    assert q.refusal(c) == ""  # in all (5)
    q.conn_ready(conns[0])  # a's first one finished its handshake: room again
    assert q.refusal(a) is None and q.refused == {"busy": 3}


def test_dialed_conns_forget_the_peer_entry_of_a_closed_connection():
    @dataclass(eq=False)
    class C:
        peer: object

    d = DialedConns()
    old, new = C("peer"), C("peer")
    d.conns |= {old, new}
    d.by_peer["peer"] = new
    d.conn_closed(old)  # type: ignore[arg-type]
    assert d.by_peer["peer"] is new and d.conns == {new}
    d.conn_closed(new)  # type: ignore[arg-type]
    assert "peer" not in d.by_peer and not d.conns


# ---------------------------------------------------------------- Options


def test_options_pop_from_takes_only_its_names():
    kw = {"idle_timeout": 5.0, "ssl_context": None}
    opts = Options.pop_from(kw)
    assert opts.idle_timeout == 5.0 and kw == {"ssl_context": None}


@pytest.mark.parametrize("bad", [
    {"max_datagram_size": 1199}, {"max_datagram_size": 65528}, {"stream_window": 1000},
    {"ack_delay": 0.0}, {"ack_delay": 0.03}, {"idle_timeout": 0}, {"congestion_control": "bbr"},
])
def test_options_validate(bad):
    with pytest.raises(ValueError):
        Options.pop_from(dict(bad))


def test_quic_configuration_packet_size():
    assert Options().quic_configuration(is_client=True).max_datagram_size == 1452
    assert Options().quic_configuration(is_client=True, max_datagram_size=1252).max_datagram_size == 1252
