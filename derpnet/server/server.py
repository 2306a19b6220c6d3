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
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Set, Union

from ..keys import PrivateKey, PrivateKeyLike, PublicKey
from . import certs
from .conn import ClientProtocol
from .relay import Relay
from .stun import StunServer

__all__ = ["RelayOptions", "RelayServer", "DerpServer", "serve", "relay_url"]

log = logging.getLogger(__name__)

ACCEPT_BATCH = 32  # connections accepted per wake-up of the listening socket (see RelayServer.start)


@dataclass(frozen=True)
class RelayOptions:
    """Tunables of the relay; defaults are derper's. Tests shorten the timeouts."""

    write_timeout: Optional[float] = 2.0        # a client whose writes stall this long is dropped (None: never)
    handshake_timeout: float = 10.0             # TLS handshake, then the HTTP request head
    client_info_timeout: float = 10.0           # from ServerKey to the client's ClientInfo
    keepalive_interval: float = 60.0            # KeepAlive period, plus jitter of up to 1/12 (5 s)
    queue_depth: int = 32                       # packets per destination queue (disco and others)
    not_here_rate: float = 1.0                  # PeerGone(NotHere) hints per second per client
    not_here_burst: int = 3
    write_buffer_limit: int = 64 << 10          # transport high-water mark before pause_writing
    backlog: int = 1024

    def __post_init__(self) -> None:
        if self.queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        if self.handshake_timeout <= 0 or self.client_info_timeout <= 0:
            raise ValueError("handshake timeouts must be positive")


def relay_url(host: Optional[str], port: int, tls: bool, hostname: Optional[str] = None) -> str:
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

    def __init__(self, private_key: PrivateKey, *, host: Optional[str] = "127.0.0.1", port: int = 0,
                 ssl_context: Optional[ssl.SSLContext] = None, options: Optional[RelayOptions] = None) -> None:
        self.private_key = private_key
        self.public_key: PublicKey = private_key.public_key
        self.host = host
        self.requested_port = port
        self.ssl_context = ssl_context
        self.options = options or RelayOptions()
        self.relay = Relay()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self._server: Optional[asyncio.AbstractServer] = None
        self._conns: Set[ClientProtocol] = set()
        self._ids = itertools.count(1)
        self.stun: Optional[StunServer] = None  # see start_stun()
        self.connections_accepted = 0
        self.http_requests = 0
        self.handshake_timeouts = 0
        self.write_timeouts = 0
        self.protocol_errors = 0
        self.tls_errors = 0

    async def start(self) -> None:
        """Bind and listen. Raises OSError (e.g. address in use) without leaving anything open."""
        self.loop = asyncio.get_running_loop()
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
        log.info("relay: listening on %s (server key %s)", ", ".join(self.addresses), self.public_key)

    async def start_stun(self, port: int) -> StunServer:
        """Also answer STUN Binding requests on UDP `port` of the listen host (stun.py). Raises OSError."""
        stun = StunServer()
        await stun.start(self.host, port)
        self.stun = stun
        return stun

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("relay is not listening")
        return self._server.sockets[0].getsockname()[1]

    @property
    def addresses(self) -> list:
        """Every bound address as HOST:PORT."""
        if self._server is None:
            return []
        out = []
        for s in self._server.sockets:
            h, p = s.getsockname()[:2]
            out.append(f"[{h}]:{p}" if ":" in h else f"{h}:{p}")
        return out

    async def close(self) -> None:
        """Stop listening and drop every connection (idempotent)."""
        if self.stun is not None:
            self.stun.close()
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

    # called by ClientProtocol
    def next_conn_id(self) -> int:
        """A unique id for a new connection."""
        return next(self._ids)

    def connection_opened(self, c: ClientProtocol) -> None:
        """Track an accepted connection."""
        self.connections_accepted += 1
        self._conns.add(c)

    def connection_closed(self, c: ClientProtocol) -> None:
        """Forget a closed connection."""
        self._conns.discard(c)

    def stats(self) -> Dict[str, Any]:
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
            tls_errors=self.tls_errors,
            queued_packets=queued,
            write_buffer_bytes=buffered,
            stun=self.stun.stats() if self.stun is not None else None,
        )
        return d


TLSArg = Union[bool, ssl.SSLContext]


