"""Curve25519 node keys: the addresses of derpnet, in Tailscale's and the Go tool's text forms.

A `PublicKey` is what `PacketConn` uses as an address (the role of Go's `net.Addr`);
a `PrivateKey` is a node's identity. Private keys are only ever written 0600.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from pathlib import Path

import nacl.bindings
import nacl.public

from ._files import write_atomic

__all__ = ["PublicKey", "PrivateKey", "KEY_LEN", "PublicKeyLike", "PrivateKeyLike", "describe_key_text",
           "redact_key_material", "key_file_mode_problem"]

KEY_LEN = 32
_NODEKEY_PREFIX = "nodekey:"
_PRIVKEY_PREFIX = "privkey:"
_B64URL = re.compile(r"[A-Za-z0-9_-]{43}")


#: The longest text an error message may echo as it is, and only digits (a port number
#: typed where a key goes): anything else might be a piece of a key.
_ECHO_MAX = 12
_HEX = re.compile(r"[0-9A-Fa-f]+")
_B64 = re.compile(r"[A-Za-z0-9_+/-]+=*")
# Anything in a message that may be key material: privkey:..., 64 hex digits, 43-44 base64.
_KEY_MATERIAL = re.compile(r"(?i)privkey:[^\s'\"]*"
                           r"|(?<![0-9A-Za-z])[0-9A-Fa-f]{64}(?![0-9A-Za-z])"
                           r"|(?<![A-Za-z0-9_+/-])[A-Za-z0-9_+/-]{43}=?(?![A-Za-z0-9_+/=-])")


def key_file_mode_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the private key file at `path` is exposed (readable or writable by other users:
    group or world bits set), in one line; None if it is not, or on a non-POSIX system."""
    if os.name != "posix":
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o077:
        return f"key file {os.fspath(path)} is readable by other users (mode {mode & 0o777:o}): chmod 600 it"
    return None


def describe_key_text(text: str) -> str:
    """What `text` (a would-be key) looks like, for an error message, never any of its
    characters unless it is short and no private key: a pasted secret must not end up in
    a terminal, a log or a bug report."""
    s = text.strip()
    low = s.lower()
    if low.startswith(_PRIVKEY_PREFIX):
        return "a private key (privkey:...)"
    if "privatekey" in low:
        return "a private key file's contents (JSON with PrivateKey)"
    if len(s) <= _ECHO_MAX and s.isdigit():  # a port number typed where a key goes
        return repr(s)
    if low.startswith(_NODEKEY_PREFIX):
        return f"nodekey: and {len(s) - len(_NODEKEY_PREFIX)} characters"
    if _HEX.fullmatch(s):
        return f"{len(s)} hexadecimal characters"
    if _B64.fullmatch(s):
        return f"{len(s)} base64 characters"
    return f"{len(s)} characters"


def redact_key_material(message: str) -> str:
    """`message` with everything that may be key material (privkey:..., 64 hex digits,
    43-character base64) replaced by what kind of text it was."""
    def repl(m: re.Match[str]) -> str:
        t = m.group()
        if t.lower().startswith(_PRIVKEY_PREFIX):
            return "<a private key, not shown>"
        return f"<{len(t)} {'hexadecimal' if len(t) == 64 else 'base64'} characters, not shown>"
    return _KEY_MATERIAL.sub(repl, message)


def _parse_hex(text: str, what: str) -> bytes:
    if len(text) != 2 * KEY_LEN:
        raise ValueError(f"{what}: expected 64 hex characters, got {len(text)}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{what}: not hexadecimal") from None  # never echo what may be a secret


def _parse_raw(data: bytes, what: str) -> bytes:
    if len(data) != KEY_LEN:
        raise ValueError(f"{what}: expected {KEY_LEN} bytes, got {len(data)}")
    return bytes(data)


