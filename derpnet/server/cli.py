"""Command line of the relay: `python -m derpnet.server --listen HOST:PORT [--tls] ...`.

`add_arguments(parser)` + `run(args)` let another CLI mount it as a sub-command
(`derpconnect relay`); `main(argv)` is the stand-alone entry point. On success one
ready line is printed to stdout (tests parse it to learn the port):
`derpnet relay listening on http://127.0.0.1:3340 (server key nodekey:...)`, then, with
STUN, the log line `STUN on udp HOST:PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import math
import signal
import ssl
import sys

from ..keys import PrivateKey
from ..udpaddr import host_port
from . import loops, operator, tuning
from .keyfile import load_or_create_key
from .mesh import MeshTarget, load_mesh_key, parse_mesh_with
from .meshclient import RETRY_INTERVAL, use_derp_http
from .restart import drain
from .server import RelayOptions, RelayServer, relay_url, tls_setup
from .stun import DEFAULT_PORT as DEFAULT_STUN_PORT

__all__ = ["add_arguments", "run", "main", "parse_listen", "READY_PREFIX", "StartError"]

READY_PREFIX = "derpnet relay listening on "
DEFAULT_LISTEN = "127.0.0.1:3340"
log = logging.getLogger(__name__)


def parse_listen(text: str) -> tuple[str | None, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all interfaces) → (host or None, port)."""
    s = text.strip()
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad listen address {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep:
            raise ValueError(f"bad listen address {text!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"bad listen address {text!r}: put IPv6 addresses in brackets")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in listen address {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in listen address {text!r}")
    return (host or None), port


class StartError(Exception):
    """The relay cannot start: one line for the user, and the exit status (2: a mistake in the
    options, 1: a runtime failure such as a busy port). Each command line prints it its own way."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _DeprecatedKey(argparse.Action):
    """`--key PEM`, the old spelling of --tls-key: still works, with a note once logging is set up."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.deprecated_key = True


def _port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r} (0-65535)")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the relay's options to `parser` (used by this module and by `derpconnect relay`)."""
    parser.add_argument("--listen", "-a", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"address to listen on; port 0 picks a free one (default {DEFAULT_LISTEN}; "
                             "':PORT' = all interfaces)")
    parser.add_argument("--tls", action="store_true",
                        help="serve HTTPS (a self-signed certificate unless --cert/--tls-key are given)")
    parser.add_argument("--cert", metavar="PEM", help="TLS certificate chain file (implies --tls)")
    parser.add_argument("--tls-key", dest="tls_key", metavar="PEM", help="TLS private key file (default: in --cert)")
    parser.add_argument("--key", dest="tls_key", metavar="PEM", action=_DeprecatedKey,
                        help="deprecated spelling of --tls-key")
    parser.add_argument("--hostname", metavar="NAME",
                        help="name in the printed URL and the self-signed certificate (default localhost with TLS)")
    parser.add_argument("--key-file", metavar="PATH",
                        help="server private key; created (0600) if missing; derper's JSON key file works too "
                             "(default: a fresh key each run)")
    parser.add_argument("--no-meta-cert", action="store_true",
                        help="do not send derper's meta certificate (disables TLS 1.3 fast start for Go clients)")
    parser.add_argument("--write-timeout", type=float, default=2.0, metavar="SECONDS",
                        help="drop a client whose writes stall this long (default 2; 0 = never)")
    parser.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="close connections that have not sent their request head (and again their "
                             "ClientInfo) within this time (default 10, as derper)")
    parser.add_argument("--stun-port", type=_port_arg, default=None, metavar="PORT",
                        help=f"answer STUN Binding requests on UDP HOST:PORT, HOST from --listen (default "
                             f"{DEFAULT_STUN_PORT}, skipped with a warning when it cannot be bound; 0 = no STUN)")
    parser.add_argument("--accept-connection-limit", type=float, default=math.inf, metavar="PER_SECOND",
                        help="rate limit for accepting new connections, as derper's flag: over it a connection "
                             "is accepted and closed at once (default: no limit)")
    parser.add_argument("--accept-connection-burst", type=int, default=sys.maxsize, metavar="N",
                        help="how many connections may be accepted at once above that rate, as derper's flag "
                             "(default: no limit)")
    parser.add_argument("--max-unauthenticated", type=int, default=RelayOptions.max_unauthenticated, metavar="N",
                        help="at most N connections that have not completed their hello; more are closed at once "
                             "(default %(default)s)")
    parser.add_argument("--event-loop", choices=loops.CHOICES, default="auto",
                        help="asyncio event loop: uvloop when installed (auto, the default), or the standard one")
    parser.add_argument("--mesh-psk-file", metavar="PATH",
                        help="the mesh's pre-shared key (64 lowercase hex characters), as derper's flag: clients "
                             "presenting it may watch connections and forward packets; others presenting a "
                             "different key are refused")
    parser.add_argument("--mesh-with", metavar="HOST[,HOST...]",
                        help="join a mesh with these relays (derper's flag: HOST[:PORT] dialled as "
                             "https://HOST/derp, HOST/DIALHOST to dial another address, http://HOST:PORT for plain "
                             "HTTP, or all plain with TS_DEBUG_USE_DERP_HTTP=1); this relay may be in the list")
    parser.add_argument("--mesh-retry", type=float, default=RETRY_INTERVAL, metavar="SECONDS",
                        help="wait between attempts to reach a mesh member (default %(default)s, as derper); a "
                             "member refusing our key is retried with a doubling wait, up to 5 minutes")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (one line per connection)")
    operator.add_arguments(parser)


