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
    "CLIENT_INFO_FIELDS", "MAX_JSON_CONTAINERS", "MAX_APP_NAME",
]

DEFAULT_CLIENT_INFO: dict[str, Any] = {"version": PROTOCOL_VERSION, "CanAckPings": True}
DEFAULT_SERVER_INFO: dict[str, Any] = {"version": PROTOCOL_VERSION}
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
#: The ClientInfo fields a relay uses (Go's derp.ClientInfo), by lower-cased JSON name, and
#: their JSON types. Everything else is dropped, as Go's decoder drops unknown fields: a
#: relay keeps a few scalars per client, never the client's JSON.
CLIENT_INFO_FIELDS: dict[str, type] = {"version": int, "canackpings": bool, "meshkey": str,
                                       "isprober": bool, "appname": str}
#: A hello is a handful of scalars: more objects and arrays than this (so also deeper
#: nesting) is refused before parsing. Without it, `[{}]*85000` is 85,000 dicts, and deep
#: nesting a RecursionError inside the JSON parser.
MAX_JSON_CONTAINERS = 64
#: AppName is kept for statistics: longer ones are cut.
MAX_APP_NAME = 64
_INT64 = range(-(1 << 63), 1 << 63)


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
    if data.count(b"[") + data.count(b"{") > MAX_JSON_CONTAINERS:  # (brackets in strings count too)
        raise HandshakeError(f"{what}: JSON with more than {MAX_JSON_CONTAINERS} objects and arrays")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise HandshakeError(f"{what}: not JSON") from None
    except RecursionError:  # pragma: no cover - the container cap comes first
        raise HandshakeError(f"{what}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise HandshakeError(f"{what}: JSON is not an object")
    return obj


def _client_info_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The typed fields of a ClientInfo object (lower-cased names); wrong JSON types are a
    handshake error, as for Go's decoder; null leaves a field unset."""
    info: dict[str, Any] = {}
    for k, v in obj.items():
        name = k.lower()
        kind = CLIENT_INFO_FIELDS.get(name)
        if kind is None or v is None:
            continue
        if kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool) and v in _INT64
        else:
            ok = isinstance(v, kind)
        if not ok:
            raise HandshakeError(f"ClientInfo: {name} must be a JSON {'number' if kind is int else kind.__name__}")
        info[name] = v[:MAX_APP_NAME] if name == "appname" else v
    return info


def seal_client_info(client: PrivateKey, server: PublicKey, info: dict[str, Any] = DEFAULT_CLIENT_INFO) -> bytes:
    """The sealed part of a ClientInfo frame. An empty meshKey is never sent (derper rejects it)."""
    info = {k: v for k, v in info.items() if not (k == "meshKey" and not v)}
    return seal(client, server, json.dumps(info, separators=(",", ":")).encode(), "ClientInfo")


def open_client_info(server: PrivateKey, client: PublicKey, sealed: bytes) -> dict[str, Any]:
    """Open and parse a ClientInfo box; keys are matched case-insensitively, as Go's decoder does.

    Returns only the typed fields of `CLIENT_INFO_FIELDS` that are present, with lower-cased
    keys; the rest of the JSON is dropped. Raises HandshakeError if the box does not open,
    the JSON is bad or too nested, a field has the wrong type, or a meshKey is present but
    not 64 hex characters.
    """
    info = _client_info_fields(_json_object(open_sealed(server, client, sealed, "ClientInfo"), "ClientInfo"))
    mesh = info.get("meshkey")
    if "meshkey" in info and not (isinstance(mesh, str) and _HEX64.match(mesh.strip())):
        raise HandshakeError("ClientInfo: meshKey must be 64 hex characters")
    return info


def seal_server_info(server: PrivateKey, client: PublicKey, info: dict[str, Any] = DEFAULT_SERVER_INFO) -> bytes:
    return seal(server, client, json.dumps(info, separators=(",", ":")).encode(), "ServerInfo")


def open_server_info(client: PrivateKey, server: PublicKey, sealed: bytes) -> dict[str, Any]:
    return _json_object(open_sealed(client, server, sealed, "ServerInfo"), "ServerInfo")
