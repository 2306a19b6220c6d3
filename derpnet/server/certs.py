"""TLS material for the relay: a self-signed certificate when none is given, derper's
"meta certificate" (the server key inside the TLS handshake, for fast start), and the
server `SSLContext` that serves them.

The meta certificate (shared/derp-protocol.md §1.4) is self-signed with a throw-away
Ed25519 key, CN `derpkey<64 hex of the server public key>`, serial number 2 (the DERP
protocol version), valid ±30 days. It is appended as the last certificate of the chain
file given to `load_cert_chain`, so OpenSSL sends it after the leaf and intermediates;
clients that verify the leaf ignore it, Go clients on TLS 1.3 read the key from it.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..frames import PROTOCOL_VERSION
from ..keys import PublicKey

__all__ = ["META_CERT_CN_PREFIX", "self_signed_cert", "meta_cert", "read_cert_files",
           "server_ssl_context", "cert_sha256", "meta_key_from_chain"]

META_CERT_CN_PREFIX = "derpkey"
PathLike = str | os.PathLike[str]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    seen = set()
    for n in names:
        if not n or n in seen:
            continue
        seen.add(n)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


def default_names(hostname: str | None, listen_host: str | None) -> list[str]:
    """Names for a self-signed relay certificate: the advertised hostname, loopback,
    and the listen address when it is a specific host."""
    names = [hostname or "localhost", "localhost", "127.0.0.1", "::1"]
    if listen_host:
        try:
            if not ipaddress.ip_address(listen_host).is_unspecified:
                names.append(listen_host)
        except ValueError:
            names.append(listen_host)
    return list(dict.fromkeys(names))


def self_signed_cert(names: Iterable[str], *, days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 server certificate for `names` (DNS names or IPs): (cert PEM, key PEM).

    Usable as its own trust anchor by clients (`cadata=` / SSL_CERT_FILE).
    """
    names = [n for n in names if n]
    if not names:
        raise ValueError("self_signed_cert needs at least one name")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def meta_cert(server_key: PublicKey) -> bytes:
    """derper's meta certificate for `server_key`, PEM encoded."""
    key = ed25519.Ed25519PrivateKey.generate()
    # 71 characters: over X.509's 64-character CN bound, which Go ignores (so must we).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cn = x509.NameAttribute(NameOID.COMMON_NAME, META_CERT_CN_PREFIX + server_key.hex(), _validate=False)
    name = x509.Name([cn])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(PROTOCOL_VERSION)
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def meta_key_from_chain(der_certs: Iterable[bytes]) -> tuple[PublicKey, int] | None:
    """What a fast-start client reads from the peer's chain: (server key, version) from a meta cert, or None."""
    for der in der_certs:
        try:
            cert = x509.load_der_x509_certificate(der)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the meta CN is longer than X.509 allows
                cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            continue
        cn = cns[0].value if cns else ""
        if isinstance(cn, str) and cn.startswith(META_CERT_CN_PREFIX) and cert.serial_number < 256:
            try:
                return PublicKey.parse(cn[len(META_CERT_CN_PREFIX):]), cert.serial_number
            except ValueError:
                continue
    return None


def read_cert_files(certfile: PathLike, keyfile: PathLike | None = None) -> tuple[bytes, bytes]:
    """Read a PEM certificate chain and its private key (the key may live in the cert file)."""
    chain = Path(certfile).read_bytes()
    key = Path(keyfile).read_bytes() if keyfile else chain
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise ValueError(f"{certfile}: no PEM certificate in it")
    if b"PRIVATE KEY-----" not in key:
        raise ValueError(f"{keyfile or certfile}: no PEM private key in it")
    return chain, key


def cert_sha256(cert_pem: bytes) -> str:
    """Hex SHA-256 of the first certificate's DER (derper's `sha256-raw:` CertName pin)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def server_ssl_context(chain_pem: bytes, key_pem: bytes, *, extra_pem: bytes | None = None) -> ssl.SSLContext:
    """A TLS ≥ 1.2 server context offering only `http/1.1`, serving `chain_pem` (+ `extra_pem` last).

    `load_cert_chain` needs files: they are written to a private temporary directory and
    removed as soon as OpenSSL has read them.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])  # never h2: the DERP upgrade needs HTTP/1.1
    chain = chain_pem if chain_pem.endswith(b"\n") else chain_pem + b"\n"
    if extra_pem:
        chain += extra_pem
    with tempfile.TemporaryDirectory(prefix="derpnet-tls-") as d:
        cpath, kpath = os.path.join(d, "chain.pem"), os.path.join(d, "key.pem")
        for path, data in ((cpath, chain), (kpath, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cpath, kpath)
    return ctx
