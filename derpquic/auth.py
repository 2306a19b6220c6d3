"""Peer authentication: each side proves, inside the QUIC session, that it holds the
private node key behind its DERP address, so the relay cannot impersonate a peer.

Holds the proof itself (`make_proof`, `verify_proof`, bound to the TLS session by
`SecretsCollector`) and `KeyProof`, the sans-IO state machine one connection runs:
events in (protocol negotiated, handshake completed, proof bytes received, time passed),
actions out (send this proof, hand out streams, refuse with this code). The construction
(static and ephemeral X25519, as Noise KK) and why it stops a man in the middle and a
thief of one key: docs/derpquic.md.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from derpnet.errors import AuthenticationError
from derpnet.keys import PrivateKey, PublicKey

from .codes import AppError

__all__ = ["AuthenticationError", "SecretsCollector", "session_binding", "make_proof", "verify_proof",
           "hello", "parse_hello", "MAGIC", "HELLO_LEN", "PROOF_MESSAGE_LEN", "LABEL", "Role", "ProofState",
           "AuthPolicy", "KeyProof", "SendProof", "Ready", "Refuse", "Action"]

LABEL = b"derpnet-auth/2"
MAGIC = b"DQA2"
KEY_LEN = 32
MAC_LEN = 32
#: What the server sends in its first flight (0.5-RTT data): MAGIC ‖ its ephemeral public key.
HELLO_LEN = len(MAGIC) + KEY_LEN
#: Each side's whole proof stream: MAGIC ‖ its ephemeral public key ‖ MAC.
PROOF_MESSAGE_LEN = HELLO_LEN + MAC_LEN
PROOF_LEN = MAC_LEN


class SecretsCollector:
    """A file-like sink for aioquic's `secrets_log_file` (NSS key log lines), kept in memory.

    One per connection; only the first application traffic secrets are kept."""

    __slots__ = ("client_random", "client_secret", "server_secret")

    def __init__(self) -> None:
        self.client_random: bytes | None = None
        self.client_secret: bytes | None = None
        self.server_secret: bytes | None = None

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


def _dh(private: PrivateKey, public: PublicKey, what: str) -> bytes:
    try:
        shared = nacl.bindings.crypto_scalarmult(private.raw, public.raw)
    except nacl.exceptions.RuntimeError:
        shared = bytes(32)
    if not any(shared):
        # A low-order "key": the shared secret is known to everybody.
        raise AuthenticationError(f"{what} {public.b64()} is a low-order point; refusing it")
    return shared


def _auth_key(my_static: PrivateKey, my_ephemeral: PrivateKey, peer: PublicKey, peer_ephemeral: PublicKey,
              *, is_client: bool) -> bytes:
    """The MAC key of both proofs (as Noise KK's ss, es, se): only the two static key holders
    know `ss`; `es` = DH(client ephemeral, server static) needs the server's static key or the
    client's ephemeral, `se` = DH(client static, server ephemeral) the client's static key or
    the server's ephemeral. So a thief of one static key cannot compute K towards its owner
    while pretending to be anybody else (no key-compromise impersonation): the owner's
    ephemeral never leaves it."""
    ss = _dh(my_static, peer, "peer key")
    if is_client:
        es = _dh(my_ephemeral, peer, "peer key")
        se = _dh(my_static, peer_ephemeral, "peer ephemeral key")
        ids = (my_static.public_key, peer, my_ephemeral.public_key, peer_ephemeral)
    else:
        es = _dh(my_static, peer_ephemeral, "peer ephemeral key")
        se = _dh(my_ephemeral, peer, "peer key")
        ids = (peer, my_static.public_key, peer_ephemeral, my_ephemeral.public_key)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=LABEL,
                info=b"".join(k.raw for k in ids)).derive(ss + es + se)


def _mac(key: bytes, is_client: bool, binding: bytes) -> bytes:
    role = b"client" if is_client else b"server"
    return hmac.new(key, LABEL + b" " + role + binding, hashlib.sha256).digest()


def hello(ephemeral: PrivateKey) -> bytes:
    """The first HELLO_LEN bytes of a proof stream: MAGIC ‖ ephemeral public key."""
    return MAGIC + ephemeral.public_key.raw


def parse_hello(message: bytes, peer: PublicKey) -> PublicKey:
    """The peer's ephemeral public key from the start of its proof stream."""
    if len(message) < HELLO_LEN or not message.startswith(MAGIC):
        raise AuthenticationError(f"peer {peer.b64()} sent a malformed key proof ({len(message)} bytes)")
    return PublicKey(bytes(message[len(MAGIC):HELLO_LEN]))


def make_proof(my_private: PrivateKey, peer: PublicKey, *, is_client: bool, binding: bytes,
               ephemeral: PrivateKey, peer_ephemeral: PublicKey) -> bytes:
    """The whole proof stream this side sends: MAGIC ‖ our ephemeral public key ‖ MAC."""
    key = _auth_key(my_private, ephemeral, peer, peer_ephemeral, is_client=is_client)
    return hello(ephemeral) + _mac(key, is_client, binding)


def verify_proof(my_private: PrivateKey, peer: PublicKey, message: bytes, *, peer_is_client: bool,
                 binding: bytes, ephemeral: PrivateKey) -> None:
    """Raise AuthenticationError unless `message` (the peer's whole proof stream) proves that
    `peer` holds its private key, answered our `ephemeral` and took part in this very TLS
    session."""
    if len(message) != PROOF_MESSAGE_LEN:
        raise AuthenticationError(f"peer {peer.b64()} sent a malformed key proof ({len(message)} bytes)")
    peer_ephemeral = parse_hello(message, peer)
    key = _auth_key(my_private, ephemeral, peer, peer_ephemeral, is_client=not peer_is_client)
    expected = _mac(key, peer_is_client, binding)
    if not hmac.compare_digest(expected, message[HELLO_LEN:]):
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
    allow: frozenset[PublicKey] | None = None


@dataclass(frozen=True)
class SendProof:
    """Send `message` on our first unidirectional stream (our proof stream), then FIN if
    `end` (the server sends its hello first, with `end` False, and its MAC later)."""

    message: bytes
    end: bool = True


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


Action = SendProof | Ready | Refuse


class KeyProof:
    """The key-proof exchange of one connection (sans-IO: no aioquic, no clock).

    Feed it `protocol_negotiated(ours)` (server: the ClientHello was read; ours: the peer
    offered ALPN derpnet-auth/2), `handshake_completed(ours)`, the bytes of the peer's first
    unidirectional stream (`proof_received`) and the time (`expire`); apply the actions it
    returns, in order. Each side's proof stream is MAGIC ‖ ephemeral public key ‖ MAC:
    the server sends its first half (the hello) in its first flight, the client its whole
    stream once its handshake completed and the hello arrived, the server its MAC once the
    client's verified — one round trip, as before ephemeral keys were added.
    `timeout` (server side): refuse a peer that has not finished both `timeout` seconds
    after `now` (the connection's first packet).
    Subclasses may override `make_proof` / `verify` (the tests' impostors do)."""

    def __init__(self, private_key: PrivateKey, peer: PublicKey, role: Role,
                 policy: AuthPolicy = AuthPolicy(), *, now: float = 0.0, timeout: float | None = None,
                 secrets: SecretsCollector | None = None) -> None:
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
        self._ephemeral: PrivateKey | None = None
        self.hello_sent = False   # server: our hello went out
        self.sent = False         # our whole proof went out
        self.received = bytearray()
        self.received_all = False

    @property
    def ephemeral(self) -> PrivateKey:
        """This connection's ephemeral key (made when first needed, never reused)."""
        if self._ephemeral is None:
            self._ephemeral = PrivateKey.generate()
        return self._ephemeral

    @property
    def peer_ephemeral(self) -> PublicKey:
        """The peer's ephemeral public key, from its hello (AuthenticationError if malformed)."""
        return parse_hello(bytes(self.received[:HELLO_LEN]), self.peer)

    @property
    def wake_at(self) -> float | None:
        """When `expire` has something to do (None: never)."""
        if self.state in (ProofState.HANDSHAKE, ProofState.PROVING):
            return self.deadline
        return None

    # -- events ------------------------------------------------------------------------------

    def protocol_negotiated(self, ours: bool) -> list[Action]:
        """Server: the ClientHello was processed. If the client speaks derpnet-auth, our hello
        leaves with our first flight (0.5-RTT data), so that the client can bind its proof
        to our ephemeral key without waiting another round trip."""
        if self.role is not Role.SERVER or not ours or self.state is not ProofState.HANDSHAKE:
            return []
        allow = self.policy.allow
        if allow is not None and self.peer not in allow:
            return []  # refused when the handshake completes
        return self._hello()

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
        actions = self._hello() if self.role is Role.SERVER else self._client_send()
        return actions + self._check()

    def proof_received(self, data: bytes, end: bool) -> list[Action]:
        """Bytes of the peer's first unidirectional stream (buffered until the handshake is done)."""
        if self.state in (ProofState.DONE, ProofState.REFUSED) or self.received_all:
            return []
        self.received += data
        if len(self.received) > PROOF_MESSAGE_LEN:
            return self._failed(AuthenticationError(f"{self.peer.b64()} sent an oversized key proof"))
        actions = self._client_send() if self.role is Role.CLIENT else []
        if end:
            self.received_all = True
            return actions + self._check()
        return actions

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
        """Our whole proof stream (MAGIC ‖ ephemeral ‖ MAC), bound to the peer's ephemeral key."""
        return make_proof(self.private_key, self.peer, is_client=self.role.is_client, binding=binding,
                          ephemeral=self.ephemeral, peer_ephemeral=self.peer_ephemeral)

    def verify(self, message: bytes, binding: bytes) -> None:
        """Raise AuthenticationError unless `message` is the peer's proof for this session."""
        verify_proof(self.private_key, self.peer, message, peer_is_client=not self.role.is_client,
                     binding=binding, ephemeral=self.ephemeral)

    # -- steps --------------------------------------------------------------------------------

    def _hello(self) -> list[Action]:
        """Server: the first half of our proof stream."""
        if self.hello_sent:
            return []
        self.hello_sent = True
        return [SendProof(hello(self.ephemeral), end=False)]

    def _client_send(self) -> list[Action]:
        """Client: our proof, once the handshake completed and the server's hello arrived."""
        if self.state is not ProofState.PROVING or self.sent or len(self.received) < HELLO_LEN:
            return []
        try:
            message = self.make_proof(self.secrets.binding())
        except AuthenticationError as e:
            return self._failed(e)
        self.sent = True
        return [SendProof(message)]

    def _server_send(self) -> list[Action]:
        """Server: the rest of our proof stream (the MAC), after the client's verified."""
        try:
            message = self.make_proof(self.secrets.binding())
        except AuthenticationError as e:
            return self._failed(e)
        self.sent = True
        return [SendProof(message[HELLO_LEN:])]

    def _check(self) -> list[Action]:
        if self.state is not ProofState.PROVING or not self.received_all:
            return []
        if self.role is Role.CLIENT and not self.sent:
            # The server ended its stream before we could answer its hello: malformed.
            return self._failed(AuthenticationError(
                f"peer {self.peer.b64()} sent a malformed key proof ({len(self.received)} bytes)"))
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
        actions = self._server_send()
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
