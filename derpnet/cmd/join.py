"""`derpconnect join PUBKEY [LISTEN]`: listen on a local TCP port and forward every
connection over a new stream to the serving peer."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import AuthenticationError, DerpError, PeerNotConnected
from ..keys import PrivateKey, PublicKey
from . import stdio, udpforward
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
    positive_float,
)
from .forward import Tunnels, abort
from .relays import Relays
from .serve import add_idle_timeout, quic_options

if TYPE_CHECKING:
    import derpquic

log = logging.getLogger("derpnet.cmd")

NAME = "join"
HELP = "listen on a local TCP port and forward connections to a serving peer"
DESCRIPTION = """\
Listen on LISTEN (PORT, or HOST:PORT; default 127.0.0.1 and a random port) and forward
every accepted TCP connection to the peer PUBKEY (as printed by its `serve`). Unlike the
Go tool, only loopback is listened on unless asked: use 0.0.0.0:PORT (or [::]:PORT) to
accept connections from other machines.

With LISTEN - (or --stdio), one stream is carried over stdin/stdout instead, for ssh:
  ssh -o ProxyCommand='derpconnect --derp=HOST join PUBKEY -' user@host
(serve forwards to the sshd port; stdout carries only the stream, logs go to stderr).
"""

DIAL_TIMEOUT = 15.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pubkey", metavar="PUBKEY",
                   help="the serving peer's public key (43-char base64url as printed by serve, or nodekey:<hex>)")
    p.add_argument("listen", metavar="LISTEN", nargs="?", default="0",
                   help="local PORT or HOST:PORT to listen on (default: a random port on 127.0.0.1); "
                        "- carries one stream over stdin/stdout instead (see --stdio)")
    p.add_argument("--stdio", action="store_true",
                   help="carry one stream over stdin/stdout (as LISTEN -), e.g. for ssh -o "
                        "ProxyCommand='derpconnect --derp=HOST join PUBKEY -'; half-close both ways, "
                        "logs on stderr only")
    p.add_argument("--insecure-allow-unauthenticated", action="store_true",
                   help="accept a serving peer that cannot prove it holds PUBKEY, such as the Go "
                        "derpconnect (its identity is then only vouched for by the relay)")
    p.add_argument("--max-conns", metavar="N", type=max_conns, default=256,
                   help="at most N connections at once (default %(default)s)")
    p.add_argument("--dial-timeout", metavar="SECONDS", type=positive_float, default=DIAL_TIMEOUT,
                   help="give up on reaching the peer for one connection after this time (default %(default)g)")
    add_idle_timeout(p)
    udpforward.add_arguments(p, "join")


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "posix":  # lets a restarted join reuse its port at once (TIME_WAIT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        what = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise UserError(f"cannot listen on {_fmt_addr(host, port)}: {what}") from None
    return sock


def _fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def join_identity(args: argparse.Namespace, peer: PublicKey) -> PrivateKey:
    """This node's key for joining `peer` (not `peer` itself), its key file locked (shared)."""
    key, key_path = load_or_create_identity(args)
    if peer.raw == key.raw:  # bare hex parses as a public key: never print it back
        raise UsageError("PUBKEY is this node's private key (not shown): give its public key (derpconnect pubkey)")
    if peer == key.public_key:
        raise UsageError(f"PUBKEY is this node's own public key (key file {key_path}): a node cannot join "
                         f"itself; to join a serve on this machine, give this side its own identity "
                         f"with --key NAME (e.g. --key laptop)")
    lock_identity(key_path, exclusive=False)  # held until the process ends; refused next to a serve
    return key


def run(args: argparse.Namespace) -> int:
    if stdio.wanted(args):
        return stdio.run(args, _dial_options(args))
    peer = parse_public_key(args.pubkey, "peer public key")
    host, port = local_endpoint(args.listen, default_host="127.0.0.1", what="listen address")
    relays = Relays.from_args(args)
    key = join_identity(args, peer)

    import derpquic

    options = _dial_options(args)
    if args.udp:
        return udpforward.run_join(args, options, peer, relays, key)

    stop = Stopper().install()
    lsock = _listen(host, port)
    dialer = None
    tunnels = Tunnels(args.max_conns)
    fatal: list[str] = []
    try:
        try:
            dialer, relay_host = relays.connect(
                lambda h, ssl: derpquic.Dialer(h, key, **options, **ssl), args.connect_timeout, stop)
        except Interrupted:
            return EXIT_OK
        dialer.prepare(peer)  # the handshakes now, not in the first connection's way
        addr = lsock.getsockname()
        log.info("Listening on %s", _fmt_addr(addr[0], addr[1]))
        log.info("forwarding to %s through %s as %s", peer.b64(), relay_host, key.public_key.b64())
        lsock.settimeout(0.2)
        while not stop.is_set():
            if not tunnels.acquire(stop.event):
                break
            try:
                conn, src = lsock.accept()
            except TimeoutError:
                tunnels.release_slot()
                continue
            except OSError as e:
                tunnels.release_slot()
                if stop.is_set():
                    break
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept: %s", e.strerror)
                    stop.event.wait(0.1)
                    continue
                raise UserError(f"accept on {_fmt_addr(addr[0], addr[1])} failed: {e.strerror or e}") from None
            conn.settimeout(None)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            threading.Thread(target=_dial_peer,
                             args=(tunnels, dialer, peer, key.public_key.b64(), conn, src, args, stop, fatal),
                             name=f"dial-{src[1]}", daemon=True).start()
        if fatal:
            raise UserError(fatal[0], EXIT_FAILURE)
        log.info("%s: shutting down", stop.signal_name or "stop")
        return EXIT_OK
    finally:
        try:
            lsock.close()
        except OSError:
            pass
        n = tunnels.close_all(0.3)
        if n:
            log.info("closed %d open connection(s)", n)
        if dialer is not None:
            close_bounded([dialer], 0.3, linger=0.2)
        stop.restore()


