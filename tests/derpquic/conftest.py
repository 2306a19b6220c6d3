"""Fixtures of the derpquic tests: a `net` to build Listeners/Dialers on.

`net` is parametrised over the in-memory fake relay ("fake"), our relay as a real
subprocess ("ours"), and Tailscale's Go derper ("go", marked interop). Everything
made through it is closed at teardown, and no derpquic thread may outlive a test.
"""

from __future__ import annotations

import tempfile
import threading
import time

import pytest

import derpnet
import derpquic
from tests.derpquic.fakes import FakeRelay


class Net:
    def __init__(self, kind: str, relay=None, url: str = "", ssl_context=None) -> None:
        self.kind = kind
        self.relay = relay
        self.url = url
        self.ssl_context = ssl_context
        self._things: list = []

    def pc(self, key=None):
        """A PacketConn on this network."""
        if self.kind == "fake":
            pc = self.relay.listen_packet(key)
        else:
            kw = {"ssl_context": self.ssl_context} if self.ssl_context else {}
            pc = derpnet.listen_packet(self.url, key, direct=False, **kw)
        self._things.append(pc)
        return pc

    def _endpoint_args(self, kw: dict):
        if self.kind == "fake":
            return self.pc(kw.pop("key", None)), kw
        if self.ssl_context is not None:
            kw.setdefault("ssl_context", self.ssl_context)
        kw.setdefault("direct", False)  # these tests are about QUIC over the relay path (see tests/lab)
        return self.url, kw

    def listener(self, **kw) -> derpquic.Listener:
        host, kw = self._endpoint_args(kw)
        ln = derpquic.listen(host, kw.pop("key", None), **kw)
        self._things.append(ln)
        return ln

    def dialer(self, **kw) -> derpquic.Dialer:
        host, kw = self._endpoint_args(kw)
        d = derpquic.Dialer(host, kw.pop("key", None), **kw)
        self._things.append(d)
        return d

    def track(self, thing):
        self._things.append(thing)
        return thing

    def close(self) -> None:
        for t in reversed(self._things):
            try:
                t.close()
            except Exception:
                pass
        self._things.clear()


def _derpquic_threads():
    return [t for t in threading.enumerate() if t.name.startswith("derpquic-")]


def assert_no_derpquic_threads(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for t in _derpquic_threads():
        t.join(max(0.0, deadline - time.monotonic()))
    assert not _derpquic_threads(), f"derpquic threads left running: {_derpquic_threads()}"


@pytest.fixture(scope="session")
def our_relay():
    from tests.relays import OurRelay
    with OurRelay() as r:
        yield r


@pytest.fixture(scope="session")
def go_derper():
    from tests.conftest import missing_go_peer
    from tests.interop_peers import DERPER_MISSING, GoDerper, derper_path
    if not derper_path():
        missing_go_peer(DERPER_MISSING)
    with tempfile.TemporaryDirectory(prefix="derpquic-derper-") as tmp:
        with GoDerper(tmp) as r:  # plain HTTP on a free port
            yield r


@pytest.fixture(params=["fake", "ours", pytest.param("go", marks=pytest.mark.interop)])
def net(request):
    kind = request.param
    if kind == "fake":
        relay = FakeRelay()
        n = Net("fake", relay)
    elif kind == "ours":
        r = request.getfixturevalue("our_relay")
        n = Net("ours", url=r.url)
    else:
        r = request.getfixturevalue("go_derper")
        n = Net("go", url=r.url, ssl_context=r.ssl_context())
    try:
        yield n
    finally:
        n.close()
        if kind == "fake":
            n.relay.close()
        assert_no_derpquic_threads()


@pytest.fixture
def fake():
    """Only the in-memory relay (fault injection)."""
    relay = FakeRelay()
    n = Net("fake", relay)
    try:
        yield n
    finally:
        n.close()
        relay.close()
        assert_no_derpquic_threads()
