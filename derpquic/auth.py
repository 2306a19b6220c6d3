"""Peer authentication: prove, inside the QUIC session, that each side holds the
private node key behind its DERP address.

Why: DERP routes by public key, but the relay (or anyone who can inject packets
for a key) could answer a dial itself and relay a second QUIC session to the real
peer. The TLS certificate proves nothing (throw-away, self-signed, unchecked).

Construction (both sides ours: ALPN "derpnet-auth/1" negotiated):

    shared  = X25519(my_private, peer_public)              # only the two key holders know it
    key     = HKDF-SHA256(shared, salt="derpnet-auth/1", info=client_pub ‖ server_pub)
    binding = SHA-256("derpnet-auth/1 binding" ‖ client_random ‖
                      client_application_traffic_secret_0 ‖ server_application_traffic_secret_0)
    proof   = HMAC-SHA256(key, "derpnet-auth/1 " ‖ role ‖ binding)     role = "client" | "server"

The *binding* identifies this TLS session: the 1-RTT traffic secrets come from the
session's ECDHE exchange and its whole handshake transcript (both randoms, both key
shares, the certificate), like the TLS exporter. A man in the middle runs two TLS
sessions with different ECDHE secrets, so its two legs have different bindings: a
proof made on one leg is worthless on the other, and it cannot make a fresh proof
without one of the private node keys. The secrets come from aioquic's public
`secrets_log_file` hook (the SSLKEYLOGFILE lines), read into memory only, and the
binding is a one-way hash of them, so neither the proof nor the binding reveals them.

Each side sends its proof on its first unidirectional stream (client: stream 2,
server: stream 3) as soon as its handshake completes: MAGIC ‖ proof, then FIN.
A stream is handed to the application only after the peer's proof verified.
Go peers (no ALPN) never see these streams.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from derpnet.errors import AuthenticationError
from derpnet.keys import PrivateKey, PublicKey

__all__ = ["AuthenticationError", "SecretsCollector", "session_binding", "make_proof", "verify_proof",
           "MAGIC", "PROOF_MESSAGE_LEN", "LABEL"]

LABEL = b"derpnet-auth/1"
MAGIC = b"DQA1"
PROOF_LEN = 32
PROOF_MESSAGE_LEN = len(MAGIC) + PROOF_LEN


class SecretsCollector:
    """A file-like sink for aioquic's `secrets_log_file` (NSS key log lines), kept in memory.

    One per connection; only the first application traffic secrets are kept."""

    __slots__ = ("client_random", "client_secret", "server_secret")

    def __init__(self) -> None:
        self.client_random: Optional[bytes] = None
        self.client_secret: Optional[bytes] = None
        self.server_secret: Optional[bytes] = None

    def write(self, line: str) -> int:
        parts = line.split()
        if len(parts) == 3:
            label, random_hex, secret_hex = parts
            if label == "CLIENT_TRAFFIC_SECRET_0" and self.client_secret is None:
                self.client_secret = bytes.fromhex(secret_hex)
                self.client_random = bytes.fromhex(random_hex)
            elif label == "SERVER_TRAFFIC_SECRET_0" and self.server_secret is None:
                self.server_secret = bytes.fromhex(secret_hex)
                self.client_random = bytes.fromhex(random_hex)
        return len(line)

    def flush(self) -> None:
        pass

    def binding(self) -> bytes:
        if self.client_secret is None or self.server_secret is None or self.client_random is None:
            raise AuthenticationError("TLS session secrets unavailable: cannot bind the proof to the session")
        return session_binding(self.client_random, self.client_secret, self.server_secret)


def session_binding(client_random: bytes, client_secret: bytes, server_secret: bytes) -> bytes:
    h = hashlib.sha256()
    h.update(LABEL + b" binding")
    for part in (client_random, client_secret, server_secret):
        h.update(len(part).to_bytes(2, "big"))
        h.update(part)
    return h.digest()


def _auth_key(my_private: PrivateKey, peer: PublicKey, client: PublicKey, server: PublicKey) -> bytes:
    try:
        shared = nacl.bindings.crypto_scalarmult(my_private.raw, peer.raw)
    except nacl.exceptions.RuntimeError:
        shared = bytes(32)
    if not any(shared):
        # A low-order peer "key": the shared secret is known to everybody.
        raise AuthenticationError(f"peer key {peer} is a low-order point; refusing it")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=LABEL,
                info=client.raw + server.raw).derive(shared)


def make_proof(my_private: PrivateKey, peer: PublicKey, *, is_client: bool, binding: bytes) -> bytes:
    """The proof message (MAGIC ‖ HMAC) this side sends."""
    me = my_private.public_key
    client, server = (me, peer) if is_client else (peer, me)
    key = _auth_key(my_private, peer, client, server)
    role = b"client" if is_client else b"server"
    return MAGIC + hmac.new(key, LABEL + b" " + role + binding, hashlib.sha256).digest()


def verify_proof(my_private: PrivateKey, peer: PublicKey, message: bytes, *, peer_is_client: bool,
                 binding: bytes) -> None:
    """Raise AuthenticationError unless `message` proves that `peer` holds its private key
    and took part in this very TLS session."""
    if len(message) != PROOF_MESSAGE_LEN or not message.startswith(MAGIC):
        raise AuthenticationError(f"peer {peer.b64()} sent a malformed key proof ({len(message)} bytes)")
    me = my_private.public_key
    client, server = (peer, me) if peer_is_client else (me, peer)
    key = _auth_key(my_private, peer, client, server)
    role = b"client" if peer_is_client else b"server"
    expected = hmac.new(key, LABEL + b" " + role + binding, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, message[len(MAGIC):]):
        raise AuthenticationError(
            f"peer could not prove it holds the key {peer.b64()}: a relay or another node may be "
            f"impersonating it")
