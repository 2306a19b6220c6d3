"""Direct UDP paths for a PacketConn: one UDP socket, its reader thread, STUN and disco I/O.

Layer: datagrams (the I/O edge of the direct path). Every decision is made by the pure
`paths.PathTable`; every byte layout is `disco`'s or `stun`'s; this module only moves
bytes between the UDP socket, the relay link and those objects.

UDP payloads on the wire: ``0x00 ‖ datagram`` (the same framing as over the relay), a
disco packet (``TS💬`` magic), or a STUN Binding response. Anything else is dropped and
counted. Data from an address no peer is known at is dropped too.

Threads: one, ``derpnet-udp-<key>`` (daemon, joined by `close()`): reads the socket and
runs the path timers. Senders call `send()` from their own threads.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from . import stun
from .disco import DiscoBox, DiscoError, Ping, looks_like_disco, packet_sender, ping_padding_for
from .keys import PrivateKey, PublicKey
from .paths import Addr, PathChanged, PathTable, SendDisco
from .stunprobe import StunProbe

__all__ = ["DirectPaths", "local_addresses", "gather_endpoints", "log_path_change", "DEFAULT_STUN_PORT"]

log = logging.getLogger(__name__)

DEFAULT_STUN_PORT = 3478
SOCKET_BUFFER = 4 << 20   # 4 MiB each way: a burst of 64 KiB datagrams must not overflow
_FRAMING = b"\x00"
_NOTE_EVERY = 0.25        # traffic notes reach the path table at most this often per peer
_MAX_SLEEP = 0.25         # the reader re-checks its timers at least this often
_SIOCGIFADDR = 0x8915


def local_addresses() -> list[str]:
    """IPv4 addresses of this host's interfaces that are up (Linux ioctl; else best effort)."""
    out: list[str] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                req = struct.pack("256s", name.encode()[:15])
                ip = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError:
                continue  # no IPv4 address on it
            if ip not in out:
                out.append(ip)
    return out


