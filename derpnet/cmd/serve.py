"""`derpconnect serve PORT`: accept QUIC streams through the relay and forward each to a
local TCP port."""

from __future__ import annotations

import argparse
import logging
import socket
import threading
from typing import Optional

from ..errors import DerpError
from .common import (EXIT_FAILURE, EXIT_OK, Interrupted, Stopper, UsageError, UserError, close_bounded,
                     describe_error, load_or_create_identity, local_endpoint, parse_public_key,
                     path_options, relay_ssl_context, relay_target)
from .forward import Tunnels, abort
from .session import connect_relay

log = logging.getLogger("derpnet.cmd")

NAME = "serve"
HELP = "forward streams from peers to a local TCP port"
DESCRIPTION = """\
Accept connections from peers through the DERP relay and forward each one to TARGET, a
local TCP port (PORT means localhost:PORT) or HOST:PORT. Prints this node's public key and
the command to run on the other side.
"""

LOCAL_CONNECT_TIMEOUT = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="TARGET", help="PORT or HOST:PORT to forward to")
    p.add_argument("--allow", metavar="PUBKEY", action="append", default=[],
                   help="only accept this peer (repeatable): it must prove it holds the key, others "
                        "are refused before any byte reaches TARGET. Without --allow anyone who knows "
                        "this node's public key may connect, including the Go derpconnect (which "
                        "cannot prove its key, so it can never pass --allow)")
    p.add_argument("--max-conns", metavar="N", type=_max_conns, default=256,
                   help="at most N connections at once (default %(default)s)")


def _max_conns(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= v <= 10000:
        raise argparse.ArgumentTypeError("must be between 1 and 10000")
    return v


def run(args) -> int:
    host, port = local_endpoint(args.target, default_host="localhost", what="serve target")
    if port == 0:
        raise UsageError(f"serve target {args.target!r}: port 0 is not a port to forward to")
    allow = [parse_public_key(a, "--allow key") for a in args.allow]
    target = relay_target(args)
    ssl_context = relay_ssl_context(args, target.insecure)
    key, key_path = load_or_create_identity(args)

    import derpquic

    options: dict = path_options(args)
    if ssl_context is not None:
        options["ssl_context"] = ssl_context
    if allow:
        options["allow"] = allow

    stop = Stopper().install()
    listener = None
    tunnels = Tunnels(args.max_conns)
    try:
        try:
            listener, relay_host = connect_relay(
                target, lambda h: derpquic.listen(h, key, **options), args.connect_timeout, stop)
        except Interrupted:
            return EXIT_OK
        shown = relay_host if target.region is not None else args.derp
        log.info('Listening through DERP. Join with "derpconnect --derp=%s join %s"', shown, key.public_key.b64())
        log.info("public key %s (%s), key file %s; forwarding to %s:%d%s", key.public_key.b64(), key.public_key,
                 key_path, host, port, f"; allowing only {', '.join(k.b64() for k in allow)}" if allow else "")
        allowed = set(allow)
        failure: Optional[str] = None
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
            peer = stream.remote_addr()
            if allowed and (peer not in allowed or not getattr(stream, "authenticated", False)):
                # derpquic refuses these before any stream exists; never let one through anyway
                log.warning("refused a stream from %s: not in --allow", _b64(peer))
                abort(stream)
                tunnels.release_slot()
                continue
            label = _b64(peer) if getattr(stream, "authenticated", True) else f"{_b64(peer)} (unverified)"
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


def _b64(peer) -> str:
    b64 = getattr(peer, "b64", None)
    return b64() if b64 else str(peer)


def _connect_local(tunnels: Tunnels, stream, host: str, port: int, peer: str) -> None:
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
    tunnels.start(sock, stream, peer=peer, what="from")
