"""`derpconnect relay`: the embedded DERP relay server (derpnet.server), with its own options.

What this adds to `python -m derpnet.server`: with `--tls` and no `--cert`, the self-signed
certificate is kept in `--cert-dir` (default `<user config dir>/derpconnect/relay-certs/`)
and reused across restarts, so clients can trust it once with `--derp-ca FILE`; its path
is logged.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
from pathlib import Path

from .._files import write_atomic
from .common import UsageError, UserError, user_config_dir

log = logging.getLogger("derpnet.cmd")

NAME = "relay"
HELP = "run a DERP relay server (plain HTTP or TLS)"
DESCRIPTION = """\
Run derpnet's own DERP relay: serve and join peers meet on it with
--derp=http://HOST:PORT (plain HTTP) or --derp=https://HOST:PORT (TLS). With --tls and no
--cert a self-signed certificate is made once, kept in --cert-dir and reused; clients trust
it with --derp-ca CERTFILE (the path is logged at start). Prints one ready line on stdout:
`derpnet relay listening on URL (server key nodekey:...)`.
"""
COMMON_OPTIONS = False  # the relay takes the server's options, not --derp/--key

_MISSING = "the relay server (derpnet.server) is not available in this installation"
RENEW_BEFORE = datetime.timedelta(days=7)


def add_arguments(p: argparse.ArgumentParser) -> None:
    try:
        from .. import server
        add = server.add_arguments
        server.run  # noqa: B018 -- checks that the relay's entry point is installed too
    except (ImportError, AttributeError) as e:  # a partial installation: say so when used
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(_relay_missing=str(e))
        return
    add(p)
    p.add_argument("--cert-dir", metavar="DIR", default=None,
                   help="where --tls without --cert keeps its self-signed certificate "
                        "(default <user config dir>/derpconnect/relay-certs)")
    for flags, text in ((("-v", "--verbose"), "more logging"),
                        (("-debug", "--debug"), "debug logging")):
        try:
            p.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, help=text)
        except argparse.ArgumentError:
            pass  # the server defines it itself


def run(args: argparse.Namespace) -> int:
    missing = getattr(args, "_relay_missing", None)
    if missing is not None:
        raise UserError(f"{_MISSING} ({missing})")
    from .. import server

    if not getattr(args, "debug", False):
        logging.getLogger("derpnet.server").setLevel(logging.DEBUG if getattr(args, "verbose", False)
                                                     else logging.INFO)
    if getattr(args, "tls", False) and not getattr(args, "cert", None):
        cert, key = _persistent_self_signed(args)
        args.cert, args.tls_key = str(cert), str(key)
        log.info("TLS with a self-signed certificate: clients need --derp-ca %s", cert)
    try:
        return int(server.run(args) or 0)
    except server.StartError as e:
        raise UserError(str(e), e.code) from None


def _names(args: argparse.Namespace) -> list[str]:
    from ..server.cli import parse_listen

    try:
        host, _ = parse_listen(args.listen)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from ..server.certs import default_names

    return default_names(args.hostname, host)


def _persistent_self_signed(args: argparse.Namespace) -> tuple[Path, Path]:
    """(cert, key) paths of a self-signed certificate covering the relay's names: reused when
    it exists, covers them and is not about to expire; else made anew (key 0600)."""
    from ..server import certs

    names = _names(args)
    d = Path(args.cert_dir).expanduser() if getattr(args, "cert_dir", None) else \
        user_config_dir() / "derpconnect" / "relay-certs"
    stem = "".join(c for c in names[0] if c.isalnum() or c in "-.") or "relay"
    cert_path, key_path = d / f"{stem}.crt", d / f"{stem}.key"
    if _usable(cert_path, key_path, names):
        return cert_path, key_path
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_pem, key_pem = certs.self_signed_cert(names)
        write_atomic(key_path, key_pem, 0o600)
        write_atomic(cert_path, cert_pem, 0o644)
    except OSError as e:
        raise UserError(f"cannot write the relay's certificate in {d}: {e.strerror or e}") from None
    log.info("made a self-signed certificate for %s in %s", ", ".join(names), cert_path)
    return cert_path, key_path


def _usable(cert_path: Path, key_path: Path, names: list[str]) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if not key_path.is_file():
            return False
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
        have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
        expires = cert.not_valid_after_utc
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    wanted = {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in names}
    return wanted <= have and expires - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False



