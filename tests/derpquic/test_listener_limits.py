"""A Listener's bounds against hostile dialers, in-process on the fake relay (issue 9,
items 6 and 7): a key outside `allow` is refused statelessly, and streams nobody accepts
hold at most `unaccepted_window` bytes each. (`derpconnect serve` under 3,000 forged
Initials, its RSS measured: tests/hostile/test_serve_limits.py.)"""

from __future__ import annotations

import os
import socket
import time

from derpnet.keys import PrivateKey
from derpquic.config import Options
from tests.derpquic.helpers import recv_all


def test_stranger_is_refused_at_once_statelessly(fake):
    """A key outside `allow` gets a stateless CONNECTION_REFUSED: its dial fails at once
    (not after the dial timeout), and the listener kept no connection for it."""
    friend = PrivateKey.generate()
    ln = fake.listener(allow=[friend.public_key])
    stranger = fake.dialer()
    t0 = time.monotonic()
    try:
        stranger.dial(ln.addr, timeout=10)
        raise AssertionError("a stranger got through")
    except ConnectionRefusedError as e:
        assert "allow-list" in str(e)
    assert time.monotonic() - t0 < 2
    with ln._driver.lock:
        assert ln._queue.conns == set() and ln._queue.refused == {"not allowed": 1}


def test_unaccepted_streams_hold_a_bounded_number_of_bytes(fake):
    """6 dialers each open 20 streams and push 1 MiB into each; nobody accepts. The listener
    holds at most unaccepted_window (16 KiB) per stream, 1.9 MiB in all (before: up to the
    4 MiB stream window each, the 16 MiB connection window per connection: 96 MiB). Then
    one accepted stream gets its whole window and all its data."""
    ln = fake.listener()
    opts = Options()
    payload = os.urandom(1 << 20)
    streams = []
    for _ in range(6):
        d = fake.dialer()
        for _ in range(20):
            s = d.dial(ln.addr, timeout=10)
            s.setblocking(False)
            streams.append(s)
    deadline = time.monotonic() + 3
    sent = [0] * len(streams)
    while time.monotonic() < deadline:  # push until flow control stops every stream
        for i, s in enumerate(streams):
            if sent[i] < len(payload):
                try:
                    sent[i] += s.send(payload[sent[i]:sent[i] + 65536])
                except BlockingIOError:
                    pass
        time.sleep(0.01)  # let the driver move packets
    with ln._driver.lock:
        held = sum(c.streams.unread for c in ln._queue.conns)
    bound = len(streams) * opts.unaccepted_window
    print(f"{len(streams)} unaccepted streams: the listener holds {held / 1024:.0f} KiB (bound {bound / 1024:.0f} KiB)")
    assert held <= bound
    # Accept one: it may now receive everything.
    r = ln.accept(timeout=5)
    first = next(s for s in streams if s.stream_id == r.stream_id and s.remote_addr() == ln.addr
                 and s.local_addr() == r.remote_addr())
    i = streams.index(first)
    first.setblocking(True)
    first.settimeout(20)
    first.sendall(payload[sent[i]:])
    first.shutdown(socket.SHUT_WR)
    r.settimeout(20)
    assert recv_all(r) == payload
