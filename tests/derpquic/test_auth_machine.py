"""The key-proof state machine (auth.KeyProof), pure: no QUIC, no sockets, no threads, no
clock. Every transition: good proofs, bad ones, oversized, missing, allow-lists, and peers
that cannot prove their key (Go) with and without allow_unauthenticated / require_auth."""

from __future__ import annotations

import pytest

from derpnet.errors import AuthenticationError
from derpnet.keys import PrivateKey, PublicKey
from derpquic import auth
from derpquic.auth import AuthPolicy, KeyProof, ProofState, Ready, Refuse, Role, SecretsCollector, SendProof
from derpquic.codes import AppError

CLIENT_KEY = PrivateKey.generate()
SERVER_KEY = PrivateKey.generate()
STRANGER = PrivateKey.generate()


def secrets(seed: int = 1) -> SecretsCollector:
    """What aioquic writes for one TLS session (both ends see the same lines)."""
    c = SecretsCollector()
    c.write(f"CLIENT_TRAFFIC_SECRET_0 {f'{seed:02x}' * 32} {'02' * 32}\n")
    c.write(f"SERVER_TRAFFIC_SECRET_0 {f'{seed:02x}' * 32} {'03' * 32}\n")
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


def server_hello(s: KeyProof) -> bytes:
    """What a server sends in its first flight once the client offered derpnet-auth."""
    h = only(s.protocol_negotiated(True), SendProof)
    assert not h.end and len(h.message) == auth.HELLO_LEN
    return h.message


def client_proof(session: int = 1, s: KeyProof | None = None, c: KeyProof | None = None) -> bytes:
    """The client's whole proof stream, answering the hello of `s` (a new server if None)."""
    s = s if s is not None else server(session=session)
    c = c if c is not None else client(session=session)
    assert c.handshake_completed(True) == []  # the client waits for the server's hello
    return only(c.proof_received(server_hello(s), False), SendProof).message


def started() -> tuple[KeyProof, KeyProof, bytes]:
    """A server whose hello went out, its client, and the client's proof."""
    s, c = server(), client()
    return s, c, client_proof(s=s, c=c)


# ---------------------------------------------------------------- both ours, good proofs


def test_full_exchange_both_sides_authenticated():
    c, s = client(), server()
    assert c.state is s.state is ProofState.HANDSHAKE
    hello = server_hello(s)  # 0.5-RTT: with the server's first flight
    assert hello.startswith(auth.MAGIC) and s.hello_sent and not s.sent
    assert c.handshake_completed(True) == []
    assert c.state is ProofState.PROVING and c.ours and not c.sent
    proof_c = only(c.proof_received(hello, False), SendProof).message
    assert len(proof_c) == auth.PROOF_MESSAGE_LEN and c.sent
    assert s.handshake_completed(True) == []  # the server waits for the client's proof
    assert s.state is ProofState.PROVING
    out = s.proof_received(proof_c, True)
    assert [type(a) for a in out] == [SendProof, Ready]
    assert out[0].end and len(hello + out[0].message) == auth.PROOF_MESSAGE_LEN
    assert out[1] == Ready(authenticated=True) and s.authenticated and s.state is ProofState.DONE
    assert c.proof_received(out[0].message, True) == [Ready(True)]
    assert c.authenticated and c.state is ProofState.DONE


def test_one_round_trip():
    """The client answers the hello that came with the server's handshake flight, in the same
    flight as its Finished; the server answers once; nothing else crosses."""
    c, s = client(), server()
    to_client = server_hello(s)
    c.handshake_completed(True)
    to_server = c.proof_received(to_client, False)
    s.handshake_completed(True)
    back = s.proof_received(to_server[0].message, True)
    assert c.proof_received(back[0].message, True) == [Ready(True)] and back[-1] == Ready(True)


def test_hello_before_the_clients_handshake_completes():
    c, s = client(), server()
    assert c.proof_received(server_hello(s), False) == []  # buffered
    proof_c = only(c.handshake_completed(True), SendProof).message
    s.handshake_completed(True)
    assert s.proof_received(proof_c, True)[-1] == Ready(True)


