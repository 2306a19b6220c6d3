"""The DERP hello's NaCl boxes, sans-IO: sealing and opening ClientInfo and ServerInfo.

Layer: protocol. ClientInfo is sealed with the client's private key to the server's public key, so a
server that opens it knows the client holds the private key of the key it claims.
Wire form of a sealed message: nonce(24) ‖ tag(16) ‖ ciphertext (PyNaCl's layout).
"""

from __future__ import annotations

import json
import re
from typing import Any

import nacl.exceptions
import nacl.public

from .errors import HandshakeError
from .frames import NONCE_LEN, PROTOCOL_VERSION
from .keys import PrivateKey, PublicKey

__all__ = [
    "DEFAULT_CLIENT_INFO", "DEFAULT_SERVER_INFO", "seal", "open_sealed",
    "seal_client_info", "open_client_info", "seal_server_info", "open_server_info",
]

DEFAULT_CLIENT_INFO: dict[str, Any] = {"version": PROTOCOL_VERSION, "CanAckPings": True}
DEFAULT_SERVER_INFO: dict[str, Any] = {"version": PROTOCOL_VERSION}
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _box(ours: PrivateKey, theirs: PublicKey, what: str) -> nacl.public.Box:
    try:
        return nacl.public.Box(ours.nacl(), nacl.public.PublicKey(theirs.raw))
    except (nacl.exceptions.CryptoError, RuntimeError):
        # libsodium refuses low-order points (e.g. an all-zero key): no shared secret exists.
        raise HandshakeError(f"{what}: unusable peer key {theirs} (low-order point)") from None


def seal(ours: PrivateKey, theirs: PublicKey, message: bytes, what: str = "box") -> bytes:
    """nonce ‖ box(message), with a fresh random nonce."""
    return bytes(_box(ours, theirs, what).encrypt(message))


def open_sealed(ours: PrivateKey, theirs: PublicKey, sealed: bytes, what: str) -> bytes:
    if len(sealed) < NONCE_LEN + 16:
        raise HandshakeError(f"{what}: sealed box of {len(sealed)} bytes is too short")
    box = _box(ours, theirs, what)
    try:
        return box.decrypt(bytes(sealed))
    except nacl.exceptions.CryptoError:
        raise HandshakeError(f"{what}: box does not open (wrong key or tampered)") from None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise HandshakeError(f"{what}: not JSON") from None
    if not isinstance(obj, dict):
        raise HandshakeError(f"{what}: JSON is not an object")
    return obj


def seal_client_info(client: PrivateKey, server: PublicKey, info: dict[str, Any] = DEFAULT_CLIENT_INFO) -> bytes:
    """The sealed part of a ClientInfo frame. An empty meshKey is never sent (derper rejects it)."""
    info = {k: v for k, v in info.items() if not (k == "meshKey" and not v)}
    return seal(client, server, json.dumps(info, separators=(",", ":")).encode(), "ClientInfo")


def open_client_info(server: PrivateKey, client: PublicKey, sealed: bytes) -> dict[str, Any]:
    """Open and parse a ClientInfo box; keys are matched case-insensitively, as Go's decoder does.

    Returns the info with lower-cased keys. Raises HandshakeError if the box does not open,
    the JSON is bad, or a meshKey is present but not 64 hex characters.
    """
    obj = _json_object(open_sealed(server, client, sealed, "ClientInfo"), "ClientInfo")
    info = {str(k).lower(): v for k, v in obj.items()}
    mesh = info.get("meshkey")
    if "meshkey" in info and not (isinstance(mesh, str) and _HEX64.match(mesh.strip())):
        raise HandshakeError("ClientInfo: meshKey must be 64 hex characters")
    return info


def seal_server_info(server: PrivateKey, client: PublicKey, info: dict[str, Any] = DEFAULT_SERVER_INFO) -> bytes:
    return seal(server, client, json.dumps(info, separators=(",", ":")).encode(), "ServerInfo")


def open_server_info(client: PrivateKey, server: PublicKey, sealed: bytes) -> dict[str, Any]:
    return _json_object(open_sealed(client, server, sealed, "ServerInfo"), "ServerInfo")
