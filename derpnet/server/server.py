"""The embedded DERP relay: `RelayServer` on an asyncio loop, `DerpServer` as a blocking handle.

Layer: relay server. One asyncio event loop in one thread (`derpnet-relay` when run by
`DerpServer`) serves every connection: each is a `ClientProtocol` (conn.py) doing TLS on
memory BIOs (derpnet.tlsbio); the routing table is `relay.py`. Why a Protocol per
connection rather than streams, and how writes are batched and bounded: DEVELOPERS.md,
"The relay server".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import os
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from ..keys import PrivateKey, PrivateKeyLike, PublicKey
from . import certs
from .access import AccessControl
from .conn import ClientProtocol
from .mesh import MeshHub, MeshKeyCheck, MeshTarget, parse_mesh_key, parse_mesh_with
from .meshclient import RETRY_INTERVAL, MeshLink, MeshRetry, use_derp_http
from .outbox import TokenBucket
from .ratelimit import RateConfig
from .ratelog import RateLimitedLog
from .relay import Relay
from .sender import Sender
from .stun import StunServer

__all__ = ["RelayOptions", "RelayServer", "DerpServer", "serve", "relay_url"]

log = logging.getLogger(__name__)

ACCEPT_BATCH = 32  # connections accepted per wake-up of the listening socket (see RelayServer.start)
#: What one connection may hold before its hello without counting against the shared
#: budget (RelayOptions.preauth_buffer_limit): an honest ClientInfo is ~100 bytes.
PREAUTH_FREE = 1 << 10
RX_BUFFER = 256 << 10  # one read from a socket at most (asyncio's own default), shared by all connections


@dataclass(frozen=True)
class RelayOptions:
    """Tunables of the relay; defaults are derper's. Tests shorten the timeouts."""

    write_timeout: float | None = 2.0        # a client whose writes stall this long is dropped (None: never)
    handshake_timeout: float = 10.0             # TLS handshake, then the HTTP request head
    client_info_timeout: float = 10.0           # from ServerKey to the client's ClientInfo
    keepalive_interval: float = 60.0            # KeepAlive period, plus jitter of up to 1/12 (5 s)
    queue_depth: int = 32                       # packets per destination queue (disco and others)
    not_here_rate: float = 1.0                  # PeerGone(NotHere) hints per second per client
    not_here_burst: int = 3
    write_buffer_limit: int = 64 << 10          # transport high-water mark before pause_writing
    backlog: int = 1024
    #: Bytes that connections which have not completed their hello may hold between reads,
    #: all together (a partial ClientInfo, up to 256 KiB each). Beyond it, a connection that
    #: holds more than PREAUTH_FREE bytes is dropped; honest hellos are far smaller.
    preauth_buffer_limit: int = 4 << 20
    #: derper's --accept-connection-limit / --accept-connection-burst: new connections per
    #: second (a token bucket; inf: no limit) and how many may come at once. Over the limit a
    #: connection is accepted and closed at once, as derper does (the client backs off).
    accept_rate: float = math.inf
    accept_burst: int = sys.maxsize
    #: Connections that have not completed their hello (TLS, HTTP, ClientInfo), at most: more
    #: are closed at once, so a flood costs refused connections, never unbounded memory.
    max_unauthenticated: int = 4096

    def __post_init__(self) -> None:
        if self.queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        if self.handshake_timeout <= 0 or self.client_info_timeout <= 0:
            raise ValueError("handshake timeouts must be positive")
        if not self.accept_rate > 0 or self.accept_burst < 1:
            raise ValueError("accept_rate must be > 0 and accept_burst at least 1")
        if self.max_unauthenticated < 1:
            raise ValueError("max_unauthenticated must be at least 1")


def relay_url(host: str | None, port: int, tls: bool, hostname: str | None = None) -> str:
    """The URL clients should use: the TLS name for https, else the bound address (wildcards → loopback)."""
    name = hostname
    if not name:
        if tls:
            name = "localhost"
        elif not host or host in ("0.0.0.0", "::"):
            name = "127.0.0.1"
        else:
            name = host
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"
    return f"{'https' if tls else 'http'}://{name}:{port}"