def test_server_sends_its_hello_at_handshake_completion_if_not_before():
    s = server()
    h = only(s.handshake_completed(True), SendProof)
    assert not h.end and len(h.message) == auth.HELLO_LEN
    assert s.protocol_negotiated(True) == []  # once


def test_no_hello_for_a_client_without_derpnet_auth():
    s = server()
    assert s.protocol_negotiated(False) == [] and not s.hello_sent
    assert client().protocol_negotiated(True) == []  # the client never sends one


def test_proof_in_pieces():
    s, c, proof_c = started()
    s.handshake_completed(True)
    for i in range(len(proof_c)):
        assert s.proof_received(proof_c[i:i + 1], False) == []
    out = s.proof_received(b"", True)
    assert isinstance(out[-1], Ready) and s.authenticated


def test_server_buffers_a_proof_that_arrives_before_its_handshake_completes():
    s, c, proof_c = started()
    assert s.proof_received(proof_c, True) == []
    out = s.handshake_completed(True)
    assert [type(a) for a in out] == [SendProof, Ready] and s.authenticated


def test_proofs_match_the_module_functions():
    binding = secrets().binding()
    s, c, proof_c = started()
    e_s = auth.parse_hello(auth.hello(s.ephemeral), SERVER_KEY.public_key)
    assert proof_c == auth.make_proof(CLIENT_KEY, SERVER_KEY.public_key, is_client=True, binding=binding,
                                      ephemeral=c.ephemeral, peer_ephemeral=e_s)
    auth.verify_proof(SERVER_KEY, CLIENT_KEY.public_key, proof_c, peer_is_client=True, binding=binding,
                      ephemeral=s.ephemeral)


def test_ephemeral_keys_are_fresh_per_connection():
    assert server().ephemeral != server().ephemeral
    assert client_proof()[:auth.HELLO_LEN] != client_proof()[:auth.HELLO_LEN]


def test_events_after_done_are_ignored():
    s, c, proof_c = started()
    s.handshake_completed(True)
    s.proof_received(proof_c, True)
    assert s.proof_received(b"more", True) == []
    assert s.handshake_completed(True) == []
    assert s.expire(1e9) == []
    assert s.state is ProofState.DONE


def test_each_side_sends_one_proof_only():
    c, s = client(), server()
    hello = server_hello(s)
    assert c.handshake_completed(True) == []
    assert len(c.proof_received(hello[:10], False)) == 0
    assert len(c.proof_received(hello[10:], False)) == 1
    assert c.handshake_completed(True) == [] and c.proof_received(b"", False) == []


# ---------------------------------------------------------------- key-compromise impersonation


def forge_client_proof(server_static: PrivateKey, claimed_client: PublicKey, server_hello_bytes: bytes,
                       binding: bytes) -> list[bytes]:
    """Everything a thief of the server's private key (who also runs the relay) can compute
    towards that server while claiming to be `claimed_client`: each DH term it can make, in
    every combination, with ephemerals of its choosing."""
    import itertools

    import nacl.bindings
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    e_s = auth.parse_hello(server_hello_bytes, SERVER_KEY.public_key)
    mine = PrivateKey.generate()  # the forger's ephemeral
    dh = nacl.bindings.crypto_scalarmult
    ss = dh(server_static.raw, claimed_client.raw)            # = DH(s_c, S_s): known to the thief
    es = dh(server_static.raw, mine.public_key.raw)           # = DH(e_c, S_s): known to the thief
    guesses = [dh(server_static.raw, e_s.raw), dh(mine.raw, e_s.raw), dh(mine.raw, claimed_client.raw), ss, es]
    forged = []
    for se in guesses:  # the real se = DH(e_s, S_c) needs the server's ephemeral or the client's key
        for parts in itertools.permutations([ss, es, se]):
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=auth.LABEL,
                       info=claimed_client.raw + SERVER_KEY.public_key.raw + mine.public_key.raw + e_s.raw
                       ).derive(b"".join(parts))
            forged.append(auth.hello(mine) + auth._mac(key, True, binding))
    return forged


