"""`serve --udp TARGET` and `join --udp PUBKEY LISTEN`: UDP datagrams over QUIC DATAGRAM
frames (RFC 9221) between two derpnet peers, one flow per client address with idle
expiry. The wire format and the flow tables: derpnet.cmd.udpflows. Datagrams may be lost
(as UDP's are), never altered: each is one encrypted, authenticated QUIC frame.

Only between derpconnects of this project: the Go derpconnect has no UDP mode. `join
--udp` to a Go `serve` stops with a clear error (the peer cannot prove a derpnet key, or
takes no datagrams); a Go `join` to `serve --udp` opens streams, which are refused with a
warning.

Threads: serve has one reading the peers' datagrams ("udp-from-peers") and one reading
the flow sockets ("udp-from-target"); join one reading the peer's datagrams
("udp-from-peer") while the main thread reads the local socket. All daemonic, stopped by
the Stopper and joined on exit.
"""

from __future__ import annotations

import argparse
import errno
import logging
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import AuthenticationError
from ..keys import PrivateKey, PublicKey
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    Interrupted,
    Stopper,
    UsageError,
    UserError,
    close_bounded,
    describe_error,
    local_endpoint,
    positive_float,
    run_bounded,
)
from .forward import abort
from .relays import Relays
from .stdio import dial_failure
from .udpflows import ClientFlows, Flows, decode, encode

if TYPE_CHECKING:
    from pathlib import Path

    import derpquic

log = logging.getLogger("derpnet.cmd")

MAX_FLOWS = 4096
POLL = 0.25  # how often the threads look at the Stopper and expire idle flows (seconds)
UDP_BUF = 65535
BATCH = 64  # datagrams read from a socket at once and sent on with one flush
SOCKET_BUFFER = 4 << 20  # asked of the kernel for each UDP socket (it caps it at net.core.*mem_max)
GO_PEER = ("it is probably the Go derpconnect, which has no UDP mode: --udp needs this project's "
           "derpconnect on both sides")


def add_arguments(p: argparse.ArgumentParser, side: str) -> None:
    """--udp and --udp-idle for serve (`side` "serve") and join."""
    what = "TARGET is a UDP port" if side == "serve" else "LISTEN is a UDP port"
    p.add_argument("--udp", action="store_true",
                   help=f"forward UDP instead of TCP: {what}; datagrams travel as QUIC DATAGRAM frames, "
                        "one flow per client address (both sides must be this derpconnect; lost "
                        "datagrams stay lost, as with UDP)")
    p.add_argument("--udp-idle", metavar="SECONDS", type=positive_float, default=60.0,
                   help="with --udp: forget a flow after this long without a datagram (default %(default)g)")


