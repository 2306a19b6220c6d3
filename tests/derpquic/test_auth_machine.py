"""The key-proof state machine (auth.KeyProof), pure: no QUIC, no sockets, no threads, no
clock. Every transition: good proofs, bad ones, oversized, missing, allow-lists, and peers
that cannot prove their key (Go) with and without allow_unauthenticated / require_auth."""

from __future__ import annotations

import pytest

from derpnet.errors import AuthenticationError
from derpnet.keys import PrivateKey, PublicKey
from derpquic import auth
from derpquic.auth import (AuthPolicy, KeyProof, ProofState, Ready, Refuse, Role, SecretsCollector,
                           SendProof)
from derpquic.codes import AppError

CLIENT_KEY = PrivateKey.generate()
SERVER_KEY = PrivateKey.generate()
STRANGER = PrivateKey.generate()


def secrets(seed: int = 1) -> SecretsCollector:
    """What aioquic writes for one TLS session (both ends see the same lines)."""
    c = SecretsCollector()
    c.write(f"CLIENT_TRAFFIC_SECRET_0 {'%02x' % seed * 32} {'02' * 32}\n")
    c.write(f"SERVER_TRAFFIC_SECRET_0 {'%02x' % seed * 32} {'03' * 32}\n")
    return c


def client(policy: AuthPolicy = AuthPolicy(), key: PrivateKey = CLIENT_KEY,
           peer: PublicKey = SERVER_KEY.public_key, session: int = 1) -> KeyProof:
    return KeyProof(key, peer, Role.CLIENT, policy, secrets=secrets(session))


def server(policy: AuthPolicy = AuthPolicy(), key: PrivateKey = SERVER_KEY,
           peer: PublicKey = CLIENT_KEY.public_key, session: int = 1, now: float = 100.0,
           timeout: float | None = 20.0) -> KeyProof:
    return KeyProof(key, peer, Role.SERVER, policy, now=now, timeout=timeout, secrets=secrets(session))


def only(actions, kind):
    assert len(actions) == 1 and isinstance(actions[0], kind), actions
    return actions[0]


def refused(actions, code: AppError, error: type[BaseException]) -> Refuse:
    r = only(actions, Refuse)
    assert r.code is code and isinstance(r.error, error), r
    return r


def client_proof(session: int = 1) -> bytes:
    return only(client(session=session).handshake_completed(True), SendProof).message


# ---------------------------------------------------------------- both ours, good proofs


def test_full_exchange_both_sides_authenticated():
    c, s = client(), server()
    assert c.state is s.state is ProofState.HANDSHAKE
    proof_c = only(c.handshake_completed(True), SendProof).message
    assert c.state is ProofState.PROVING and c.ours and c.sent
    assert s.handshake_completed(True) == []  # the server waits for the client's proof
    assert s.state is ProofState.PROVING
    out = s.proof_received(proof_c, True)
    assert [type(a) for a in out] == [SendProof, Ready]
    assert out[1] == Ready(authenticated=True) and s.authenticated and s.state is ProofState.DONE
    assert c.proof_received(out[0].message, True) == [Ready(True)]
    assert c.authenticated and c.state is ProofState.DONE


def test_proof_in_pieces():
    c, s = client(), server()
    proof_c = only(c.handshake_completed(True), SendProof).message
    s.handshake_completed(True)
    for i in range(len(proof_c)):
        assert s.proof_received(proof_c[i:i + 1], False) == []
    out = s.proof_received(b"", True)
    assert isinstance(out[-1], Ready) and s.authenticated


def test_server_buffers_a_proof_that_arrives_before_its_handshake_completes():
    s = server()
    assert s.proof_received(client_proof(), True) == []
    out = s.handshake_completed(True)
    assert [type(a) for a in out] == [SendProof, Ready] and s.authenticated


def test_client_buffers_the_servers_proof_until_its_handshake_completes():
    c, s = client(), server()
    s.handshake_completed(True)
    proof_s = s.proof_received(client_proof(), True)[0].message
    assert c.proof_received(proof_s, True) == []
    out = c.handshake_completed(True)
    assert [type(a) for a in out] == [SendProof, Ready] and c.authenticated


def test_proofs_match_the_module_functions():
    binding = secrets().binding()
    proof_c = client_proof()
    assert proof_c == auth.make_proof(CLIENT_KEY, SERVER_KEY.public_key, is_client=True, binding=binding)
    auth.verify_proof(SERVER_KEY, CLIENT_KEY.public_key, proof_c, peer_is_client=True, binding=binding)


