"""`derpconnect serve PORT`: accept QUIC streams through the relay and forward each to a
local TCP port."""

from __future__ import annotations

import argparse
import logging
import shlex
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DerpError
from . import udpforward
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    Interrupted,
    Stopper,
    UsageError,
    UserError,
    close_bounded,
    describe_error,
    load_or_create_identity,
    local_endpoint,
    lock_identity,
    max_conns,
    parse_public_key,
    path_options,
    positive_float,
)
from .forward import Tunnels, abort
from .relays import Relays

if TYPE_CHECKING:
    import derpquic

log = logging.getLogger("derpnet.cmd")

NAME = "serve"
HELP = "forward streams from peers to a local TCP port"
DESCRIPTION = """\
Accept connections from peers through the DERP relay and forward each one to TARGET, a
local TCP port (PORT means localhost:PORT) or HOST:PORT. Prints this node's public key and
the command to run on the other side. With --udp, TARGET is a UDP port and datagrams
are forwarded instead (the other side runs `join --udp`).
"""

LOCAL_CONNECT_TIMEOUT = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="TARGET", help="PORT or HOST:PORT to forward to")
    p.add_argument("--allow", metavar="PUBKEY", action="append", default=[],
                   help="only accept this peer (repeatable): it must prove it holds the key, others "
                        "are refused before any byte reaches TARGET. Without --allow anyone who knows "
                        "this node's public key may connect, including the Go derpconnect (which "
                        "cannot prove its key, so it can never pass --allow)")
    p.add_argument("--max-conns", metavar="N", type=max_conns, default=256,
                   help="at most N connections at once (default %(default)s)")
    add_idle_timeout(p)
    udpforward.add_arguments(p, "serve")


def add_idle_timeout(p: argparse.ArgumentParser) -> None:
    """--idle-timeout, for serve and join."""
    p.add_argument("--idle-timeout", metavar="SECONDS", type=positive_float, default=30.0,
                   help="give up on a peer that has been silent this long: its tunnels are reset "
                        "(default %(default)g; the smaller of both sides' applies; idle tunnels are "
                        "kept alive meanwhile)")


def quic_options(args: argparse.Namespace) -> dict[str, Any]:
    """The derpquic options serve and join share: direct paths and the idle timeout."""
    options: dict[str, Any] = path_options(args)
    if getattr(args, "connect_timeout", None):  # the library's default (10 s) must not cut it short
        options["connect_timeout"] = args.connect_timeout
    idle = getattr(args, "idle_timeout", None)
    if idle is not None:
        options["idle_timeout"] = idle
        options["keepalive_interval"] = min(10.0, idle / 3)
    return options


def run(args: argparse.Namespace) -> int:
    host, port = local_endpoint(args.target, default_host="localhost", what="serve target")
    if port == 0:
        raise UsageError(f"serve target {args.target!r}: port 0 is not a port to forward to")
    allow = [parse_public_key(a, "--allow key") for a in args.allow]
    relays = Relays.from_args(args)
    key, key_path = load_or_create_identity(args)
    if any(a.raw == key.raw for a in allow):  # bare hex parses as a public key: never print it back
        raise UsageError("--allow: that is this node's private key (not shown): give public keys")
    lock_identity(key_path, exclusive=True)  # held until the process ends

    import derpquic

    options = quic_options(args)
    if allow:
        options["allow"] = allow
    if args.udp:
        return udpforward.run_serve(args, options, relays, key, key_path)

    stop = Stopper().install()
    listener = None
    tunnels = Tunnels(args.max_conns)
    try:
        try:
            listener, relay_host = relays.connect(
                lambda h, ssl: derpquic.listen(h, key, **options, **ssl), args.connect_timeout, stop)
        except Interrupted:
            return EXIT_OK
        shown = relays.shown(relay_host)
        ca = ca_option(args) if not relay_host.startswith("http://") else ""  # plain HTTP: no CA
        log.info('Listening through DERP. Join with "derpconnect --derp=%s%s join %s"', shown, ca,
                 key.public_key.b64())
        log.info("public key %s (%s), key file %s; forwarding to %s:%d%s", key.public_key.b64(), key.public_key,
                 key_path, host, port, f"; allowing only {', '.join(k.b64() for k in allow)}" if allow else "")
        allowed = set(allow)
        failure: str | None = None
        while not stop.is_set():
            if not tunnels.acquire(stop.event):
                break
            try:
                stream = listener.accept(timeout=0.2)
            except TimeoutError:
                tunnels.release_slot()
                continue
            except (OSError, DerpError) as e:
                tunnels.release_slot()
                if stop.is_set():
                    break
                failure = f"the relay connection failed: {describe_error(e, relay_host)}"
                break
            peer, proven = stream.remote_addr(), stream.peer_key
            if allowed and (proven is None or proven not in allowed):
                # derpquic refuses these before any stream exists; never let one through anyway
                log.warning("refused a stream from %s: not in --allow", _b64(peer))
                abort(stream)
                tunnels.release_slot()
                continue
            # A peer that did not prove its key (a Go derpconnect, or whoever the relay says) is
            # named as such on every line about its connection.
            label = _b64(peer) if proven is not None else f"{_b64(peer)} (UNVERIFIED: did not prove this key)"
            threading.Thread(target=_connect_local, args=(tunnels, stream, host, port, label),
                             name=f"connect-{host}:{port}", daemon=True).start()
        if failure:
            raise UserError(failure, EXIT_FAILURE)
        log.info("%s: shutting down", stop.signal_name or "stop")
        return EXIT_OK
    finally:
        n = tunnels.close_all(0.3)
        if n:
            log.info("closed %d open connection(s)", n)
        if listener is not None:
            close_bounded([listener], 0.3, linger=0.2)
        stop.restore()


def ca_option(args: argparse.Namespace) -> str:
    """` --derp-ca PATH` when this side trusts the relay through --derp-ca (a private or
    self-signed relay, such as `derpconnect relay --tls`): the other side needs it too
    (a copy of that file, on another machine)."""
    ca = getattr(args, "derp_ca", None)
    if not ca:
        return ""
    return f" --derp-ca {shlex.quote(str(Path(ca).expanduser().resolve()))}"


def _b64(peer: object) -> str:
    b64 = getattr(peer, "b64", None)
    return str(b64()) if b64 else str(peer)


def _connect_local(tunnels: Tunnels, stream: derpquic.Stream, host: str, port: int, peer: str) -> None:
    try:
        sock = socket.create_connection((host, port), timeout=LOCAL_CONNECT_TIMEOUT)
    except OSError as e:
        log.error("stream from %s: cannot connect to %s:%d: %s", peer, host, port,
                  e.strerror or e or type(e).__name__)
        abort(stream)
        tunnels.release_slot()
        return
    sock.settimeout(None)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    tunnels.run(sock, stream, peer=peer, what="from")