class PublicKey:
    """A 32-byte curve25519 public key ("node key"); hashable, usable as a `PacketConn` address."""

    __slots__ = ("_raw", "_hash")

    def __init__(self, raw: bytes) -> None:
        self._raw = _parse_raw(raw, "public key")
        self._hash = hash(self._raw)

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Parse `nodekey:<hex>`, bare 64-hex, or the Go tool's 43-character base64url form."""
        if not isinstance(text, str):
            raise TypeError(f"public key text must be str, not {type(text).__name__}")
        s = text.strip()
        if s.lower().startswith(_NODEKEY_PREFIX):
            return cls(_parse_hex(s[len(_NODEKEY_PREFIX):], "nodekey"))
        if s.lower().startswith(_PRIVKEY_PREFIX):
            raise ValueError("this is a private key (privkey:...), not a public key; never share it")
        if len(s) == 2 * KEY_LEN:
            return cls(_parse_hex(s, "public key"))
        if len(s) in (43, 44):
            try:
                if len(s) == 43:
                    if not _B64URL.fullmatch(s):
                        raise ValueError
                    raw = base64.urlsafe_b64decode(s + "=")
                else:  # WireGuard's standard base64 with padding
                    raw = base64.b64decode(s, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"public key: invalid base64 ({len(s)} characters)") from None
            if len(raw) != KEY_LEN:  # e.g. 44 characters without '=': one too many
                raise ValueError(f"public key: decodes to {len(raw)} bytes, not {KEY_LEN}")
            return cls(raw)
        # Never echo the text: it may be a secret pasted in the wrong place.
        raise ValueError(
            f"public key: expected nodekey:<64 hex>, 64 hex characters, "
            f"or 43-character base64url (got {len(s)} characters)"
        )

    @classmethod
    def coerce(cls, value: PublicKeyLike) -> PublicKey:
        """Accept a PublicKey, 32 raw bytes or any text form."""
        if isinstance(value, PublicKey):
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            return cls(bytes(value))
        if isinstance(value, str):
            return cls.parse(value)
        raise TypeError(f"cannot use {type(value).__name__} as a public key")

    @property
    def raw(self) -> bytes:
        return self._raw

    def __bytes__(self) -> bytes:
        return self._raw

    def network(self) -> str:
        """The network name, as Go's `net.Addr.Network()`."""
        return "derp"

    def hex(self) -> str:
        return self._raw.hex()

    def b64(self) -> str:
        """The Go derpconnect text form: unpadded base64url, 43 characters."""
        return base64.urlsafe_b64encode(self._raw).rstrip(b"=").decode()

    def short(self) -> str:
        """Tailscale's short log form, e.g. `[AbCdE]`."""
        return "[" + base64.b64encode(self._raw).decode()[:5] + "]"

    def __str__(self) -> str:
        return _NODEKEY_PREFIX + self._raw.hex()

    def __repr__(self) -> str:
        return f"PublicKey({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PublicKey):
            return self._raw == other._raw
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash


class PrivateKey:
    """A curve25519 private key. Its repr never shows the secret."""

    __slots__ = ("_raw", "_public")

    def __init__(self, raw: bytes) -> None:
        self._raw = _parse_raw(raw, "private key")
        self._public = PublicKey(nacl.bindings.crypto_scalarmult_base(self._raw))

    @classmethod
    def generate(cls) -> PrivateKey:
        """A fresh random key, clamped as Tailscale does so stored bytes match Go's."""
        b = bytearray(os.urandom(KEY_LEN))
        b[0] &= 248
        b[31] = (b[31] & 127) | 64
        return cls(bytes(b))

    @classmethod
    def parse(cls, text: str) -> PrivateKey:
        """Parse `privkey:<hex>` or bare 64-hex."""
        s = text.strip()
        if s.lower().startswith(_PRIVKEY_PREFIX):
            return cls(_parse_hex(s[len(_PRIVKEY_PREFIX):], "privkey"))
        if s.lower().startswith(_NODEKEY_PREFIX):
            raise ValueError("this is a public key (nodekey:...), not a private key")
        if len(s) == 2 * KEY_LEN:
            return cls(_parse_hex(s, "private key"))
        raise ValueError(f"private key: expected privkey:<64 hex> or 64 hex characters, got {len(s)} characters")

    @classmethod
    def coerce(cls, value: PrivateKeyLike) -> PrivateKey:
        """Accept a PrivateKey, 32 raw bytes or `privkey:<hex>`."""
        if isinstance(value, PrivateKey):
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            return cls(bytes(value))
        if isinstance(value, str):
            return cls.parse(value)
        raise TypeError(f"cannot use {type(value).__name__} as a private key")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivateKey:
        """Read a key file: raw 32 bytes (the Go derpconnect format), `privkey:<hex>` text,
        or derper's JSON `{"PrivateKey": "privkey:..."}`."""
        data = Path(path).read_bytes()
        if len(data) == KEY_LEN:
            return cls(data)
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a key file (expected 32 raw bytes or privkey:<hex>, "
                             f"got {len(data)} bytes)") from None
        if text.startswith("{"):
            try:
                text = json.loads(text)["PrivateKey"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}: JSON key file without a PrivateKey string") from None
        try:
            return cls.parse(text)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike[str], *, raw: bool = False) -> None:
        """Write the key atomically with mode 0600: text `privkey:<hex>`, or the 32 raw bytes."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = self._raw if raw else (self.to_text() + "\n").encode()
        write_atomic(p, data, 0o600)

    @property
    def public_key(self) -> PublicKey:
        return self._public

    @property
    def raw(self) -> bytes:
        return self._raw

    def __bytes__(self) -> bytes:
        return self._raw

    def nacl(self) -> nacl.public.PrivateKey:
        return nacl.public.PrivateKey(self._raw)

    def to_text(self) -> str:
        """The secret in Tailscale's text form, `privkey:<64 hex>`, for key files only."""
        return _PRIVKEY_PREFIX + self._raw.hex()

    def __repr__(self) -> str:
        return f"PrivateKey(public={self._public})"

    __str__ = __repr__  # an f-string in a log line must never leak the secret

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PrivateKey):
            return self._raw == other._raw
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._raw)


PublicKeyLike = PublicKey | bytes | bytearray | memoryview | str
PrivateKeyLike = PrivateKey | bytes | bytearray | memoryview | str
