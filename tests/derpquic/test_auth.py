"""Peer authentication: node-key proofs bound to the TLS session; men in the middle refused."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import derpquic
from derpnet.errors import AuthenticationError
from derpnet.keys import PrivateKey
from derpquic import auth
from derpquic.auth import KeyProof
from derpquic.conn import Conn, ConnState
from derpquic.driver import Driver
from tests.derpquic.fakes import AddressRewriter
from tests.derpquic.helpers import Background, EchoServer, recv_all


# ---------------------------------------------------------------- unit level

def test_proof_roundtrip_and_binding():
    a, b = PrivateKey.generate(), PrivateKey.generate()
    binding = bytes(range(32))
    p = auth.make_proof(a, b.public_key, is_client=True, binding=binding)
    auth.verify_proof(b, a.public_key, p, peer_is_client=True, binding=binding)
    with pytest.raises(AuthenticationError):  # another session
        auth.verify_proof(b, a.public_key, p, peer_is_client=True, binding=bytes(32))
    with pytest.raises(AuthenticationError):  # reflected back as the other role
        auth.verify_proof(a, b.public_key, p, peer_is_client=False, binding=binding)
    m = PrivateKey.generate()
    with pytest.raises(AuthenticationError):  # made by someone else
        auth.verify_proof(b, a.public_key, auth.make_proof(m, b.public_key, is_client=True, binding=binding),
                          peer_is_client=True, binding=binding)
    with pytest.raises(AuthenticationError):
        auth.verify_proof(b, a.public_key, p[:-1], peer_is_client=True, binding=binding)


def test_low_order_key_refused():
    a = PrivateKey.generate()
    from derpnet.keys import PublicKey
    with pytest.raises(AuthenticationError):
        auth.make_proof(a, PublicKey(bytes(32)), is_client=True, binding=bytes(32))


def test_secrets_collector_parses_keylog_lines():
    c = auth.SecretsCollector()
    with pytest.raises(AuthenticationError):
        c.binding()
    c.write("CLIENT_HANDSHAKE_TRAFFIC_SECRET aa bb\n")
    c.write("CLIENT_TRAFFIC_SECRET_0 %s %s\n" % ("01" * 32, "02" * 32))
    c.write("SERVER_TRAFFIC_SECRET_0 %s %s\n" % ("01" * 32, "03" * 32))
    assert c.binding() == auth.session_binding(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32)


# ---------------------------------------------------------------- end to end

def test_both_sides_authenticated(net):
    ln = net.listener(require_auth=True)
    d = net.dialer()
    acc = Background(lambda: ln.accept(timeout=10))
    s = d.dial(ln.addr, timeout=10)
    r = acc.result()
    assert s.authenticated and r.authenticated
    assert r.remote_addr() == d.addr and s.remote_addr() == ln.addr
    s.close()
    r.close()


def test_relay_impersonation_refused(net):
    """The relay routes our dial for B to an impostor M holding another key: refused."""
    ln_b = net.listener()
    ln_m = net.listener()  # the impostor, an ordinary listener with its own key
    a_pc = net.pc()
    victim_view = AddressRewriter(a_pc, victim=ln_b.addr, impostor=ln_m.addr)
    d = net.track(derpquic.Dialer(victim_view, a_pc_key(a_pc)))
    with pytest.raises(AuthenticationError):
        d.dial(ln_b.addr, timeout=10)
    # Neither listener yielded a stream.
    with pytest.raises(TimeoutError):
        ln_m.accept(timeout=0.3)
    with pytest.raises(TimeoutError):
        ln_b.accept(timeout=0.05)


def a_pc_key(pc):
    return pc.private_key


class LenientProof(KeyProof):
    """An impostor that skips verifying the dialler and answers with its own proof."""

    def verify(self, message, binding):
        pass


class LenientDriver(Driver):
    key_proof_class = LenientProof


def test_lenient_impostor_refused_by_dialer(fake):
    ln_b = fake.listener()
    m_pc = fake.pc()
    LenientDriver.acquire(m_pc, m_pc.private_key)  # the Listener below picks this driver up
    ln_m = fake.track(derpquic.Listener(m_pc))
    m_pc_driver = ln_m._driver
    assert isinstance(m_pc_driver, LenientDriver)
    m_pc_driver.release()  # balance our own acquire
    a_pc = fake.pc()
    d = fake.track(derpquic.Dialer(AddressRewriter(a_pc, ln_b.addr, ln_m.addr)))
    with pytest.raises(AuthenticationError, match="could not prove"):
        d.dial(ln_b.addr, timeout=10)


class CapturingProof(KeyProof):
    """Leg 1 of a relaying MITM: accepts the dialler, keeps its proof, never answers."""

    captured = None
    got = threading.Event()

    def proof_received(self, data, end):
        self.received += data
        if end and CapturingProof.captured is None:
            CapturingProof.captured = bytes(self.received)
            CapturingProof.got.set()
        return []


class CapturingDriver(Driver):
    key_proof_class = CapturingProof


class ForwardingProof(KeyProof):
    """Leg 2: dials the real listener, presents the captured proof as its own and does not
    care who B is."""

    def make_proof(self, binding):
        return CapturingProof.captured

    def verify(self, message, binding):
        pass


class ForwardingDriver(Driver):
    key_proof_class = ForwardingProof


def test_relaying_mitm_cannot_reuse_proof_on_other_leg(fake):
    """A relay that runs two QUIC sessions (A<->M1, M2<->B) and forwards A's proof to B.

    The key part of the proof is right (A made it for B), only the session binding
    differs; B must refuse, and must not yield a stream."""
    CapturingProof.captured = None
    CapturingProof.got.clear()
    a_pc = fake.pc()
    b_pc = fake.pc()
    m1_pc = fake.pc()
    m2_pc = fake.pc()
    a, b = a_pc.local_addr(), b_pc.local_addr()
    # B's view: packets from M2 appear to come from A (and B's answers to A reach M2).
    ln_b = fake.track(derpquic.Listener(AddressRewriter(b_pc, victim=a, impostor=m2_pc.local_addr()),
                                        b_pc.private_key, allow=[a]))
    # M1 pretends to be B towards A.
    CapturingDriver.acquire(m1_pc, m1_pc.private_key)
    ln_m1 = fake.track(derpquic.Listener(m1_pc))
    ln_m1._driver.release()
    d_a = fake.track(derpquic.Dialer(AddressRewriter(a_pc, victim=b, impostor=m1_pc.local_addr())))
    dial_a = Background(lambda: d_a.dial(b, timeout=2))
    assert CapturingProof.got.wait(10), "leg 1 never delivered A's proof"
    # Leg 2: M2 dials B, presenting A's proof.
    ForwardingDriver.acquire(m2_pc, m2_pc.private_key)
    d_m2 = fake.track(derpquic.Dialer(m2_pc))
    d_m2._driver.release()
    with pytest.raises(AuthenticationError, match="rejected our key proof"):
        d_m2.dial(b, timeout=10)  # B closed the connection: the proof is not for this session
    with pytest.raises(TimeoutError):
        ln_b.accept(timeout=0.3)
    with pytest.raises((TimeoutError, AuthenticationError)):
        dial_a.result(timeout=15)


def test_allow_list(net):
    allowed = net.dialer()
    stranger = net.dialer()
    ln = net.listener(allow=[allowed.addr])
    srv = EchoServer(ln)
    with pytest.raises(ConnectionRefusedError):
        stranger.dial(ln.addr, timeout=10)
    with allowed.dial(ln.addr, timeout=10) as s:
        s.settimeout(10)
        s.sendall(b"ok")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"ok"
    srv.close()
    assert srv.accepted == 1


def test_allow_list_impostor_with_allowed_address_refused(net):
    """The relay claims packets from an impostor come from an allowed key: still refused."""
    good = PrivateKey.generate()
    ln_pc = net.pc()
    impostor = net.dialer()
    view = AddressRewriter(ln_pc, victim=good.public_key, impostor=impostor.addr)
    ln = net.track(derpquic.Listener(view, a_pc_key(ln_pc), allow=[good.public_key]))
    with pytest.raises((AuthenticationError, ConnectionRefusedError)):
        impostor.dial(ln.addr, timeout=10)
    with pytest.raises(TimeoutError):
        ln.accept(timeout=0.3)


class ProoflessConn(Conn):
    """A dialler that completes the QUIC handshake (offering derpnet-auth), never sends its
    key proof, and opens a stream with data at once, hoping to be buffered forever."""

    def send_proof(self, message):
        sid = self.quic.get_next_available_stream_id()
        self.quic.send_stream_data(sid, b"x" * 4096, end_stream=False)


class ProoflessDriver(Driver):
    conn_class = ProoflessConn


def test_listener_drops_a_peer_that_never_proves_its_key(fake):
    """Without a deadline a peer that stalls in the key-proof phase holds the connection,
    and the unread data of its pending streams, for as long as it keeps sending PINGs."""
    ln = fake.listener(require_auth=True, dial_timeout=1.0)
    a_pc = fake.pc()
    ProoflessDriver.acquire(a_pc, a_pc.private_key)
    d = fake.track(derpquic.Dialer(a_pc))
    d._driver.release()
    assert isinstance(d._driver, ProoflessDriver)
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="requires peers to prove their key"):
        d.dial(ln.addr, timeout=8)
    assert time.monotonic() - start < 6
    with pytest.raises(TimeoutError):
        ln.accept(timeout=0.3)
    with ln._driver.lock:
        assert all(c.state is ConnState.CLOSED for c in ln._driver.conns)