def test_events_after_done_are_ignored():
    c, s = client(), server()
    proof_c = only(c.handshake_completed(True), SendProof).message
    s.handshake_completed(True)
    s.proof_received(proof_c, True)
    assert s.proof_received(b"more", True) == []
    assert s.handshake_completed(True) == []
    assert s.expire(1e9) == []
    assert s.state is ProofState.DONE


def test_each_side_sends_one_proof_only():
    c = client()
    assert len(c.handshake_completed(True)) == 1
    assert c.handshake_completed(True) == []


# ---------------------------------------------------------------- bad proofs


@pytest.mark.parametrize("message, why", [
    (lambda: client_proof(session=2), "made for another TLS session (a relaying man in the middle)"),
    (lambda: auth.make_proof(STRANGER, SERVER_KEY.public_key, is_client=True, binding=secrets().binding()),
     "made with another key"),
    (lambda: auth.make_proof(SERVER_KEY, CLIENT_KEY.public_key, is_client=False, binding=secrets().binding()),
     "the server's own proof reflected back"),
    (lambda: client_proof()[:-1], "truncated"),
    (lambda: b"XXXX" + client_proof()[4:], "wrong magic"),
    (lambda: bytes(auth.PROOF_MESSAGE_LEN), "zeros"),
])
def test_bad_proof_refused(message, why):
    s = server()
    s.handshake_completed(True)
    r = refused(s.proof_received(message(), True), AppError.AUTH_FAILED, AuthenticationError)
    assert r.reason == "authentication failed"
    assert s.state is ProofState.REFUSED and not s.authenticated
    assert s.proof_received(b"", True) == []  # nothing more happens


def test_bad_server_proof_refused_by_the_client():
    c = client()
    c.handshake_completed(True)
    # An impostor's genuine proof for this session, made with its own key.
    fake_proof = auth.make_proof(STRANGER, CLIENT_KEY.public_key, is_client=False, binding=secrets().binding())
    r = refused(c.proof_received(fake_proof, True), AppError.AUTH_FAILED, AuthenticationError)
    assert "could not prove" in str(r.error)


def test_oversized_proof_refused_before_it_ends():
    s = server()
    s.handshake_completed(True)
    assert s.proof_received(bytes(auth.PROOF_MESSAGE_LEN), False) == []
    r = refused(s.proof_received(b"x", False), AppError.AUTH_FAILED, AuthenticationError)
    assert "oversized" in str(r.error)


def test_oversized_proof_refused_even_before_the_handshake():
    s = server()
    refused(s.proof_received(bytes(1000), False), AppError.AUTH_FAILED, AuthenticationError)


def test_empty_proof_stream_refused():
    s = server()
    s.handshake_completed(True)
    refused(s.proof_received(b"", True), AppError.AUTH_FAILED, AuthenticationError)


def test_missing_session_secrets_refused():
    c = KeyProof(CLIENT_KEY, SERVER_KEY.public_key, Role.CLIENT)  # aioquic wrote no key log lines
    r = refused(c.handshake_completed(True), AppError.AUTH_FAILED, AuthenticationError)
    assert "secrets unavailable" in str(r.error)


def test_low_order_peer_key_refused():
    c = client(peer=PublicKey(bytes(32)))
    refused(c.handshake_completed(True), AppError.AUTH_FAILED, AuthenticationError)


# ---------------------------------------------------------------- missing proof: the deadline


def test_server_refuses_a_peer_that_never_proves_its_key():
    s = server(now=100.0, timeout=20.0)
    assert s.wake_at == 120.0
    s.handshake_completed(True)
    assert s.expire(119.9) == []
    r = refused(s.expire(120.0), AppError.AUTH_REQUIRED, TimeoutError)
    assert r.reason == "authentication timed out" and "20 s" in str(r.error)
    assert s.wake_at is None


def test_server_deadline_covers_the_handshake_too():
    s = server(now=0.0, timeout=5.0)
    refused(s.expire(6.0), AppError.AUTH_REQUIRED, TimeoutError)


def test_no_deadline_once_done():
    s = server(now=0.0, timeout=5.0)
    s.handshake_completed(False)  # a Go peer, accepted
    assert s.wake_at is None and s.expire(100.0) == []


def test_client_has_no_deadline():
    c = client()
    assert c.wake_at is None and c.expire(1e9) == []