def v1_proof(my_private: PrivateKey, peer: PublicKey, *, client: PublicKey, server: PublicKey, role: bytes,
             binding: bytes) -> bytes:
    """derpnet-auth/1 (retired): the MAC key from the static-static secret alone."""
    import hashlib
    import hmac

    import nacl.bindings
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    shared = nacl.bindings.crypto_scalarmult(my_private.raw, peer.raw)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"derpnet-auth/1", info=client.raw + server.raw
               ).derive(shared)
    return hmac.new(key, b"derpnet-auth/1 " + role + binding, hashlib.sha256).digest()


def test_v1_was_open_to_key_compromise_impersonation():
    """Why /1 was retired: with only the server's key, a client's /1 proof can be made."""
    binding = secrets().binding()
    genuine = v1_proof(CLIENT_KEY, SERVER_KEY.public_key, client=CLIENT_KEY.public_key,
                       server=SERVER_KEY.public_key, role=b"client", binding=binding)
    forged = v1_proof(SERVER_KEY, CLIENT_KEY.public_key, client=CLIENT_KEY.public_key,
                      server=SERVER_KEY.public_key, role=b"client", binding=binding)
    assert forged == genuine


def test_a_stolen_server_key_cannot_forge_a_client_proof():
    """Key-compromise impersonation: the thief of the server's private key, who also routes
    the packets, claims to be an allowed client. Every proof it can compute is refused."""
    allowed = frozenset({CLIENT_KEY.public_key})
    binding = secrets().binding()
    for i in range(30):
        s = server(AuthPolicy(allow=allowed))
        forgeries = forge_client_proof(SERVER_KEY, CLIENT_KEY.public_key, server_hello(s), binding)
        assert len(forgeries) == 30
        forged = forgeries[i]
        s.handshake_completed(True)
        refused(s.proof_received(forged, True), AppError.AUTH_FAILED, AuthenticationError)
        assert not s.authenticated and not s.sent


def test_a_stolen_client_key_cannot_forge_a_server_proof():
    """The other way round: the thief of a client's key answers that client as the server."""
    c = client()
    c.handshake_completed(True)
    thief_ephemeral = PrivateKey.generate()
    c.proof_received(auth.hello(thief_ephemeral), False)
    binding = secrets().binding()
    # It knows ss (via the client's key) and se (its own ephemeral with the client's key), but
    # es = DH(client ephemeral, server static) needs the server's key or the client's ephemeral.
    forged = auth.make_proof(CLIENT_KEY, SERVER_KEY.public_key, is_client=False, binding=binding,
                             ephemeral=thief_ephemeral, peer_ephemeral=c.ephemeral.public_key)
    refused(c.proof_received(forged[auth.HELLO_LEN:], True), AppError.AUTH_FAILED, AuthenticationError)
    assert not c.authenticated


def test_low_order_ephemeral_refused():
    c = client()
    c.handshake_completed(True)
    r = refused(c.proof_received(auth.MAGIC + bytes(32), False), AppError.AUTH_FAILED, AuthenticationError)
    assert "low-order" in str(r.error)


# ---------------------------------------------------------------- bad proofs


@pytest.mark.parametrize("message, why", [
    (lambda s: client_proof(s=s, c=client(session=2)), "made for another TLS session (a relaying man in the middle)"),
    (lambda s: client_proof(s=server()), "made for another server ephemeral (a replayed proof)"),
    (lambda s: client_proof(s=s, c=client(key=STRANGER)), "made with another key"),
    (lambda s: auth.make_proof(SERVER_KEY, CLIENT_KEY.public_key, is_client=False, binding=secrets().binding(),
                               ephemeral=s.ephemeral, peer_ephemeral=s.ephemeral.public_key),
     "the server's own proof reflected back"),
    (lambda s: client_proof(s=s)[:-1], "truncated"),
    (lambda s: b"XXXX" + client_proof(s=s)[4:], "wrong magic"),
    (lambda s: bytes(auth.PROOF_MESSAGE_LEN), "zeros"),
])
def test_bad_proof_refused(message, why):
    s = server()
    m = message(s)
    s.handshake_completed(True)
    r = refused(s.proof_received(m, True), AppError.AUTH_FAILED, AuthenticationError)
    assert r.reason == "authentication failed"
    assert s.state is ProofState.REFUSED and not s.authenticated
    assert s.proof_received(b"", True) == []  # nothing more happens