class Counters:
    """Datagrams each way and drops, for the closing line."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.to_peer = self.from_peer = self.dropped = self.flows = 0

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def summary(self) -> str:
        with self.lock:
            return (f"{self.flows} flow(s), {self.to_peer} datagram(s) to the peer, {self.from_peer} from it, "
                    f"{self.dropped} dropped")


def _udp_target(text: str) -> tuple[int, Any]:
    host, port = local_endpoint(text, default_host="localhost", what="serve target")
    if port == 0:
        raise UsageError(f"serve target {text!r}: port 0 is not a port to forward to")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve serve target {host}: {e.strerror or e}") from None
    return infos[0][0], infos[0][4]


# --------------------------------------------------------------------------- serve


class ServeForwarder:
    """serve's side: a UDP socket towards TARGET per (channel, flow id)."""

    def __init__(self, listener: derpquic.Listener, family: int, target: Any, idle: float, stop: Stopper) -> None:
        self.listener, self.family, self.target, self.stop = listener, family, target, stop
        self.lock = threading.Lock()
        self.flows: Flows[tuple[derpquic.DatagramChannel, int], socket.socket] = Flows(idle, MAX_FLOWS)
        self.selector = selectors.DefaultSelector()
        self.counters = Counters()
        self.threads = [threading.Thread(target=self._from_peers, name="udp-from-peers", daemon=True),
                        threading.Thread(target=self._from_target, name="udp-from-target", daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _from_peers(self) -> None:
        while not self.stop.is_set():
            try:
                data, channel = self.listener.recv_datagram(timeout=POLL)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                flow, payload = decode(data)
            except ValueError:
                self.counters.add(dropped=1)
                continue
            sock = self._socket_for(channel, flow)
            if sock is None:
                continue
            try:
                sock.send(payload)
                self.counters.add(from_peer=1)
            except OSError as e:  # ECONNREFUSED from an earlier datagram, ENOBUFS, ...
                log.debug("udp flow %d to the target: %s", flow, e)
                self.counters.add(dropped=1)

    def _socket_for(self, channel: derpquic.DatagramChannel, flow: int) -> socket.socket | None:
        now = time.monotonic()
        with self.lock:
            sock = self.flows.get((channel, flow), now)
            if sock is not None:
                return sock
            sock = _udp_socket(self.family)
            try:
                sock.connect(self.target)
                sock.setblocking(False)
            except OSError as e:
                sock.close()
                log.error("udp flow from %s: cannot reach the target: %s", channel.remote_addr().b64(),
                          e.strerror or e)
                return None
            self.selector.register(sock, selectors.EVENT_READ, (channel, flow))
            evicted = self.flows.add((channel, flow), sock, now)
            self.counters.add(flows=1)
        log.debug("udp flow %d from %s: open", flow, channel.remote_addr().b64())
        self._close(evicted)
        return sock

    def _close(self, flows: list[tuple[tuple[derpquic.DatagramChannel, int], socket.socket]]) -> None:
        for _, sock in flows:
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()

    def _from_target(self) -> None:
        while not self.stop.is_set():
            batches: dict[derpquic.DatagramChannel, list[bytes]] = {}
            for key, _ in self.selector.select(POLL) if self.selector.get_map() else _idle(self.stop):
                channel, flow = key.data
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                batch = batches.setdefault(channel, [])
                for payload in _drain(sock):
                    batch.append(encode(flow, payload))
            for channel, batch in batches.items():
                if batch:
                    self._to_peer(channel, batch)
            with self.lock:
                expired = self.flows.expire(time.monotonic())
            self._close(expired)
        with self.lock:
            self._close(self.flows.items())

    def _to_peer(self, channel: derpquic.DatagramChannel, batch: list[bytes]) -> None:
        try:
            sent = channel.send_many(batch)  # (too big for the connection, or its queue full: dropped)
        except ConnectionError:  # the peer's connection ended: its flows go
            with self.lock:
                gone = [(k, s) for k, s in self.flows.items() if k[0] is channel]
                for k, _ in gone:
                    self.flows.remove(k)
            self._close(gone)
            return
        self.counters.add(to_peer=sent, dropped=len(batch) - sent)


def _drain(sock: socket.socket) -> list[bytes]:
    """What a non-blocking UDP socket has queued, at most BATCH datagrams: sent on
    together, they share QUIC packets."""
    out: list[bytes] = []
    while len(out) < BATCH:
        try:
            out.append(sock.recv(UDP_BUF, socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # ECONNREFUSED: nothing listens on TARGET (yet); the flow stays
            break
    return out


def _idle(stop: Stopper) -> list[Any]:
    """No flow sockets yet: wait a poll interval (woken by the Stopper) instead of select()."""
    stop.event.wait(POLL)
    return []


def run_serve(args: argparse.Namespace, options: dict[str, Any], relays: Relays, key: PrivateKey,
              key_path: Path) -> int:
    """serve --udp TARGET (the arguments serve checked and loaded)."""
    family, target = _udp_target(args.target)

    import derpquic

    stop = Stopper().install()
    listener = None
    forwarder = None
    try:
        try:
            listener, relay_host = relays.connect(
                lambda h, ssl: derpquic.listen(h, key, datagrams=True, **options, **ssl), args.connect_timeout, stop)
        except Interrupted:
            return EXIT_OK
        from .serve import ca_option  # (serve imports this module)
        ca = ca_option(args) if not relay_host.startswith("http://") else ""  # plain HTTP: no CA
        log.info('Listening through DERP (UDP). Join with "derpconnect --derp=%s%s join --udp %s PORT"',
                 relays.shown(relay_host), ca, key.public_key.b64())
        log.info("public key %s, key file %s; forwarding UDP to %s", key.public_key.b64(), key_path, args.target)
        forwarder = ServeForwarder(listener, family, target, args.udp_idle, stop)
        forwarder.start()
        failure = _refuse_streams(listener, stop, relay_host)
        if failure:
            raise UserError(failure, EXIT_FAILURE)
        log.info("%s: shutting down; %s", stop.signal_name or "stop", forwarder.counters.summary())
        return EXIT_OK
    finally:
        stop.event.set()
        if forwarder is not None:
            for t in forwarder.threads:
                t.join(1.0)
        if listener is not None:
            close_bounded([listener], 0.3, linger=0.1)
        stop.restore()


def _refuse_streams(listener: derpquic.Listener, stop: Stopper, relay_host: str) -> str | None:
    """The main thread of serve --udp: streams (a TCP join, a Go derpconnect) are refused."""
    from ..errors import DerpError
    while not stop.is_set():
        try:
            stream = listener.accept(timeout=POLL)
        except TimeoutError:
            continue
        except (OSError, DerpError) as e:
            return None if stop.is_set() else f"the relay connection failed: {describe_error(e, relay_host)}"
        who = stream.remote_addr().b64()
        log.warning("refused a TCP stream from %s%s: this serve forwards UDP (--udp)%s", who,
                    "" if stream.peer_key is not None else " (unverified)",
                    "" if stream.peer_key is not None else f"; {GO_PEER}")
        abort(stream)
    return None


# --------------------------------------------------------------------------- join


def run_join(args: argparse.Namespace, options: dict[str, Any], peer: PublicKey, relays: Relays,
             key: PrivateKey) -> int:
    """join --udp PUBKEY LISTEN (the arguments join checked and loaded)."""
    host, port = local_endpoint(args.listen, default_host="127.0.0.1", what="listen address")
    sock = _bind_udp(host, port)

    import derpquic

    stop = Stopper().install()
    dialer = None
    reader = None
    try:
        try:
            d, relay_host = relays.connect(lambda h, ssl: derpquic.Dialer(h, key, datagrams=True, **options, **ssl),
                                           args.connect_timeout, stop)
            dialer = d
            channel = _open_channel(d, peer, args.dial_timeout, stop)
        except Interrupted:
            return EXIT_OK
        addr = sock.getsockname()
        log.info("Listening on udp %s", f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}")
        log.info("forwarding UDP to %s through %s as %s", peer.b64(), relay_host, key.public_key.b64())
        flows: ClientFlows[Any] = ClientFlows(args.udp_idle, MAX_FLOWS)
        lock = threading.Lock()
        counters = Counters()
        reader = threading.Thread(target=_join_from_peer, args=(d, sock, flows, lock, counters, stop),
                                  name="udp-from-peer", daemon=True)
        reader.start()
        sock.settimeout(POLL)
        while not stop.is_set():
            try:
                payload, src = sock.recvfrom(UDP_BUF)
            except TimeoutError:
                with lock:
                    flows.expire(time.monotonic())
                continue
            except OSError as e:
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # an ICMP error for an earlier answer to a client that left
                raise UserError(f"udp socket: {e.strerror or e}") from None
            batch = [(payload, src)] + _drain_from(sock)
            encoded = []
            with lock:
                now = time.monotonic()
                flows.expire(now)  # (cheap: only the idle ones at the head are looked at)
                for payload, src in batch:
                    flow, new = flows.flow_for(src, now)
                    encoded.append(encode(flow, payload))
                    if new:
                        counters.add(flows=1)
                        log.debug("udp flow %d from %s: open", flow, src)
            if channel.closed:  # the peer restarted, or its connection timed out: a new one
                try:
                    channel = _open_channel(d, peer, args.dial_timeout, stop)
                except Interrupted:
                    break
                except UserError as e:
                    log.error("%s", e)
                    counters.add(dropped=len(encoded))
                    continue
            try:
                sent = channel.send_many(encoded)
            except ConnectionError:
                sent = 0
            counters.add(to_peer=sent, dropped=len(encoded) - sent)
        log.info("%s: shutting down; %s", stop.signal_name or "stop", counters.summary())
        return EXIT_OK
    finally:
        stop.event.set()
        if reader is not None:
            reader.join(1.0)
        sock.close()
        if dialer is not None:
            close_bounded([dialer], 0.3, linger=0.1)
        stop.restore()


def _join_from_peer(dialer: derpquic.Dialer, sock: socket.socket, flows: ClientFlows[Any], lock: threading.Lock,
                    counters: Counters, stop: Stopper) -> None:
    while not stop.is_set():
        try:
            data, _ = dialer.recv_datagram(timeout=POLL)
            flow, payload = decode(data)
        except TimeoutError:
            continue
        except ValueError:
            counters.add(dropped=1)
            continue
        except OSError:
            return
        with lock:
            addr = flows.addr_for(flow, time.monotonic())
        if addr is None:  # the client's flow expired meanwhile
            counters.add(dropped=1)
            continue
        try:
            sock.sendto(payload, addr)
            counters.add(from_peer=1)
        except OSError:
            counters.add(dropped=1)


def _drain_from(sock: socket.socket) -> list[tuple[bytes, Any]]:
    """What the local UDP socket has queued: up to BATCH - 1 (datagram, client address)."""
    out: list[tuple[bytes, Any]] = []
    for _ in range(BATCH - 1):
        try:
            out.append(sock.recvfrom(UDP_BUF, socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            break
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                break  # (an ICMP error for an earlier answer is skipped)
    return out


def _open_channel(dialer: derpquic.Dialer, peer: PublicKey, timeout: float,
                  stop: Stopper) -> derpquic.DatagramChannel:
    """The datagram channel to `peer`; one UserError line when it cannot be had."""
    try:
        return run_bounded(lambda: dialer.datagram_channel(peer, timeout=timeout), timeout + 1.0,
                           f"dial {peer.b64()}", stop)
    except (Interrupted, UserError):
        raise
    except Exception as e:  # noqa: BLE001 - every failure is one line
        if isinstance(e, AuthenticationError) and "derpnet-auth" in str(e):
            why = f"peer {peer.b64()} cannot prove it holds its key: {GO_PEER}"
        elif isinstance(e, OSError) and e.errno == errno.EPROTONOSUPPORT:
            why = f"peer {peer.b64()} takes no UDP: " + (
                GO_PEER if "not a derpnet peer" in str(e) else "it serves TCP, not UDP (start its serve with --udp)")
        else:
            why = dial_failure(e, peer, dialer.local_addr(), timeout)
        raise UserError(why, EXIT_FAILURE) from None


def _bind_udp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on udp {host}:{port}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    sock = _udp_socket(family)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        what = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise UserError(f"cannot listen on udp {host}:{port}: {what}") from None
    return sock


def _udp_socket(family: int) -> socket.socket:
    """A UDP socket with large buffers: a burst of datagrams waits there, not dropped."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    return sock
