"""Peer authentication: node-key proofs bound to the TLS session; men in the middle refused."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
import time

import nacl.bindings
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import derpquic
from derpnet.errors import AuthenticationError
from derpnet.keys import PrivateKey, PublicKey
from derpquic import auth
from derpquic.auth import KeyProof
from derpquic.conn import Conn, ConnState
from derpquic.driver import Driver
from tests.derpquic.fakes import AddressRewriter
from tests.derpquic.helpers import Background, EchoServer, recv_all

# ---------------------------------------------------------------- unit level

def _exchange(client_key, server_key, binding):
    """Both proofs of one session, made with the module functions."""
    e_c, e_s = PrivateKey.generate(), PrivateKey.generate()
    p_c = auth.make_proof(client_key, server_key.public_key, is_client=True, binding=binding,
                          ephemeral=e_c, peer_ephemeral=e_s.public_key)
    p_s = auth.make_proof(server_key, client_key.public_key, is_client=False, binding=binding,
                          ephemeral=e_s, peer_ephemeral=e_c.public_key)
    return e_c, e_s, p_c, p_s


def test_proof_roundtrip_and_binding():
    a, b = PrivateKey.generate(), PrivateKey.generate()
    binding = bytes(range(32))
    e_a, e_b, p, p_b = _exchange(a, b, binding)
    auth.verify_proof(b, a.public_key, p, peer_is_client=True, binding=binding, ephemeral=e_b)
    auth.verify_proof(a, b.public_key, p_b, peer_is_client=False, binding=binding, ephemeral=e_a)
    with pytest.raises(AuthenticationError):  # another session
        auth.verify_proof(b, a.public_key, p, peer_is_client=True, binding=bytes(32), ephemeral=e_b)
    with pytest.raises(AuthenticationError):  # answering another ephemeral of ours (a replay)
        auth.verify_proof(b, a.public_key, p, peer_is_client=True, binding=binding, ephemeral=PrivateKey.generate())
    with pytest.raises(AuthenticationError):  # reflected back as the other role
        auth.verify_proof(a, b.public_key, p, peer_is_client=False, binding=binding, ephemeral=e_a)
    m = PrivateKey.generate()
    with pytest.raises(AuthenticationError):  # made by someone else
        auth.verify_proof(b, a.public_key, _exchange(m, b, binding)[2], peer_is_client=True, binding=binding,
                          ephemeral=e_b)
    with pytest.raises(AuthenticationError):
        auth.verify_proof(b, a.public_key, p[:-1], peer_is_client=True, binding=binding, ephemeral=e_b)


def test_low_order_key_refused():
    a = PrivateKey.generate()
    e = PrivateKey.generate()
    with pytest.raises(AuthenticationError):
        auth.make_proof(a, PublicKey(bytes(32)), is_client=True, binding=bytes(32), ephemeral=e,
                        peer_ephemeral=PrivateKey.generate().public_key)
    with pytest.raises(AuthenticationError, match="ephemeral"):
        auth.make_proof(a, PrivateKey.generate().public_key, is_client=True, binding=bytes(32), ephemeral=e,
                        peer_ephemeral=PublicKey(bytes(32)))


def test_secrets_collector_parses_keylog_lines():
    c = auth.SecretsCollector()
    with pytest.raises(AuthenticationError):
        c.binding()
    c.write("CLIENT_HANDSHAKE_TRAFFIC_SECRET aa bb\n")
    c.write(f"CLIENT_TRAFFIC_SECRET_0 {'01' * 32} {'02' * 32}\n")
    c.write(f"SERVER_TRAFFIC_SECRET_0 {'01' * 32} {'03' * 32}\n")
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

    def send_proof(self, message, end=True):
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


# ---------------------------------------------------------------- key-compromise impersonation


class KCIProof(KeyProof):
    """The dialler of a key-compromise impersonation. The attacker stole the listener's
    private key and runs the relay (which rewrites its address into an allowed client's):
    it makes the best client proof that key allows. `claimed` is that client's public key,
    or its private key for the control run (then the proof is genuine)."""

    server_private: PrivateKey
    claimed: PrivateKey | PublicKey

    def make_proof(self, binding):
        claimed = KCIProof.claimed
        if isinstance(claimed, PrivateKey):
            return auth.make_proof(claimed, self.peer, is_client=True, binding=binding,
                                   ephemeral=self.ephemeral, peer_ephemeral=self.peer_ephemeral)
        dh = nacl.bindings.crypto_scalarmult
        s_s = KCIProof.server_private.raw
        e_m, e_s = self.ephemeral.public_key, self.peer_ephemeral
        ss = dh(s_s, claimed.raw)     # = DH(client static, server static)
        es = dh(s_s, e_m.raw)         # = DH(our ephemeral, server static)
        se = dh(s_s, e_s.raw)         # a guess: the real one is DH(server ephemeral, client static)
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=auth.LABEL,
                   info=claimed.raw + self.peer.raw + e_m.raw + e_s.raw).derive(ss + es + se)
        mac = hmac.new(key, auth.LABEL + b" client" + binding, hashlib.sha256).digest()
        return auth.hello(self.ephemeral) + mac

    def verify(self, message, binding):
        pass  # the attacker does not care who answers


class KCIDriver(Driver):
    key_proof_class = KCIProof


def _kci_dial(fake, claimed):
    """An allow-listed listener whose private key the attacker holds; the relay (the attacker)
    makes the attacker's packets look as if they came from the allowed client."""
    client = PrivateKey.generate()
    s_pc, m_pc = fake.pc(), fake.pc()
    ln = fake.track(derpquic.Listener(AddressRewriter(s_pc, victim=client.public_key, impostor=m_pc.local_addr()),
                                      s_pc.private_key, allow=[client.public_key]))
    KCIProof.server_private = s_pc.private_key
    KCIProof.claimed = client if claimed == "client key" else client.public_key
    KCIDriver.acquire(m_pc, m_pc.private_key)
    d = fake.track(derpquic.Dialer(m_pc))
    d._driver.release()
    assert isinstance(d._driver, KCIDriver)
    return ln, d, client


def test_stolen_listener_key_cannot_impersonate_an_allowed_client(fake):
    """Issue 9, item 8: with derpnet-auth/1 the listener's key alone made a valid proof for
    any client (the MAC key was the static-static secret). Now the proof also needs
    DH(listener's ephemeral, client's key): refused, and no stream is yielded."""
    ln, d, client = _kci_dial(fake, "listener key")
    with pytest.raises(AuthenticationError, match="rejected our key proof"):
        d.dial(ln.addr, timeout=10)
    with pytest.raises(TimeoutError):
        ln.accept(timeout=0.3)


def test_kci_harness_control_with_the_clients_key(fake):
    """The same harness with the client's own key gets through: only the key makes the difference."""
    ln, d, client = _kci_dial(fake, "client key")
    with d.dial(ln.addr, timeout=10) as s:
        s.sendall(b"x")
        with ln.accept(timeout=10) as r:
            assert r.authenticated and r.remote_addr() == client.public_key


# ---------------------------------------------------------------- peer_key (issue 9, item 9)


def test_peer_key_is_the_proven_key_only(net):
    ln = net.listener()
    d = net.dialer()
    acc = Background(lambda: ln.accept(timeout=10))
    with d.dial(ln.addr, timeout=10) as s, acc.result() as r:
        assert s.peer_key == ln.addr and r.peer_key == d.addr


def test_peer_key_is_none_for_a_peer_that_cannot_prove_its_key():
    """A Go peer (no derpnet-auth): remote_addr() is only what the relay says; peer_key None."""
    from derpquic.auth import AuthPolicy
    from tests.derpquic.test_conn_memory import Pair

    p = Pair(client_policy=AuthPolicy(allow_unauthenticated=True), server_alpn=False).connect()
    s = p.call(p.client, "open_stream")
    p.run(lambda: len(p.so.streams) == 1, seconds=1)
    r = p.so.streams[0]
    assert s.remote_addr() == p.server.local and s.peer_key is None and not s.authenticated
    assert r.remote_addr() == p.client.local and r.peer_key is None and not r.authenticated