def test_bad_server_proof_refused_by_the_client():
    c, s = client(), server()
    c.handshake_completed(True)
    c.proof_received(server_hello(s), False)
    # An impostor's genuine proof for this session, made with its own key.
    fake_proof = auth.make_proof(STRANGER, CLIENT_KEY.public_key, is_client=False, binding=secrets().binding(),
                                 ephemeral=s.ephemeral, peer_ephemeral=c.ephemeral.public_key)
    r = refused(c.proof_received(fake_proof[auth.HELLO_LEN:], True), AppError.AUTH_FAILED, AuthenticationError)
    assert "could not prove" in str(r.error)


def test_server_ending_its_stream_after_the_hello_is_refused():
    c = client()
    c.handshake_completed(True)
    c_out = c.proof_received(server_hello(server()), False)
    assert len(c_out) == 1
    refused(c.proof_received(b"", True), AppError.AUTH_FAILED, AuthenticationError)


def test_server_ending_its_stream_before_the_hello_is_refused():
    c = client()
    c.handshake_completed(True)
    refused(c.proof_received(auth.MAGIC, True), AppError.AUTH_FAILED, AuthenticationError)


def test_oversized_proof_refused_before_it_ends():
    s, c, proof_c = started()
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
    assert c.handshake_completed(True) == []
    r = refused(c.proof_received(server_hello(server()), False), AppError.AUTH_FAILED, AuthenticationError)
    assert "secrets unavailable" in str(r.error)


def test_low_order_peer_key_refused():
    c = client(peer=PublicKey(bytes(32)))
    c.handshake_completed(True)
    refused(c.proof_received(server_hello(server()), False), AppError.AUTH_FAILED, AuthenticationError)


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
    proof_c = client_proof(s=s)
    assert s.handshake_completed(True) == []
    assert s.proof_received(proof_c, True)[-1] == Ready(True)


def test_allow_list_sends_no_hello_to_another_key():
    s = server(AuthPolicy(allow=frozenset({STRANGER.public_key})))
    assert s.protocol_negotiated(True) == [] and not s.hello_sent


def test_allow_list_still_wants_a_proof():
    s = server(AuthPolicy(allow=frozenset({CLIENT_KEY.public_key})))
    proof_c = client_proof(s=s, c=client(session=9))
    s.handshake_completed(True)
    refused(s.proof_received(proof_c, True), AppError.AUTH_FAILED, AuthenticationError)


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
    proof_c = client_proof(s=s)
    s.handshake_completed(True)
    allow.clear()
    r = refused(s.proof_received(proof_c, True), AppError.NOT_ALLOWED, ConnectionRefusedError)
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
    proof_c = client_proof(s=s)
    s.handshake_completed(True)
    assert s.proof_received(proof_c, True)[-1] == Ready(True)


def test_allow_unauthenticated_still_verifies_our_peers():
    """allow_unauthenticated is for peers that cannot prove; one that tries must succeed."""
    c = client(AuthPolicy(allow_unauthenticated=True))
    c.handshake_completed(True)
    c.proof_received(server_hello(server()), False)
    refused(c.proof_received(bytes(auth.MAC_LEN), True), AppError.AUTH_FAILED, AuthenticationError)


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
    stranger_proof = client_proof(s=s, c=client(key=STRANGER))  # well-formed, from another key
    s.handshake_completed(True)
    assert s.proof_received(stranger_proof, True)[-1] == Ready(True)


def test_role():
    assert Role.CLIENT.is_client and not Role.SERVER.is_client