class RelayServer:
    """The relay's async core: listens, accepts, owns the routing table. Use from one event loop."""

    def __init__(self, private_key: PrivateKey, *, host: str | None = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None, options: RelayOptions | None = None,
                 mesh_key: bytes | None = None) -> None:
        self.private_key = private_key
        self.public_key: PublicKey = private_key.public_key
        self.host = host
        self.requested_port = port
        self.ssl_context = ssl_context
        self.options = options or RelayOptions()
        self.relay = Relay()
        #: The mesh (mesh.py): who presented our key, the watchers, the routes to other members.
        self.mesh_key = mesh_key
        self.mesh_check = MeshKeyCheck(mesh_key)
        self.mesh: MeshHub | None = None
        if mesh_key is not None:
            self.mesh = self.relay.mesh = MeshHub(self.relay, self.public_key, self.mesh_check)
        self._mesh_links: list[MeshLink] = []
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self._server: asyncio.Server | None = None
        self._conns: set[ClientProtocol] = set()
        self._ids = itertools.count(1)
        self.stun: StunServer | None = None  # see start_stun()
        self.connections_accepted = 0
        self.http_requests = 0
        self.handshake_timeouts = 0
        self.write_timeouts = 0
        self.protocol_errors = 0
        self.handshake_failures = 0
        self.preauth_bytes = 0      # held by connections before their hello (see preauth_hold)
        self.preauth_drops = 0
        self.unauthenticated = 0    # connections that have not completed their hello
        self.rejected_rate = 0      # closed at accept: --accept-connection-limit
        self.rejected_unauthenticated = 0  # closed at accept: max_unauthenticated reached
        self._accept_bucket: TokenBucket | None = None  # made in start() (needs the loop's clock)
        self.tls_errors = 0
        #: Every connection reads into this one buffer, and TLS decrypts into the second
        #: (one loop thread; each read is consumed before the next: conn.py).
        self.rx_view = memoryview(bytearray(RX_BUFFER))
        self._dirty: list[Sender] = []  # senders to flush in this loop turn (flush_soon)
        self.plain_view = memoryview(bytearray(RX_BUFFER))
        self.access = AccessControl()           # --allow-clients, --verify-client-url (access.py)
        self.rate_config = RateConfig()         # --rate-config (ratelimit.py); reload.py replaces both
        self.rate_limit_waits = 0               # reads after which a client had to wait (its rate limit)
        self.draining = False                   # restart.py: stopped accepting, clients told to reconnect
        #: Lines a client can provoke (failed handshakes, protocol errors): 20 at once, 1/s after.
        self.error_log = RateLimitedLog(log, rate=1.0, burst=20)

    async def start(self) -> None:
        """Bind and listen. Raises OSError (e.g. address in use) without leaving anything open."""
        self.loop = asyncio.get_running_loop()
        if math.isfinite(self.options.accept_rate):
            self._accept_bucket = TokenBucket(self.options.accept_rate, self.options.accept_burst, self.loop.time())
        # TLS is done by ClientProtocol itself (see derpnet.tlsbio), not by asyncio's SSL transport.
        # asyncio accepts up to `backlog` connections each time the listening socket wakes
        # it, and sets them all up in the next loop turn: with a deep backlog a connection
        # storm then holds the loop for half a second (1,024 set-ups) while the connected
        # clients' packets wait. So accept in small batches, and deepen only the kernel's
        # queue afterwards (listen() again on the same socket, through a duplicate).
        self._server = await self.loop.create_server(
            lambda: ClientProtocol(self), self.host or None, self.requested_port,
            backlog=min(ACCEPT_BATCH, self.options.backlog), reuse_address=True)
        try:
            for ts in self._server.sockets:
                with socket.socket(fileno=os.dup(ts.fileno())) as dup:
                    dup.listen(self.options.backlog)
        except OSError:
            self._server.close()
            self._server = None
            raise
        # the command lines print their own ready line (stdout): once is enough in a terminal
        log.debug("relay: listening on %s (server key %s)", ", ".join(self.addresses), self.public_key)

    async def start_stun(self, port: int) -> StunServer:
        """Also answer STUN Binding requests on UDP `port` of the listen host (stun.py). Raises OSError."""
        stun = StunServer()
        await stun.start(self.host, port)
        self.stun = stun
        return stun

    def start_mesh(self, targets: list[MeshTarget], *, ssl_context: ssl.SSLContext | None = None,
                   retry_interval: float = RETRY_INTERVAL) -> list[MeshLink]:
        """Join the mesh: a watch link to every member (derper's --mesh-with; needs the mesh key)."""
        if self.mesh is None:
            raise ValueError("--mesh-with requires --mesh-psk-file")
        for t in targets:
            link = MeshLink(self, t, ssl_context=ssl_context, retry=MeshRetry(retry_interval))
            self._mesh_links.append(link)
            link.start()
        return list(self._mesh_links)

    def mesh_hub(self) -> MeshHub:
        """The mesh state (only when the relay has a mesh key)."""
        assert self.mesh is not None
        return self.mesh

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("relay is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def addresses(self) -> list[str]:
        """Every bound address as HOST:PORT."""
        if self._server is None:
            return []
        out = []
        for s in self._server.sockets:
            h, p = s.getsockname()[:2]
            out.append(f"[{h}]:{p}" if ":" in h else f"{h}:{p}")
        return out

    def stop_accepting(self) -> None:
        """Close the listening sockets; connections stay (a graceful restart drains them)."""
        if self._server is not None:
            self._server.close()

    def connections(self) -> list[ClientProtocol]:
        """Every open connection (a copy)."""
        return list(self._conns)

    async def close(self) -> None:
        """Stop listening and drop every connection (idempotent)."""
        self.access.close()
        if self.stun is not None:
            self.stun.close()
        links, self._mesh_links = self._mesh_links, []
        for link in links:
            await link.close()
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.close("relay shutting down")
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        # Let the transports' connection_lost callbacks run.
        for _ in range(3):
            if not self._conns:
                break
            await asyncio.sleep(0)

    async def serve_forever(self) -> None:
        """Serve until cancelled or closed."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            pass
        finally:
            await self.close()

    # called by ClientProtocol and its Sender
    def flush_soon(self, sender: Sender) -> None:
        """Have `sender` flushed in this loop turn's batch: one loop callback for every sender
        with something to write, rather than one each."""
        self._dirty.append(sender)
        if len(self._dirty) == 1:
            self.loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
        for sender in dirty:
            try:
                sender.flush()
            except Exception:  # a bug: keep the others flowing, drop this one (rate-limited line)
                self.error_log.log(logging.WARNING, "relay: internal error writing to %s; closing it",
                                   sender.conn.name, exc_info=True)
                sender.conn.abort("internal error", level=logging.DEBUG)

    def next_conn_id(self) -> int:
        """A unique id for a new connection."""
        return next(self._ids)

    def connection_opened(self, c: ClientProtocol) -> bool:
        """Track an accepted connection; False: it must be closed at once (the accept rate
        limit, or too many connections have not completed their hello)."""
        bucket = self._accept_bucket
        if bucket is not None and not bucket.take(self.loop.time()):
            self.rejected_rate += 1
            self.error_log.log(logging.INFO, "relay: closing %s: over the accept rate limit (%g/s, burst %d)",
                               c.peer, self.options.accept_rate, self.options.accept_burst)
            return False
        if self.unauthenticated >= self.options.max_unauthenticated:
            self.rejected_unauthenticated += 1
            self.error_log.log(logging.WARNING, "relay: closing %s: %d connections have not completed their "
                               "hello (the limit)", c.peer, self.unauthenticated)
            return False
        self.connections_accepted += 1
        self.unauthenticated += 1
        c.unauthenticated = True
        self._conns.add(c)
        return True

    def connection_authenticated(self, c: ClientProtocol) -> None:
        """`c` completed its hello: it no longer counts as unauthenticated."""
        if c.unauthenticated:
            c.unauthenticated = False
            self.unauthenticated -= 1
        self.preauth_release(c)

    def connection_closed(self, c: ClientProtocol) -> None:
        """Forget a closed connection."""
        self._conns.discard(c)
        self.connection_authenticated(c)

    def preauth_hold(self, c: ClientProtocol, held: int) -> bool:
        """`c` (not yet past its hello) now holds `held` bytes between reads. False: the
        shared budget is spent and `c` holds more than PREAUTH_FREE, so it must go."""
        self.preauth_bytes += held - c.preauth_held
        c.preauth_held = held
        if held > PREAUTH_FREE and self.preauth_bytes > self.options.preauth_buffer_limit:
            self.preauth_drops += 1
            self.preauth_release(c)
            return False
        return True

    def preauth_release(self, c: ClientProtocol) -> None:
        """`c` completed its hello or closed: it no longer holds pre-hello bytes."""
        self.preauth_bytes -= c.preauth_held
        c.preauth_held = 0

    def stats(self) -> dict[str, Any]:
        """Counters: clients, packets forwarded, drops by reason, timeouts, queued bytes."""
        d = self.relay.stats()
        queued = buffered = 0
        for c in self._conns:
            n, b = c.queued()
            queued += n
            buffered += b
        d.update(
            connections_open=len(self._conns),
            connections_accepted=self.connections_accepted,
            http_requests=self.http_requests,
            handshake_timeouts=self.handshake_timeouts,
            write_timeouts=self.write_timeouts,
            protocol_errors=self.protocol_errors,
            handshake_failures=self.handshake_failures,
            preauth_bytes=self.preauth_bytes,
            preauth_drops=self.preauth_drops,
            unauthenticated=self.unauthenticated,
            rejected_rate=self.rejected_rate,
            rejected_unauthenticated=self.rejected_unauthenticated,
            log_lines_left_out=self.error_log.suppressed_total,
            tls_errors=self.tls_errors,
            access=self.access.stats(),
            rate_limit_waits=self.rate_limit_waits,
            queued_packets=queued,
            write_buffer_bytes=buffered,
            stun=self.stun.stats() if self.stun is not None else None,
            mesh=self._mesh_stats(),
        )
        return d


    def _mesh_stats(self) -> dict[str, Any] | None:
        if self.mesh is None:
            return None
        d: dict[str, Any] = dict(self.mesh.stats())
        d["links"] = {link.target.host: {"accepted": link.accepted, "attempts": link.attempts,
                                         "forward_drops": link.forward_drops} for link in self._mesh_links}
        return d


TLSArg = bool | ssl.SSLContext


@dataclass
class TLSSetup:
    """What the relay serves over TLS: the server context, and the chain PEM when we built it."""

    context: ssl.SSLContext | None = None
    cert_pem: bytes | None = None  # what we serve (leaf first), if we built the context
    self_signed: bool = False
    names: list[str] = field(default_factory=list)


def tls_setup(tls: TLSArg, certfile: str | None, keyfile: str | None, hostname: str | None,
               host: str | None, public_key: PublicKey, meta_cert: bool) -> TLSSetup:
    """Build the relay's TLS setup from DerpServer/CLI arguments (no TLS when neither tls nor certfile)."""
    if isinstance(tls, ssl.SSLContext):
        return TLSSetup(context=tls)
    if not tls and not certfile:
        return TLSSetup()
    extra = certs.meta_cert(public_key) if meta_cert else None
    if certfile:
        chain, key = certs.read_cert_files(certfile, keyfile)
        return TLSSetup(certs.server_ssl_context(chain, key, extra_pem=extra), chain)
    names = certs.default_names(hostname, host)
    chain, key = certs.self_signed_cert(names)
    return TLSSetup(certs.server_ssl_context(chain, key, extra_pem=extra), chain, True, names)


class DerpServer:
    """A relay running in a background thread: `with DerpServer() as srv: ... srv.url ...`.

    `key`: the server's private key (a fresh one if None). `tls`: False (plain HTTP), True
    (a self-signed certificate for `hostname`/localhost/127.0.0.1 unless `certfile`/`keyfile`
    are given), or a ready server `ssl.SSLContext`. With TLS the derper meta certificate is
    served too (`meta_cert=False` to leave it out). `stun_port`: also answer STUN Binding
    requests on that UDP port of `host` (None or 0: no STUN). `mesh_key` (32 bytes or 64 hex
    characters), `mesh_with` (derper's `--mesh-with` text) and `mesh_retry` (seconds between
    attempts, derper's 5): join a mesh (see mesh.py).
    Other keyword arguments are `RelayOptions` fields (timeouts, queue depth).
    """

    def __init__(self, key: PrivateKeyLike | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 tls: TLSArg = False, certfile: str | None = None, keyfile: str | None = None,
                 hostname: str | None = None, meta_cert: bool = True, stun_port: int | None = None,
                 mesh_key: bytes | str | None = None, mesh_with: str = "", mesh_retry: float = RETRY_INTERVAL,
                 **options: Any) -> None:
        self.private_key = PrivateKey.coerce(key) if key is not None else PrivateKey.generate()
        self.host = host
        self.hostname = hostname
        self.options = RelayOptions(**options)
        self._tls = tls_setup(tls, certfile, keyfile, hostname, host, self.private_key.public_key, meta_cert)
        self._requested_port = port
        self._requested_stun_port = stun_port
        self._mesh_key = parse_mesh_key(mesh_key) if isinstance(mesh_key, str) else mesh_key
        self._mesh_with = parse_mesh_with(mesh_with, use_http=use_derp_http()) if mesh_with else []
        if self._mesh_with and self._mesh_key is None:
            raise ValueError("mesh_with requires mesh_key")
        self._mesh_retry = mesh_retry
        self._core: RelayServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._port: int | None = None
        self._final_stats: dict[str, Any] = {}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> DerpServer:
        """Start the loop thread; return once listening (raises OSError if the port is taken)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("DerpServer is closed")
            if self._thread is not None:
                return self
            ready = threading.Event()
            result: dict[str, BaseException] = {}
            self._thread = threading.Thread(target=self._run, args=(ready, result), name="derpnet-relay", daemon=True)
            self._thread.start()
        ready.wait()
        if "error" in result:
            self._thread.join()
            with self._lock:
                self._closed = True
            raise result["error"]
        return self

    def _run(self, ready: threading.Event, result: dict[str, BaseException]) -> None:
        try:
            asyncio.run(self._main(ready, result))
        except BaseException as e:  # pragma: no cover - only if the loop itself breaks
            if not ready.is_set():
                result["error"] = e
                ready.set()
            else:
                log.warning("relay: event loop failed: %s", e, exc_info=True)

    async def _main(self, ready: threading.Event, result: dict[str, BaseException]) -> None:
        core = RelayServer(self.private_key, host=self.host, port=self._requested_port,
                           ssl_context=self._tls.context, options=self.options, mesh_key=self._mesh_key)
        try:
            await core.start()
            if self._requested_stun_port:
                await core.start_stun(self._requested_stun_port)
            if self._mesh_with:
                core.start_mesh(self._mesh_with, retry_interval=self._mesh_retry)
        except BaseException as e:
            await core.close()
            result["error"] = e
            ready.set()
            return
        self._core = core
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._port = core.port
        ready.set()
        try:
            await self._stop.wait()
        finally:
            await core.close()
            self._final_stats = core.stats()

    def close(self, timeout: float = 10.0) -> None:
        """Stop listening, close every client connection and join the thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # loop already gone
                pass
        if thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> DerpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._port else "new")
        return f"<DerpServer {self.url if self._port else ''} {state} key={self.public_key}>"

    # ------------------------------------------------------------ properties

    @property
    def port(self) -> int:
        """The bound TCP port (after start())."""
        if self._port is None:
            raise RuntimeError("DerpServer is not started")
        return self._port

    @property
    def stun_port(self) -> int | None:
        """The bound STUN (UDP) port, None without STUN."""
        core = self._core
        return core.stun.port if core is not None and core.stun is not None else None

    @property
    def tls(self) -> bool:
        """True when serving HTTPS."""
        return self._tls.context is not None

    @property
    def url(self) -> str:
        """The URL clients should dial, e.g. http://127.0.0.1:PORT or https://localhost:PORT."""
        return relay_url(self.host, self.port, self.tls, self.hostname)

    @property
    def public_key(self) -> PublicKey:
        """The relay's public key (what ServerKey carries)."""
        return self.private_key.public_key

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context (None for plain HTTP)."""
        return self._tls.context

    @property
    def cert_pem(self) -> bytes | None:
        """The certificate chain served (PEM, without the meta cert); None if an SSLContext was given."""
        return self._tls.cert_pem

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this relay's certificate (handy for its self-signed one)."""
        if self._tls.cert_pem is None:
            raise ValueError("this relay's certificate is unknown (plain HTTP, or an SSLContext was given)")
        return ssl.create_default_context(cadata=self._tls.cert_pem.decode())

    # ------------------------------------------------------------ counters

    def stats(self) -> dict[str, Any]:
        """Counters (see RelayServer.stats); taken on the relay thread for a consistent snapshot."""
        core, loop, thread = self._core, self._loop, self._thread
        if core is None or loop is None or thread is None or not thread.is_alive() or loop.is_closed():
            return dict(self._final_stats)
        if threading.current_thread() is thread:
            return core.stats()
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def take() -> None:
            try:
                fut.set_result(core.stats())
            except BaseException as e:  # pragma: no cover
                fut.set_exception(e)

        try:
            loop.call_soon_threadsafe(take)
            return fut.result(timeout=10)
        except (RuntimeError, concurrent.futures.TimeoutError):
            return dict(self._final_stats)


def serve(key: PrivateKeyLike | None = None, **kwargs: Any) -> DerpServer:
    """Start a relay in a background thread and return it (same arguments as DerpServer)."""
    return DerpServer(key, **kwargs).start()