def _route_address(ip: str) -> str | None:
    """The local address the kernel would use to reach `ip` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def gather_endpoints(relay_host: str, port: int) -> list[Addr]:
    """Our candidate (ip, port)s: the local address we reach the relay from, and the other
    interface addresses unless the relay is on loopback (then every peer is on this host)."""
    relay_ip = None
    try:
        relay_ip = socket.getaddrinfo(relay_host, None, socket.AF_INET)[0][4][0]
    except (OSError, IndexError):
        pass
    ips: list[str] = []
    route = _route_address(str(relay_ip)) if relay_ip else None
    if route:
        ips.append(route)
    if not (relay_ip and ipaddress.ip_address(relay_ip).is_loopback):
        ips += [ip for ip in local_addresses() if not ipaddress.ip_address(ip).is_loopback]
    return [(ip, port) for ip in dict.fromkeys(ips)]


def log_path_change(ev: PathChanged) -> None:
    """The log lines users see (serve/join print derpnet's info lines)."""
    who = ev.peer.b64()
    if ev.addr is not None:
        if ev.reason == "mtu":
            log.debug("direct path to %s carries %d-byte packets", who, ev.mtu)
        else:
            log.info("direct path to %s via %s:%d, rtt %.1f ms", who, ev.addr[0], ev.addr[1], (ev.rtt or 0.0) * 1000)
    elif ev.reason == "idle":
        log.debug("direct path to %s expired while idle; relay until traffic resumes", who)
    else:
        log.info("direct path to %s lost (%s); falling back to the relay", who, ev.reason)


class DirectPaths:
    """The UDP half of a PacketConn. `deliver(data, peer)` receives data; `send_relay(peer,
    packet)` sends a raw (disco) packet over the relay; `emit(event)` reports PathChanged."""

    def __init__(self, key: PrivateKey, *, deliver: Callable[[bytes, PublicKey], None],
                 send_relay: Callable[[PublicKey, bytes], None], emit: Callable[[object], None],
                 relay_host: str, stun_server: Addr | None = None, port: int = 0, bind: str = "0.0.0.0",
                 table: PathTable | None = None) -> None:
        self._key = key
        self._box = DiscoBox(key)
        self._deliver = deliver
        self._send_relay = send_relay
        self._emit = emit
        self._relay_host = relay_host
        self._stun_target = stun_server
        self.stun = StunProbe(None)
        self.table = table if table is not None else PathTable()
        self.lock = threading.Lock()        # the path table and the counters below
        self._noted: dict[PublicKey, float] = {}
        self.bytes_sent: dict[PublicKey, int] = {}       # over the direct path
        self.bytes_received: dict[PublicKey, int] = {}
        self.relay_sent: dict[PublicKey, int] = {}       # the same peers over the relay
        self.relay_received: dict[PublicKey, int] = {}
        self.drops = {"unknown_source": 0, "unknown_peer": 0, "bad_disco": 0, "unknown_packet": 0, "too_big": 0}
        self._closed = False
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_*BUFFORCE as root
            for o in (force, opt):
                try:
                    self._sock.setsockopt(socket.SOL_SOCKET, o, SOCKET_BUFFER)
                    break
                except OSError:
                    continue
        self._sock.bind((bind, port))
        self.port: int = self._sock.getsockname()[1]
        self._sock.settimeout(0.5)
        self._thread = threading.Thread(target=self._run, name=f"derpnet-udp-{key.public_key.b64()[:8]}",
                                        daemon=True)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Gather endpoints, start STUN and the reader thread."""
        endpoints = gather_endpoints(self._relay_host, self.port)
        self.stun.server = self._resolve_stun()  # DNS here, never in the reader thread (it runs the timers)
        now = time.monotonic()
        with self.lock:
            self.table.set_local_endpoints(endpoints, now)
            self.stun.restart(now)
        self._thread.start()

    def close(self) -> None:
        """Stop the reader thread and close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2)
        self._sock.close()

    def restun(self) -> None:
        """Ask STUN again (the relay link came back; our public address may have changed)."""
        with self.lock:
            self.stun.restart(time.monotonic())
        self._wake()

    # ------------------------------------------------------------ send path

    def send(self, peer: PublicKey, data: bytes) -> bool:
        """Send `data` to `peer` over its direct path if it has one that fits; False: use the relay."""
        route = self.table.route(peer)
        self._note(peer)
        n = len(data)
        if route is None or n > route[1]:
            if self.table.is_enabled(peer):  # per-peer counters only for our peers (bounded)
                self.relay_sent[peer] = self.relay_sent.get(peer, 0) + n
            return False
        addr = route[0]
        try:
            self._sock.sendmsg((_FRAMING, data), (), 0, addr)
        except OSError as e:
            if e.errno in (errno.EMSGSIZE,):
                with self.lock:
                    self.drops["too_big"] += 1
            if self.table.is_enabled(peer):  # per-peer counters only for our peers (bounded)
                self.relay_sent[peer] = self.relay_sent.get(peer, 0) + n
            return False  # the relay carries it; the heartbeat decides about the path
        self.bytes_sent[peer] = self.bytes_sent.get(peer, 0) + n
        return True

    def enable(self, peer: PublicKey) -> None:
        """`peer` proved it is one of ours: discovery may start."""
        self._locked(lambda now: self.table.enable(peer, now))

    def note_relay_received(self, peer: PublicKey, n: int) -> None:
        """A datagram from `peer` came over the relay (counted per peer, and it is traffic)."""
        if self.table.is_enabled(peer):
            self.relay_received[peer] = self.relay_received.get(peer, 0) + n
            self._note(peer)

    def on_relay_disco(self, src: PublicKey, packet: bytes) -> None:
        """A disco packet that came over the relay from `src`."""
        self._on_disco(packet, None, expect=src)

    def _note(self, peer: PublicKey) -> None:
        now = time.monotonic()
        if now - self._noted.get(peer, 0.0) >= _NOTE_EVERY:
            if len(self._noted) >= 4096:
                self._noted.clear()  # bounded: a forgotten note only costs one more lock round
            self._noted[peer] = now
            self._locked(lambda t: self.table.note_traffic(peer, t))

    # ------------------------------------------------------------ the reader thread

    def _run(self) -> None:
        sock = self._sock
        while not self._closed:
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                data = b""
                addr = None
            except OSError:
                if self._closed:
                    return
                log.debug("udp: recvfrom failed", exc_info=True)
                data, addr = b"", None
            if self._closed:
                return
            try:
                if data:
                    self._datagram(data, (addr[0], addr[1]))  # (b"" is a wake-up)
                self._tick()
            except Exception:  # never let one packet kill the thread
                log.exception("udp: error handling a datagram from %s", addr)

    def _datagram(self, data: bytes, addr: Addr) -> None:
        first = data[0]
        if first == 0:
            peer = self.table.peer_for_addr(addr)
            if peer is None:
                self.drops["unknown_source"] += 1
                return
            self.bytes_received[peer] = self.bytes_received.get(peer, 0) + len(data) - 1
            self._note(peer)
            self._deliver(data[1:], peer)
        elif looks_like_disco(data):
            self._on_disco(data, addr)
        elif stun.is_stun(data):
            self._on_stun(data, addr)
        else:
            self.drops["unknown_packet"] += 1

    def _on_disco(self, packet: bytes, src: Addr | None, expect: PublicKey | None = None) -> None:
        if src is not None:
            claimed = packet_sender(packet)
            if claimed is None or not self.table.is_enabled(claimed):
                # Over UDP only peers we already know are ours: a first contact comes over
                # the relay (which vouches for the sender's key), so made-up keys sent to
                # our port cost nothing, not even a key agreement.
                self.drops["unknown_peer"] += 1
                return
        try:
            sender, msg = self._box.open(packet)
        except DiscoError as e:
            self.drops["bad_disco"] += 1
            log.debug("disco: dropped a packet from %s: %s", src or "the relay", e)
            return
        if expect is not None and sender != expect:
            self.drops["bad_disco"] += 1  # the relay says one sender, the box another
            return
        self._locked(lambda now: self.table.on_disco(sender, msg, src, now))

    def _on_stun(self, data: bytes, addr: Addr) -> None:
        with self.lock:
            now = time.monotonic()
            old = self.stun.mapped
            try:
                mapped = self.stun.on_response(data, addr, now)
            except stun.StunError:
                self.drops["unknown_packet"] += 1
                return
            if mapped is None:
                return
            if mapped != old:
                log.info("udp: STUN at %s:%d sees us at %s:%d", addr[0], addr[1], mapped[0], mapped[1])
            self.table.add_local_endpoint(mapped, now)
        self._flush()

    def _tick(self) -> None:
        now = time.monotonic()
        with self.lock:
            self.table.poll(now)
            request = self.stun.poll(now)
            deadline = min((t for t in (self.table.next_deadline(), self.stun.next_deadline()) if t is not None),
                           default=now + 1.0)
        if request is not None and self.stun.server is not None:
            try:
                self._sock.sendto(request, self.stun.server)
            except OSError as e:
                log.debug("udp: STUN request to %s failed: %s", self.stun.server, e)
        self._flush()
        if not self._closed:
            self._sock.settimeout(min(max(deadline - time.monotonic(), 0.005), _MAX_SLEEP))

    def _resolve_stun(self) -> Addr | None:
        host, port = self._stun_target or (self._relay_host, DEFAULT_STUN_PORT)
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as e:
            log.debug("udp: cannot resolve STUN server %s: %s", host, e)
            return None
        if not infos:
            return None
        ip, p = infos[0][4][0], infos[0][4][1]
        return (str(ip), int(p))

    # ------------------------------------------------------------ helpers

    def _locked(self, step: Callable[[float], None]) -> None:
        with self.lock:
            step(time.monotonic())
        self._flush()

    def _flush(self) -> None:
        """Carry out what the path table asked for: send disco, report path changes.

        Events are reported only from the reader thread: a caller's thread may hold a lock
        of the layer above (the QUIC driver writes under its lock), whose event handler
        takes that same lock."""
        reader = threading.current_thread() is self._thread
        with self.lock:
            actions = self.table.take_actions()
            events = self.table.take_events() if reader else []
            pending = not reader and self.table.has_events()
        for a in actions:
            self._send_disco(a)
        for ev in events:
            log_path_change(ev)
            self._emit(ev)
        if actions or pending:
            self._wake()

    def _send_disco(self, a: SendDisco) -> None:
        try:
            msg = a.msg
            if isinstance(msg, Ping):  # the table leaves the node key and padding to us
                msg = Ping(msg.tx_id, self._box.public_key, ping_padding_for(a.size) if a.size else 0)
            packet = self._box.seal(a.peer, msg)
            if a.addr is None:
                self._send_relay(a.peer, packet)
            else:
                self._sock.sendto(packet, a.addr)
        except (OSError, ValueError) as e:
            log.debug("disco: sending %s to %s failed: %s", type(a.msg).__name__, a.addr or "relay", e)

    def _wake(self) -> None:
        """Wake the reader thread so it re-evaluates its timers (an empty datagram to itself)."""
        if threading.current_thread() is self._thread or self._closed:
            return
        try:
            self._sock.sendto(b"", ("127.0.0.1", self.port))
        except OSError:
            pass  # no loopback here: the reader still wakes within _MAX_SLEEP

    def paths(self) -> dict[PublicKey, dict[str, Any]]:
        """Per peer: the path ("relay" or "ip:port"), rtt (s), mtu, candidates, direct bytes."""
        with self.lock:
            infos = self.table.snapshot()
        return {info.peer: {
            "path": "relay" if info.addr is None else f"{info.addr[0]}:{info.addr[1]}",
            "addr": info.addr, "rtt": info.rtt, "mtu": info.mtu, "discovery": info.enabled,
            "candidates": list(info.candidates),
            "bytes_sent": {"direct": self.bytes_sent.get(info.peer, 0),
                           "relay": self.relay_sent.get(info.peer, 0)},
            "bytes_received": {"direct": self.bytes_received.get(info.peer, 0),
                               "relay": self.relay_received.get(info.peer, 0)},
        } for info in infos}

    def stats(self) -> dict[str, object]:
        with self.lock:
            return {"port": self.port, "stun_mapped": self.stun.mapped, "drops": dict(self.drops),
                    "local_endpoints": list(self.table.local_endpoints), "ignored_pongs": self.table.ignored_pongs}
