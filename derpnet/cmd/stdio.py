"""`derpconnect join PUBKEY -` (or `join --stdio PUBKEY`): one stream over stdin/stdout.

For ssh's ProxyCommand (`ssh -o ProxyCommand='derpconnect --derp=HOST join KEY -' host`)
and any program that talks through a pipe. Bytes from stdin go to the stream, the
stream's bytes to stdout, nothing else: stdout's descriptor is taken for the stream at
start and descriptor 1 then points at stderr, so that no stray print can corrupt it.
Half-close both ways: stdin's end sends the stream's FIN (shutdown(SHUT_WR)); the
stream's FIN closes stdout. The process ends when both directions are done (exit 0), or
at once when the stream fails (exit 1, one error line). Logs go to stderr, warnings
only unless -v (ssh shows a ProxyCommand's stderr in the user's terminal).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import select
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

from ..errors import AuthenticationError, DerpError, PeerNotConnected
from ..keys import PublicKey
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    Interrupted,
    Stopper,
    UsageError,
    UserError,
    close_bounded,
    describe_error,
    parse_public_key,
)
from .forward import WAKE_INTERVAL, Tunnel, Tunnels
from .relays import Relays

if TYPE_CHECKING:
    import derpquic

log = logging.getLogger("derpnet.cmd")

BUF_SIZE = 64 * 1024


def wanted(args: argparse.Namespace) -> bool:
    """Whether join was asked for the stdio mode (`-` as LISTEN, or --stdio)."""
    return bool(getattr(args, "stdio", False)) or getattr(args, "listen", None) == "-"


class StdioEnd:
    """stdin and stdout as one end of a tunnel (the `forward.End` subset of a socket).
    Reads and writes wait in poll() for at most WAKE_INTERVAL at a time, so that a broken
    tunnel's threads notice `abort()` even when nobody writes to stdin or reads stdout."""

    def __init__(self, in_fd: int, out_fd: int) -> None:
        self.in_fd, self.out_fd = in_fd, out_fd
        self.aborted = threading.Event()
        self._lock = threading.Lock()
        self._out_open = True

    def _wait(self, fd: int, events: int) -> None:
        poller = select.poll()
        poller.register(fd, events)
        while not poller.poll(WAKE_INTERVAL * 1000):
            if self.aborted.is_set():
                raise ConnectionAbortedError(errno.ECONNABORTED, "tunnel broken")

    def recv(self, bufsize: int, /) -> bytes:
        self._wait(self.in_fd, select.POLLIN | select.POLLHUP)
        return os.read(self.in_fd, bufsize)

    def sendall(self, data: bytes, /) -> None:
        view = memoryview(data)
        while view:
            self._wait(self.out_fd, select.POLLOUT)
            n = os.write(self.out_fd, view[:BUF_SIZE])
            view = view[n:]

    def shutdown(self, how: int, /) -> None:
        """SHUT_WR: close stdout, the reader's end of data."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._close_out()

    def _close_out(self) -> None:
        with self._lock:
            if not self._out_open:
                return
            self._out_open = False
        try:
            os.close(self.out_fd)
        except OSError:
            pass

    def abort(self) -> None:
        """The tunnel broke: wake both threads; stdout is closed (the exit status tells)."""
        self.aborted.set()
        self._close_out()

    def close(self) -> None:
        self._close_out()


class _OneTunnel(Tunnels):
    """Tunnels with a `finished` event: the stdio join ends when its only tunnel does."""

    def __init__(self) -> None:
        super().__init__(1)
        self.finished = threading.Event()

    def _done(self, t: Tunnel) -> None:
        super()._done(t)
        self.finished.set()


#: Pipe buffer asked for stdin and stdout when they are pipes (Linux caps it at
#: /proc/sys/fs/pipe-max-size, 1 MiB by default): fewer wake-ups per MiB both sides.
PIPE_SIZE = 1 << 20


def take_stdio() -> tuple[int, int]:
    """(stdin, stdout) descriptors for the stream; descriptor 1 then points at stderr."""
    sys.stdout.flush()
    in_fd, out_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    setpipe: int = getattr(fcntl, "F_SETPIPE_SZ", 0)  # (Linux only)
    for fd in (in_fd, out_fd) if setpipe else ():
        try:
            fcntl.fcntl(fd, setpipe, PIPE_SIZE)
        except OSError:  # not a pipe, or over the limit: the default buffer it is
            pass
    return in_fd, out_fd


def _quiet(args: argparse.Namespace) -> None:
    if not (args.verbose or args.debug):
        for name in ("derpnet", "derpquic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def dial_failure(e: BaseException, peer: PublicKey, me: PublicKey, timeout: float) -> str:
    """The one line for a stdio join whose stream could not be opened."""
    who = peer.b64()
    if isinstance(e, AuthenticationError):
        if "derpnet-auth" in str(e):
            return (f"peer {who} cannot prove it holds its key (probably the Go derpconnect); to join it "
                    f"anyway, trusting the relay, use --insecure-allow-unauthenticated")
        return f"authentication with peer {who} failed: {e}"
    if isinstance(e, PeerNotConnected):  # (a ConnectionRefusedError too)
        return f"cannot reach peer {who}: {e}"
    if isinstance(e, ConnectionRefusedError):
        return f"peer {who} refused this node: ask its operator to add --allow {me.b64()}"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"cannot reach peer {who}: no answer within {timeout:g} s (is it serving, on the same relay?)"
    if isinstance(e, DerpError):
        return f"cannot reach peer {who}: {describe_error(e)}"
    return f"cannot reach peer {who}: {getattr(e, 'strerror', None) or e or type(e).__name__}"


def run(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """The stdio join; `options`: the derpquic Dialer options join computed."""
    if getattr(args, "udp", False):
        raise UsageError("--udp forwards datagrams from a local UDP port: it does not go with --stdio or LISTEN -")
    if args.listen not in ("0", "-"):
        raise UsageError(f"--stdio carries one stream over stdin/stdout: drop LISTEN {args.listen!r}")
    peer = parse_public_key(args.pubkey, "peer public key")
    relays = Relays.from_args(args)
    from .join import join_identity  # (join imports this module)
    key = join_identity(args, peer)
    _quiet(args)
    in_fd, out_fd = take_stdio()

    import derpquic

    stop = Stopper().install()
    dialer: derpquic.Dialer | None = None
    tunnels = _OneTunnel()
    end = StdioEnd(in_fd, out_fd)
    try:
        try:
            d, relay_host = relays.connect(lambda h, ssl: derpquic.Dialer(h, key, **options, **ssl),
                                           args.connect_timeout, stop)
            dialer = d
        except Interrupted:
            return EXIT_OK
        log.info("stdio to %s through %s as %s", peer.b64(), relay_host, key.public_key.b64())
        try:
            stream = _dial(d, peer, args.dial_timeout, stop)
        except Interrupted:
            return EXIT_OK
        except Exception as e:  # noqa: BLE001 - every dial failure is one line
            raise UserError(dial_failure(e, peer, key.public_key, args.dial_timeout), EXIT_FAILURE) from None
        tunnels.acquire(stop.event)
        tunnel = tunnels.start(end, stream, peer=peer.b64()[:8], what="stdio to")
        while not tunnels.finished.wait(0.2):
            if stop.is_set():
                tunnels.close_all(0.3)
                return EXIT_OK
            if end.aborted.is_set():  # broken: the stdin thread may be stuck in a write; do not wait long
                tunnels.finished.wait(1.0)
                break
        if tunnel.error is not None:
            raise UserError(f"the stream to {peer.b64()} failed: {tunnel.error}", EXIT_FAILURE)
        return EXIT_OK
    finally:
        end.close()
        if dialer is not None:
            close_bounded([dialer], 0.5, linger=0.3)
        stop.restore()


def _dial(dialer: derpquic.Dialer, peer: PublicKey, timeout: float, stop: Stopper) -> derpquic.Stream:
    """dialer.dial(peer) in a helper thread, so that Ctrl-C is not held up by it."""
    from .common import run_bounded
    return run_bounded(lambda: dialer.dial(peer, timeout=timeout), timeout + 1.0, f"dial {peer.b64()}", stop)