def _fail(msg: str, code: int = 1) -> int:
    raise StartError(msg, code)


def run(args: argparse.Namespace) -> int:
    """Run the relay until SIGINT/SIGTERM; returns the exit code. Raises StartError when it
    cannot start."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if getattr(args, "verbose", False):
        logging.getLogger("derpnet").setLevel(logging.DEBUG)
    if getattr(args, "deprecated_key", False):
        log.warning("relay: --key PEM is deprecated: use --tls-key PEM (the TLS private key file)")
    try:
        host, port = parse_listen(args.listen)
    except ValueError as e:
        return _fail(f"--listen: {e}", 2)
    try:
        key = load_or_create_key(args.key_file) if args.key_file else PrivateKey.generate()
    except (OSError, ValueError) as e:
        return _fail(f"cannot use key file {args.key_file}: {e}")
    try:
        tls = tls_setup(bool(args.tls), args.cert, args.tls_key, args.hostname, host, key.public_key,
                         not args.no_meta_cert)
    except (OSError, ValueError, ssl.SSLError) as e:
        return _fail(f"cannot set up TLS: {e}")
    wt = args.write_timeout if args.write_timeout and args.write_timeout > 0 else None
    try:
        options = RelayOptions(write_timeout=wt, handshake_timeout=args.handshake_timeout,
                               client_info_timeout=args.handshake_timeout,
                               accept_rate=args.accept_connection_limit, accept_burst=args.accept_connection_burst,
                               max_unauthenticated=args.max_unauthenticated)
    except ValueError as e:
        return _fail(str(e), 2)
    try:
        new_loop = loops.loop_factory(getattr(args, "event_loop", "auto"))
    except ImportError as e:
        return _fail(str(e))
    mesh_key, mesh_targets = _mesh_config(args)
    tuning.tune_malloc()
    server = RelayServer(key, host=host, port=port, ssl_context=tls.context, options=options, mesh_key=mesh_key)
    args.mesh_targets = mesh_targets
    try:
        metrics_addr = parse_listen(args.metrics_listen) if getattr(args, "metrics_listen", None) else None
    except ValueError as e:
        return _fail(f"--metrics-listen: {e}")
    try:
        ops = operator.configure(server, args)
    except ValueError as e:  # a ConfigError, naming the file and line
        return _fail(str(e))
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(_serve(server, args, host, ops, metrics_addr))
    except KeyboardInterrupt:  # SIGINT before the handler was installed, or off the main thread
        return 0


async def _serve(server: RelayServer, args: argparse.Namespace, host: str | None, ops: operator.Operator,
                 metrics_addr: tuple[str | None, int] | None) -> int:
    stun_port = getattr(args, "stun_port", None)
    # An explicit STUN port is bound first, so that failing prints nothing but the error;
    # the default one after DERP, where failing is only a warning.
    error = await _start_stun(server, stun_port, host) if stun_port else None
    if error:
        return _fail(error)
    try:
        await server.start()
    except OSError as e:
        await server.close()
        if e.errno == errno.EADDRINUSE:
            return _fail(f"cannot listen on {args.listen}: address already in use "
                         "(choose another address with --listen HOST:PORT)")
        return _fail(f"cannot listen on {args.listen}: {e.strerror or e}")
    if stun_port is None:
        await _start_stun(server, None, host)
    error = await ops.start(server, metrics_addr)
    if error:
        await server.close()
        return _fail(error)
    if getattr(args, "mesh_targets", None):
        server.start_mesh(args.mesh_targets, retry_interval=max(args.mesh_retry, 0.05))
    url = relay_url(host, server.port, server.ssl_context is not None, args.hostname)
    tuning.freeze_startup_objects()
    print(f"{READY_PREFIX}{url} (server key {server.public_key})", flush=True)
    if server.stun is not None:
        log.info("STUN on udp %s", server.stun.address)
    stop = asyncio.Event()
    got: list[int] = []

    def on_signal(sig: int) -> None:
        got.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / not POSIX
            pass
    try:
        await stop.wait()
        if got and got[0] == signal.SIGTERM:  # a graceful restart: clients told when to come back
            await drain(server, args.restart_reconnect_in, args.restart_try_for, args.drain_timeout)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        ops.close()
        log.info("relay: shutting down")
        await server.close()
    return 0


def _mesh_config(args: argparse.Namespace) -> tuple[bytes | None, list[MeshTarget]]:
    """The mesh key and members from --mesh-psk-file/--mesh-with (StartError: one line)."""
    path, members = getattr(args, "mesh_psk_file", None), getattr(args, "mesh_with", None)
    key = None
    if path:
        try:
            key = load_mesh_key(path)
        except OSError as e:
            raise StartError(f"cannot read mesh key file {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise StartError(str(e)) from None
    if not members:
        return key, []
    if key is None:
        raise StartError("--mesh-with requires --mesh-psk-file", 2)
    try:
        return key, parse_mesh_with(members, use_http=use_derp_http())
    except ValueError as e:
        raise StartError(str(e), 2) from None


async def _start_stun(server: RelayServer, requested: int | None, host: str | None) -> str | None:
    """Start STUN on the requested port (None: the default one, given up with a warning when
    it cannot be bound). Returns the one-line error when an explicit port cannot be bound."""
    port = DEFAULT_STUN_PORT if requested is None else requested
    if not port:
        return None
    try:
        await server.start_stun(port)
    except OSError as e:
        where = "udp " + host_port(host or "", port)
        reason = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        if requested is not None:
            return f"cannot listen for STUN on {where}: {reason}"
        log.warning("no STUN: cannot listen on %s: %s (choose another with --stun-port, 0 to disable)",
                    where, reason)
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m derpnet.server`: parse `argv` and run the relay."""
    parser = argparse.ArgumentParser(prog="python -m derpnet.server",
                                     description="Run a DERP relay (Tailscale-compatible) for derpnet.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except StartError as e:
        print(f"derpnet relay: {e}", file=sys.stderr, flush=True)
        return e.code