@dataclass
class TLSSetup:
    """What the relay serves over TLS: the server context, and the chain PEM when we built it."""

    context: Optional[ssl.SSLContext] = None
    cert_pem: Optional[bytes] = None  # what we serve (leaf first), if we built the context
    self_signed: bool = False
    names: list = field(default_factory=list)


def tls_setup(tls: TLSArg, certfile: Optional[str], keyfile: Optional[str], hostname: Optional[str],
               host: Optional[str], public_key: PublicKey, meta_cert: bool) -> TLSSetup:
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
    requests on that UDP port of `host` (None or 0: no STUN). Other keyword arguments are
    `RelayOptions` fields (timeouts, queue depth).
    """

    def __init__(self, key: Optional[PrivateKeyLike] = None, *, host: str = "127.0.0.1", port: int = 0,
                 tls: TLSArg = False, certfile: Optional[str] = None, keyfile: Optional[str] = None,
                 hostname: Optional[str] = None, meta_cert: bool = True, stun_port: Optional[int] = None,
                 **options: Any) -> None:
        self.private_key = PrivateKey.coerce(key) if key is not None else PrivateKey.generate()
        self.host = host
        self.hostname = hostname
        self.options = RelayOptions(**options)
        self._tls = tls_setup(tls, certfile, keyfile, hostname, host, self.private_key.public_key, meta_cert)
        self._requested_port = port
        self._requested_stun_port = stun_port
        self._core: Optional[RelayServer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stop: Optional[asyncio.Event] = None
        self._lock = threading.Lock()
        self._closed = False
        self._port: Optional[int] = None
        self._final_stats: Dict[str, Any] = {}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "DerpServer":
        """Start the loop thread; return once listening (raises OSError if the port is taken)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("DerpServer is closed")
            if self._thread is not None:
                return self
            ready = threading.Event()
            result: Dict[str, BaseException] = {}
            self._thread = threading.Thread(target=self._run, args=(ready, result), name="derpnet-relay", daemon=True)
            self._thread.start()
        ready.wait()
        if "error" in result:
            self._thread.join()
            with self._lock:
                self._closed = True
            raise result["error"]
        return self

    def _run(self, ready: threading.Event, result: Dict[str, BaseException]) -> None:
        try:
            asyncio.run(self._main(ready, result))
        except BaseException as e:  # pragma: no cover - only if the loop itself breaks
            if not ready.is_set():
                result["error"] = e
                ready.set()
            else:
                log.warning("relay: event loop failed: %s", e, exc_info=True)

    async def _main(self, ready: threading.Event, result: Dict[str, BaseException]) -> None:
        core = RelayServer(self.private_key, host=self.host, port=self._requested_port,
                           ssl_context=self._tls.context, options=self.options)
        try:
            await core.start()
            if self._requested_stun_port:
                await core.start_stun(self._requested_stun_port)
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

    def __enter__(self) -> "DerpServer":
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
    def stun_port(self) -> Optional[int]:
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
    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """The server-side TLS context (None for plain HTTP)."""
        return self._tls.context

    @property
    def cert_pem(self) -> Optional[bytes]:
        """The certificate chain served (PEM, without the meta cert); None if an SSLContext was given."""
        return self._tls.cert_pem

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this relay's certificate (handy for its self-signed one)."""
        if self._tls.cert_pem is None:
            raise ValueError("this relay's certificate is unknown (plain HTTP, or an SSLContext was given)")
        return ssl.create_default_context(cadata=self._tls.cert_pem.decode())

    # ------------------------------------------------------------ counters

    def stats(self) -> Dict[str, Any]:
        """Counters (see RelayServer.stats); taken on the relay thread for a consistent snapshot."""
        core, loop, thread = self._core, self._loop, self._thread
        if core is None or loop is None or thread is None or not thread.is_alive() or loop.is_closed():
            return dict(self._final_stats)
        if threading.current_thread() is thread:
            return core.stats()
        fut: concurrent.futures.Future = concurrent.futures.Future()

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


def serve(key: Optional[PrivateKeyLike] = None, **kwargs: Any) -> DerpServer:
    """Start a relay in a background thread and return it (same arguments as DerpServer)."""
    return DerpServer(key, **kwargs).start()
