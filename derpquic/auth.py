"""Peer authentication: each side proves, inside the QUIC session, that it holds the
private node key behind its DERP address, so the relay cannot impersonate a peer.

Holds the proof itself (`make_proof`, `verify_proof`, bound to the TLS session by
`SecretsCollector`) and `KeyProof`, the sans-IO state machine one connection runs:
events in (handshake completed, proof bytes received, time passed), actions out
(send this proof, hand out streams, refuse with this code). The construction and why
it stops a man in the middle: docs/derpquic.md.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Union

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from derpnet.errors import AuthenticationError
from derpnet.keys import PrivateKey, PublicKey

from .codes import AppError

__all__ = ["AuthenticationError", "SecretsCollector", "session_binding", "make_proof", "verify_proof",
           "MAGIC", "PROOF_MESSAGE_LEN", "LABEL", "Role", "ProofState", "AuthPolicy", "KeyProof",
           "SendProof", "Ready", "Refuse", "Action"]

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


# ---------------------------------------------------------------------- the state machine


class Role(Enum):
    """Which end of the QUIC connection we are."""

    CLIENT = "client"  # we dialled
    SERVER = "server"  # we accepted

    @property
    def is_client(self) -> bool:
        return self is Role.CLIENT


class ProofState(Enum):
    HANDSHAKE = "handshake"  # the QUIC handshake is not complete
    PROVING = "proving"      # both speak derpnet-auth: proofs are being exchanged
    DONE = "done"            # streams may flow (`KeyProof.authenticated` says whether proven)
    REFUSED = "refused"      # the connection must be closed (a `Refuse` action said how)


@dataclass(frozen=True)
class AuthPolicy:
    """Whom a connection accepts. Client side: `allow_unauthenticated` lets a peer that cannot
    prove its key (a Go derpconnect) through. Server side: `require_auth` refuses such peers;
    `allow` (keys) refuses every other key and unproven peers."""

    allow_unauthenticated: bool = False
    require_auth: bool = False
    allow: Optional[frozenset[PublicKey]] = None


@dataclass(frozen=True)
class SendProof:
    """Send `message` on our first unidirectional stream, then FIN."""

    message: bytes


@dataclass(frozen=True)
class Ready:
    """Hand out streams; `authenticated`: the peer proved its key."""

    authenticated: bool


@dataclass(frozen=True)
class Refuse:
    """Close the connection with application error `code` and `reason`; `error` is what
    our own callers get, `detail` what we log."""

    code: AppError
    reason: str
    error: BaseException
    detail: str


Action = Union[SendProof, Ready, Refuse]


class KeyProof:
    """The key-proof exchange of one connection (sans-IO: no aioquic, no clock).

    Feed it `handshake_completed(ours)` (ours: the peer negotiated ALPN derpnet-auth/1),
    the bytes of the peer's first unidirectional stream (`proof_received`) and the time
    (`expire`); apply the actions it returns, in order. The client sends its proof when the
    handshake completes; the server answers with its own once the client's verified.
    `timeout` (server side): refuse a peer that has not finished both `timeout` seconds
    after `now` (the connection's first packet).
    Subclasses may override `make_proof` / `verify` (the tests' impostors do)."""

    def __init__(self, private_key: PrivateKey, peer: PublicKey, role: Role,
                 policy: AuthPolicy = AuthPolicy(), *, now: float = 0.0, timeout: Optional[float] = None,
                 secrets: Optional[SecretsCollector] = None) -> None:
        self.private_key = private_key
        self.peer = peer
        self.role = role
        self.policy = policy
        self.timeout = timeout
        self.deadline = None if timeout is None else now + timeout
        self.secrets = secrets if secrets is not None else SecretsCollector()
        self.state = ProofState.HANDSHAKE
        self.ours = False
        self.authenticated = False
        self.sent = False
        self.received = bytearray()
        self.received_all = False

    @property
    def wake_at(self) -> Optional[float]:
        """When `expire` has something to do (None: never)."""
        if self.state in (ProofState.HANDSHAKE, ProofState.PROVING):
            return self.deadline
        return None

    # -- events ------------------------------------------------------------------------------

    def handshake_completed(self, ours: bool) -> list[Action]:
        if self.state is not ProofState.HANDSHAKE:
            return []
        self.ours = ours
        allow = self.policy.allow
        if self.role is Role.SERVER and allow is not None and self.peer not in allow:
            # Refused only now: before the handshake completes, CONNECTION_CLOSE cannot carry
            # our application error code (QUIC turns it into a bare APPLICATION_ERROR).
            return self._refuse(AppError.NOT_ALLOWED, "not allowed", ConnectionRefusedError("peer not allowed"),
                                f"refusing {self.peer.b64()}: not in the allow-list")
        if not ours:
            return self._unprovable()
        self.state = ProofState.PROVING
        actions = self._send() if self.role is Role.CLIENT else []
        return actions + self._check()

    def proof_received(self, data: bytes, end: bool) -> list[Action]:
        """Bytes of the peer's first unidirectional stream (buffered until the handshake is done)."""
        if self.state in (ProofState.DONE, ProofState.REFUSED) or self.received_all:
            return []
        self.received += data
        if len(self.received) > PROOF_MESSAGE_LEN:
            return self._failed(AuthenticationError(f"{self.peer.b64()} sent an oversized key proof"))
        if end:
            self.received_all = True
            return self._check()
        return []

    def expire(self, now: float) -> list[Action]:
        """Refuse the peer if the deadline passed before streams could flow."""
        wake = self.wake_at
        if wake is None or now < wake or self.timeout is None:
            return []
        return self._refuse(AppError.AUTH_REQUIRED, "authentication timed out", TimeoutError(
            f"{self.peer.b64()} did not complete the handshake and key proof within {self.timeout:g} s"),
            f"refusing {self.peer.b64()}: no handshake and key proof within {self.timeout:g} s")

    # -- the proof (overridable) --------------------------------------------------------------

    def make_proof(self, binding: bytes) -> bytes:
        return make_proof(self.private_key, self.peer, is_client=self.role.is_client, binding=binding)

    def verify(self, message: bytes, binding: bytes) -> None:
        """Raise AuthenticationError unless `message` is the peer's proof for this session."""
        verify_proof(self.private_key, self.peer, message, peer_is_client=not self.role.is_client,
                     binding=binding)

    # -- steps --------------------------------------------------------------------------------

    def _send(self) -> list[Action]:
        if self.sent:
            return []
        try:
            message = self.make_proof(self.secrets.binding())
        except AuthenticationError as e:
            return self._failed(e)
        self.sent = True
        return [SendProof(message)]

    def _check(self) -> list[Action]:
        if self.state is not ProofState.PROVING or not self.received_all:
            return []
        try:
            self.verify(bytes(self.received), self.secrets.binding())
        except AuthenticationError as e:
            return self._failed(e)
        self.authenticated = True
        if self.role is Role.CLIENT:
            return self._ready()
        allow = self.policy.allow
        if allow is not None and self.peer not in allow:
            return self._refuse(AppError.NOT_ALLOWED, "not allowed", ConnectionRefusedError("peer not allowed"),
                                f"refusing {self.peer.b64()}: proved its key but is not in the allow-list")
        actions = self._send()
        return actions + self._ready() if self.sent else actions  # (not sent: refused)

    def _unprovable(self) -> list[Action]:
        """The peer does not speak derpnet-auth (a Go derpconnect?): it cannot prove its key."""
        who = self.peer.b64()
        if self.role is Role.CLIENT:
            if self.policy.allow_unauthenticated:
                return self._ready()
            return self._refuse(AppError.AUTH_REQUIRED, "authentication required", AuthenticationError(
                f"{who} did not prove that it holds its key (it does not speak derpnet-auth: a Go derpconnect "
                f"peer?); pass allow_unauthenticated=True to accept such peers"),
                f"{who} cannot prove its key (allow_unauthenticated is off)")
        if self.policy.require_auth or self.policy.allow is not None:
            return self._refuse(AppError.AUTH_REQUIRED, "authentication required",
                                AuthenticationError(f"{who} cannot prove its key"),
                                f"refusing unauthenticated peer {who} (require_auth/allow)")
        return self._ready()

    def _ready(self) -> list[Action]:
        self.state = ProofState.DONE
        return [Ready(self.authenticated)]

    def _failed(self, error: AuthenticationError) -> list[Action]:
        return self._refuse(AppError.AUTH_FAILED, "authentication failed", error,
                            f"key proof of {self.peer.b64()} failed: {error}")

    def _refuse(self, code: AppError, reason: str, error: BaseException, detail: str) -> list[Action]:
        self.state = ProofState.REFUSED
        return [Refuse(code, reason, error, detail)]