# ---------------------------------------------------------------- allow-lists


def test_allow_list_refuses_another_key_at_the_handshake():
    s = server(AuthPolicy(allow=frozenset({STRANGER.public_key})))
    r = refused(s.handshake_completed(True), AppError.NOT_ALLOWED, ConnectionRefusedError)
    assert r.reason == "not allowed" and s.state is ProofState.REFUSED


def test_allow_list_refuses_another_key_that_speaks_no_auth():
    s = server(AuthPolicy(allow=frozenset({STRANGER.public_key})))
    refused(s.handshake_completed(False), AppError.NOT_ALLOWED, ConnectionRefusedError)


def test_allow_list_lets_a_listed_key_prove_itself():
    s = server(AuthPolicy(allow=frozenset({CLIENT_KEY.public_key})))
    assert s.handshake_completed(True) == []
    assert s.proof_received(client_proof(), True)[-1] == Ready(True)


def test_allow_list_still_wants_a_proof():
    s = server(AuthPolicy(allow=frozenset({CLIENT_KEY.public_key})))
    s.handshake_completed(True)
    refused(s.proof_received(client_proof(session=9), True), AppError.AUTH_FAILED, AuthenticationError)


def test_allow_list_refuses_a_listed_key_that_cannot_prove_it():
    s = server(AuthPolicy(allow=frozenset({CLIENT_KEY.public_key})))
    refused(s.handshake_completed(False), AppError.AUTH_REQUIRED, AuthenticationError)


def test_allow_list_checked_again_after_the_proof():
    """Defence in depth: a policy that changes its mind refuses even a good proof."""
    allow = {CLIENT_KEY.public_key}

    class Shrinking(frozenset):
        def __contains__(self, key):
            return key in allow

    s = server(AuthPolicy(allow=Shrinking()))
    s.handshake_completed(True)
    allow.clear()
    r = refused(s.proof_received(client_proof(), True), AppError.NOT_ALLOWED, ConnectionRefusedError)
    assert "proved its key" in r.detail
    assert s.sent is False  # the refused peer never gets our proof


# ---------------------------------------------------------------- peers that cannot prove (Go)


def test_client_refuses_an_unprovable_server_by_default():
    c = client()
    r = refused(c.handshake_completed(False), AppError.AUTH_REQUIRED, AuthenticationError)
    assert "allow_unauthenticated=True" in str(r.error) and r.reason == "authentication required"
    assert not c.ours and not c.sent


def test_client_accepts_an_unprovable_server_when_allowed():
    c = client(AuthPolicy(allow_unauthenticated=True))
    assert c.handshake_completed(False) == [Ready(False)]
    assert c.state is ProofState.DONE and not c.authenticated and not c.sent


def test_server_accepts_an_unprovable_client_by_default():
    s = server()
    assert s.handshake_completed(False) == [Ready(False)]
    assert not s.authenticated


def test_server_refuses_an_unprovable_client_with_require_auth():
    s = server(AuthPolicy(require_auth=True))
    r = refused(s.handshake_completed(False), AppError.AUTH_REQUIRED, AuthenticationError)
    assert "cannot prove" in str(r.error)


def test_require_auth_accepts_a_proof():
    s = server(AuthPolicy(require_auth=True))
    s.handshake_completed(True)
    assert s.proof_received(client_proof(), True)[-1] == Ready(True)


def test_allow_unauthenticated_still_verifies_our_peers():
    """allow_unauthenticated is for peers that cannot prove; one that tries must succeed."""
    c = client(AuthPolicy(allow_unauthenticated=True))
    c.handshake_completed(True)
    refused(c.proof_received(bytes(auth.PROOF_MESSAGE_LEN), True), AppError.AUTH_FAILED, AuthenticationError)


def test_an_unprovable_peers_stream_bytes_are_ignored():
    s = server()
    s.handshake_completed(False)
    assert s.proof_received(b"whatever", True) == []
    assert s.state is ProofState.DONE and not s.authenticated


# ---------------------------------------------------------------- overridable proof


def test_subclass_hooks():
    class Lenient(KeyProof):
        def verify(self, message, binding):
            pass

    s = Lenient(SERVER_KEY, CLIENT_KEY.public_key, Role.SERVER, secrets=secrets())
    s.handshake_completed(True)
    assert s.proof_received(b"nonsense", True)[-1] == Ready(True)


def test_role():
    assert Role.CLIENT.is_client and not Role.SERVER.is_client