def _dial_options(args: argparse.Namespace) -> dict[str, Any]:
    options = quic_options(args)
    if args.insecure_allow_unauthenticated:
        options["allow_unauthenticated"] = True
    return options


def _dial_peer(tunnels: Tunnels, dialer: derpquic.Dialer, peer: PublicKey, me: str, conn: socket.socket,
               src: tuple[Any, ...], args: argparse.Namespace, stop: Stopper, fatal: list[str]) -> None:
    client = _fmt_addr(src[0], src[1])
    if not _reachable(dialer, peer, args.dial_timeout, stop):  # blame the relay, not the peer
        if not stop.is_set():
            log.error("connection from %s: relay %s is unreachable (reconnecting; waited %g s), so peer %s "
                      "cannot be reached", client, dialer.packet_conn.relay_url, args.dial_timeout, peer.b64())
        abort(conn)
        tunnels.release_slot()
        return
    try:
        stream = dialer.dial(peer, timeout=args.dial_timeout)
    except AuthenticationError as e:
        log.debug("dial %s: %s", peer.b64(), e)
        if "derpnet-auth" in str(e):  # the peer does not take part in key proofs at all
            why = (f"peer {peer.b64()} cannot prove it holds its key: it is probably the Go derpconnect; "
                   f"to join it anyway (trusting the relay) use --insecure-allow-unauthenticated")
        else:
            why = f"authentication with peer {peer.b64()} failed: {e}"
        _refused(conn, tunnels, stop, fatal, why)
        return
    except PeerNotConnected as e:  # offline: this connection fails, later ones may work
        _dial_failed(tunnels, conn, client, peer, e, args, stop, dialer)
        return
    except ConnectionRefusedError:
        _refused(conn, tunnels, stop, fatal,
                 f"peer {peer.b64()} refused this node: it serves with --allow and this node's key "
                 f"is not in it; ask its operator to add --allow {me}")
        return
    except (OSError, DerpError) as e:
        _dial_failed(tunnels, conn, client, peer, e, args, stop, dialer)
        return
    except Exception as e:  # noqa: BLE001 - never kill the accept loop from a dial thread
        log.error("connection from %s: unexpected error dialling the peer: %s: %s", client, type(e).__name__, e)
        abort(conn)
        tunnels.release_slot()
        return
    label = f"{client} to {peer.b64()[:8]}"
    if not getattr(stream, "authenticated", True):
        label += " (unverified)"  # --insecure-allow-unauthenticated: the relay could be in the middle
    tunnels.run(conn, stream, peer=label, what="from")


def _reachable(dialer: derpquic.Dialer, peer: PublicKey, timeout: float, stop: Stopper) -> bool:
    """Whether `peer` can be reached now: the relay link is up, or a direct path to the peer
    is; during a relay outage, waits up to `timeout` for either."""
    pc = dialer.packet_conn
    end = time.monotonic() + timeout
    while not pc.wait_connected(min(0.2, max(0.0, end - time.monotonic()))):
        if pc.paths().get(peer, {}).get("path", "relay") != "relay":
            return True
        if stop.is_set() or pc.closed or time.monotonic() >= end:
            return False
    return True


def _dial_failed(tunnels: Tunnels, conn: socket.socket, client: str, peer: PublicKey, e: BaseException,
                 args: argparse.Namespace, stop: Stopper, dialer: derpquic.Dialer) -> None:
    if stop.is_set():
        pass
    elif not dialer.packet_conn.connected:  # the relay went while dialling: not the peer's fault
        log.error("connection from %s: relay %s is unreachable (reconnecting), so peer %s cannot be reached",
                  client, dialer.packet_conn.relay_url, peer.b64())
    else:
        if isinstance(e, (TimeoutError, socket.timeout)):
            why = f"no answer within {args.dial_timeout:g} s (is it serving, on the same relay or region?)"
        elif isinstance(e, DerpError):
            why = describe_error(e)
        else:
            why = str(e) or type(e).__name__
        log.error("connection from %s: cannot reach peer %s: %s", client, peer.b64(), why)
    abort(conn)
    tunnels.release_slot()


def _refused(conn: socket.socket, tunnels: Tunnels, stop: Stopper, fatal: list[str], message: str) -> None:
    abort(conn)
    tunnels.release_slot()
    if not fatal:
        fatal.append(message)
    stop.event.set()
