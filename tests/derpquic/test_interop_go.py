"""derpquic against the original Go derpconnect (quic-go v0.46; built unmodified by
interop/build.sh), through Tailscale's derper and through our relay, each with TLS on port
443 of a loopback address of its own (the original only ever dials HOST:443). Transfers
through a Go process run under `original_race_xfails` (its own reader deadlock is reported
as its expected failure, never as a pass)."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

import derpquic
from derpnet.errors import AuthenticationError
from derpquic.config import GO_PACKET_SIZE
from tests.cmd.procs import CountingServer
from tests.derpquic.helpers import Background, recv_all, recv_exactly
from tests.interop_peers import GoDerpconnect, Relay443, original_race_xfails

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def go_tool():
    from tests.conftest import missing_go_peer
    from tests.interop_peers import DERPCONNECT_MISSING, DERPER_MISSING, derpconnect_path, derper_path
    if not derper_path():
        missing_go_peer(DERPER_MISSING)
    tool = derpconnect_path()
    if not tool:
        missing_go_peer(DERPCONNECT_MISSING)
    return tool


@pytest.fixture(scope="module", params=["derper", "ours"])
def tls_relay(request, tmp_path_factory, go_tool):
    from tests.conftest import missing_go_peer
    try:
        with Relay443(request.param, tmp_path_factory.mktemp(request.param)) as r:
            yield r
    except PermissionError as e:
        missing_go_peer(str(e))


@pytest.fixture
def go_serve(tls_relay, tmp_path, go_tool):
    svc = CountingServer(banner=b"220 hello from tcp\r\n")
    with GoDerpconnect.serve(tls_relay, svc.port, tmp_path / "serve", binary=go_tool) as p:
        yield p
    svc.close()


def _dialer(tls_relay, **kw):
    return derpquic.Dialer(tls_relay.url, ssl_context=tls_relay.ssl_context(), **kw)


def test_dial_go_serve_banner_and_echo(tls_relay, go_serve):
    d = _dialer(tls_relay, allow_unauthenticated=True)
    try:
        s = d.dial(go_serve.pubkey, timeout=15)
        s.settimeout(20)
        assert not s.authenticated
        # Server speaks first: the Go listener saw our stream before we wrote a byte.
        assert recv_exactly(s, 20) == b"220 hello from tcp\r\n"
        assert s._conn.quic.max_datagram_size == GO_PACKET_SIZE
        data = os.urandom(2 << 20)
        with original_race_xfails(go_serve):  # the echo flows through the Go process both ways
            reader = Background(lambda: recv_exactly(s, len(data)))
            s.sendall(data)
            assert hashlib.sha256(reader.result(60)).digest() == hashlib.sha256(data).digest()
        s.shutdown(socket.SHUT_WR)  # half-close travels to the TCP service and back
        assert s.recv(10) == b""
        s.close()
        # a second dial is a second QUIC connection (Go behaviour), and works too
        s2 = d.dial(go_serve.pubkey, timeout=15)
        assert s2._conn is not s._conn
        s2.settimeout(20)
        assert recv_exactly(s2, 20).startswith(b"220")
        s2.close()
    finally:
        d.close()


def test_go_serve_refused_without_opt_in(tls_relay, go_serve):
    d = _dialer(tls_relay)
    try:
        with pytest.raises(AuthenticationError, match="allow_unauthenticated"):
            d.dial(go_serve.pubkey, timeout=15)
    finally:
        d.close()


def test_go_join_to_our_listener(tls_relay, tmp_path, go_tool):
    ln = derpquic.listen(tls_relay.url, ssl_context=tls_relay.ssl_context())
    try:
        with GoDerpconnect.join(tls_relay, ln.addr.b64(), 0, tmp_path / "join", binary=go_tool) as j, \
                original_race_xfails(j):
            payload = os.urandom(1 << 20)
            with socket.create_connection(("127.0.0.1", j.listen_port), timeout=20) as c:
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)  # Go: CloseWrite -> FIN on the QUIC stream
                s = ln.accept(timeout=20)
                assert not s.authenticated
                s.settimeout(30)
                got = recv_all(s)
                assert got == payload
                assert s._conn.quic.max_datagram_size == GO_PACKET_SIZE
                s.sendall(hashlib.sha256(got).digest())
                s.close()
                c.settimeout(30)
                reply = b""
                while True:
                    b = c.recv(100)
                    if not b:
                        break
                    reply += b
                assert reply == hashlib.sha256(payload).digest()
    finally:
        ln.close()


def test_go_join_refused_by_require_auth(tls_relay, tmp_path, go_tool):
    ln = derpquic.listen(tls_relay.url, ssl_context=tls_relay.ssl_context(), require_auth=True)
    try:
        with GoDerpconnect.join(tls_relay, ln.addr.b64(), 0, tmp_path / "join", binary=go_tool) as j:
            with socket.create_connection(("127.0.0.1", j.listen_port), timeout=20) as c:
                c.sendall(b"let me in")
                with pytest.raises(TimeoutError):
                    ln.accept(timeout=2)
                c.settimeout(20)
                try:  # Go's dial failed: it closes the TCP connection
                    assert c.recv(10) == b""
                except ConnectionResetError:
                    pass
    finally:
        ln.close()


@pytest.mark.slow
def test_idle_tunnel_to_go_outlives_quic_go_idle_timeout(tls_relay, go_serve):
    """quic-go closes after 30 s of silence; our PINGs keep an idle tunnel up."""
    d = _dialer(tls_relay, allow_unauthenticated=True)
    try:
        s = d.dial(go_serve.pubkey, timeout=15)
        s.settimeout(20)
        assert recv_exactly(s, 20).startswith(b"220")
        s.settimeout(40)
        with pytest.raises(TimeoutError):  # 40 s of silence
            s.recv(1)
        s.settimeout(20)
        s.sendall(b"still here")
        assert recv_exactly(s, 10) == b"still here"
        s.close()
    finally:
        d.close()
