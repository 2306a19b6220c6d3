"""derpconnect's command line: flag-compatible with the Go `derpconnect`, plus more.

Go's `flag` package accepts `-derp=x`, `--derp=x`, `-derp x` and `--derp x`; so do we for the
Go tool's flags (`derp`, `key`, `debug`). Options may come before the command (as the Go
tool requires) or after it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    UserError,
    host_port,
    parse_public_key,
    positive_float,
    setup_logging,
)
from .relays import DerpAction

log = logging.getLogger("derpnet.cmd")

PROG = "derpconnect"

DESCRIPTION = """\
Expose a TCP port of one machine on another through a Tailscale DERP relay. Peers are
addressed by curve25519 public keys; traffic is carried in QUIC streams, end to end
encrypted and authenticated.

  on the server:  derpconnect --derp=HOST serve 8080
  on the client:  derpconnect --derp=HOST join PUBKEY 8080   (then connect to 127.0.0.1:8080)
  ssh through it: ssh -o ProxyCommand='derpconnect --derp=HOST join PUBKEY -' user@host
  UDP:            serve --udp 51820 / join --udp PUBKEY 51820

HOST is a DERP server (derp1f.tailscale.com), a URL (https://host:port, http://host:port)
or a Tailscale region code or id (nyc, 1; see `derpconnect regions`); several relays as
HOST1,HOST2 (or --derp repeated): serve is reachable on all, join moves on when one fails.
"""

EPILOG = """\
environment: DERPNET_DERP (default --derp), DERPNET_KEY (default --key),
DERPNET_DERP_MAP (default --derp-map).
exit status: 0 ok (also after Ctrl-C/SIGTERM), 1 runtime failure, 2 command-line mistake.
"""

# Go bool flags take `-debug=true`; argparse flags take no value: rewrite these forms.
_BOOL_FLAGS = {"debug": "--debug", "verbose": "--verbose"}


class _Parser(argparse.ArgumentParser):
    """Usage errors become one line (UsageError), not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _common_options(p: argparse.ArgumentParser, sub: bool) -> None:
    """The options every command takes. On a subcommand parser they default to SUPPRESS,
    so that values given before the command are not overwritten."""

    def d(value: object) -> object:
        return argparse.SUPPRESS if sub else value

    g = p.add_argument_group("common options")
    g.add_argument("-derp", "--derp", metavar="HOST", action=DerpAction,
                   default=d(os.environ.get("DERPNET_DERP") or None),
                   help="DERP relay: host name, https://host:port, http://host:port, wss:// or ws:// (DERP over "
                        "WebSocket), or region code/id (env DERPNET_DERP); HTTPS_PROXY/HTTP_PROXY/NO_PROXY apply; "
                        "several relays as a comma-separated list or --derp repeated: serve is reachable on all, "
                        "join uses the one that reaches the peer and moves on when it fails")
    g.add_argument("-key", "--key", metavar="NAME", default=d(os.environ.get("DERPNET_KEY") or "derpconnect"),
                   help="name of the private key file under <user config dir>/derpconnect/ "
                        "(raw 32 bytes, created 0600 on first use; same file as the Go tool; "
                        "default %(default)s, env DERPNET_KEY)" if not sub else
                        "name of the private key file (see top-level help)")
    g.add_argument("--key-file", metavar="PATH", default=d(None),
                   help="private key file path (overrides --key); raw 32 bytes, privkey:<hex> "
                        "or derper JSON; created 0600 if missing")
    g.add_argument("--derp-ca", metavar="PEM", default=d(None),
                   help="trust this CA certificate file for the relay's TLS (instead of the system roots)")
    g.add_argument("--derp-map", metavar="FILE", default=d(os.environ.get("DERPNET_DERP_MAP") or None),
                   help="DERP map JSON used for region codes (default: the cached copy from "
                        "`regions --refresh`, else the built-in snapshot; env DERPNET_DERP_MAP)")
    g.add_argument("--connect-timeout", metavar="SECONDS", type=positive_float, default=d(20.0),
                   help="give up starting when the relay does not answer within this time (default 20)")
    g.add_argument("--no-direct", action="store_true", default=d(False),
                   help="never try a direct UDP path to the peer: every packet goes through the relay")
    g.add_argument("--stun", metavar="HOST:PORT", type=host_port, default=d(None),
                   help="STUN server that tells this node its public address (default: the relay's "
                        "host, UDP port 3478); no answer only means local addresses are offered")
    g.add_argument("-debug", "--debug", action="store_true", default=d(False),
                   help="debug logging (also the libraries' protocol details)")
    g.add_argument("-v", "-verbose", "--verbose", action="store_true", default=d(False),
                   help="more logging, and a traceback with unexpected errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s (derpnet) {__version__}")
    _common_options(parser, sub=False)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help, description=description or help, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        return p

    from . import join, keygen, regions, relay, serve

    for mod in (serve, join, relay, keygen, regions):
        p = add(mod.NAME, mod.HELP, getattr(mod, "DESCRIPTION", None))
        mod.add_arguments(p)
        if getattr(mod, "COMMON_OPTIONS", True):
            _common_options(p, sub=True)
        p.set_defaults(_run=mod.run)
    pk = add(keygen.PUBKEY_NAME, keygen.PUBKEY_HELP)
    keygen.add_pubkey_arguments(pk)
    _common_options(pk, sub=True)
    pk.set_defaults(_run=keygen.run_pubkey)
    return parser


_B64_KEY_WITH_DASH = re.compile(r"-[A-Za-z0-9_+/=-]{42,43}")


def _normalise(argv: Sequence[str]) -> list[str]:
    """Go's flag syntax for booleans (`-debug=true`, `--debug=false`) to argparse's; and a
    43-character base64url public key that begins with "-" (argparse would take it for an
    option) to its equivalent `nodekey:<hex>` form."""
    out: list[str] = []
    for i, a in enumerate(argv):
        if a == "--":
            out.extend(argv[i:])
            break
        if _B64_KEY_WITH_DASH.fullmatch(a):
            out.append(str(parse_public_key(a)))  # a malformed one: its own error, not "unrecognized"
            continue
        if a.startswith("-") and "=" in a:
            name, _, value = a.lstrip("-").partition("=")
            if name in _BOOL_FLAGS:
                v = value.lower()
                if v in ("1", "t", "true"):
                    out.append(_BOOL_FLAGS[name])
                    continue
                if v in ("0", "f", "false"):
                    continue
                raise UsageError(f"invalid boolean value {value!r} for -{name}")
        out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run derpconnect; returns the exit status (0 ok, 1 failure, 2 usage mistake)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "-verbose", "--verbose", "-debug", "--debug") for a in args_list)
    try:
        args = build_parser().parse_args(_normalise(args_list))
        verbose = bool(args.verbose or args.debug)
        setup_logging(args.verbose, args.debug)
        if not getattr(args, "_run", None):
            raise UsageError("no command given: use serve, join, relay, keygen, pubkey or regions "
                             f"(see {PROG} --help)")
        rc = int(args._run(args) or EXIT_OK)
    except UserError as e:
        _error_line(str(e))
        rc = e.code
    except KeyboardInterrupt:  # before the command installed its own handler
        rc = EXIT_OK
    except BrokenPipeError:  # `derpconnect regions | head`: the reader left, not an error
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        rc = EXIT_OK
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if verbose:
            import traceback
            traceback.print_exc()
        _error_line(f"unexpected error: {type(e).__name__}: {e}" + ("" if verbose else " (run with -v for details)"))
        rc = EXIT_FAILURE
    if argv is None:
        # The real command line (not a call from Python code): never let a library thread
        # that failed to stop keep the process alive after the command is done.
        from .session import hard_exit_if_stuck
        hard_exit_if_stuck(rc)
    return rc


def _error_line(msg: str) -> None:
    msg = " ".join(msg.split())  # one line, whatever the message contained
    try:
        sys.stderr.write(f"{PROG}: error: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]
