"""Misbehaving relays for client tests: a scripted DERP relay, a plain HTTP server and a
TCP proxy whose connections can be cut. Loopback only; every wait has a deadline.

The scripted relay drives our sans-IO `ServerConnection`, so a handler only decides
what to do after (or instead of) the handshake.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from derpnet.connection import AcceptClient, AcceptUpgrade, ClientHello, ServerConnection, UpgradeRequest
from derpnet.keys import PrivateKey, PublicKey
from tests.conftest import Relay, missing_go_peer
from tests.interop_peers import GoDerper, derper_path, free_port, skip_reason
from tests.relays import OurRelay


class FakeRelay:
    """Accepts connections on 127.0.0.1 and runs `handler(sock, relay, n)` for the n-th one
    (n from 0) in its own thread. `url` is http://127.0.0.1:PORT."""

    def __init__(self, handler: Callable[[socket.socket, FakeRelay, int], None], *,
                 rcvbuf: int | None = None) -> None:
        self.key = PrivateKey.generate()
        self.handler = handler
        self.stop = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # inherited by accepted sockets
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._cond = threading.Condition()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="fake-relay-accept", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._cond:
                n = self.accepted
                self.accepted += 1
                self._socks.append(sock)
                self._cond.notify_all()
            t = threading.Thread(target=self._serve, args=(sock, n), name=f"fake-relay-conn-{n}", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, n: int) -> None:
        try:
            self.handler(sock, self, n)
        except OSError:
            pass
        finally:
            sock.close()

    def wait_accepted(self, count: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.accepted >= count, timeout)

    def close(self) -> None:
        self.stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        self.listener.close()
        with self._cond:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> FakeRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recv_some(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    return sock.recv(65536)


def derp_accept(sock: socket.socket, key: PrivateKey, timeout: float = 5.0) -> tuple[ServerConnection, PublicKey]:
    """Play the relay's side of the upgrade and hello (101, ServerKey, ServerInfo)."""
    conn = ServerConnection(key)
    deadline = time.monotonic() + timeout
    pending: list[object] = []
    while True:
        for ev in pending:
            if isinstance(ev, UpgradeRequest):
                sock.sendall(conn.send(AcceptUpgrade()))
                pending.extend(conn.receive_data(b""))
            elif isinstance(ev, ClientHello):
                sock.sendall(conn.send(AcceptClient()))
                return conn, ev.key
        pending.clear()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("client did not finish the handshake")
        data = recv_some(sock, left)
        if not data:
            raise ConnectionError("client closed during the handshake")
        pending.extend(conn.receive_data(data))


def read_frames(sock: socket.socket, conn: ServerConnection, want: type, timeout: float = 5.0) -> object:
    """Read until the client sends a frame of type `want`; return it."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {want.__name__} from the client")
        data = recv_some(sock, left)
        if not data:
            raise ConnectionError("client closed")
        for ev in conn.receive_data(data):
            if isinstance(ev, want):
                return ev


def drain_until_stop(sock: socket.socket, relay: FakeRelay) -> None:
    """Keep reading (and discarding) until the client leaves or the relay stops."""
    sock.settimeout(0.2)
    while not relay.stop.is_set():
        try:
            if not sock.recv(65536):
                return
        except TimeoutError:
            continue


class StatusHTTPServer:
    """An ordinary HTTP server answering every GET with `status` and an HTML body."""

    def __init__(self, status: int) -> None:
        outer = self
        self.status = status
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append(self.path)
                body = b"<!DOCTYPE html><html><body><h1>Not a DERP relay</h1></body></html>"
                self.send_response(outer.status)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="fake-http",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> StatusHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpProxy:
    """Forwards 127.0.0.1:port to target_host:target_port; `cut()` kills every live connection
    (both directions), as a relay or a middlebox dropping the TCP connection would."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._all: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self._all += [client, upstream]
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(a, b), name="proxy-pump", daemon=True)
                self._threads.append(t)
                t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> int:
        """Close every live connection; returns how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        return len(pairs)

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.cut()
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)
        for s in self._all:
            s.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()




# ---------------------------------------------------------------- real relays by kind

RELAY_KINDS = ("ours", "ours-tls", "go", "go-tls")


@contextlib.contextmanager
def real_relay(kind: str, workdir) -> Iterator[Relay]:
    """A running relay of `kind` ("ours", "ours-tls", "go", "go-tls") as a tests.conftest.Relay.

    Go kinds call missing_go_peer() (skip, or fail in CI) when derper is not built.
    """
    tls = kind.endswith("-tls")
    if kind.startswith("go"):
        if derper_path() is None:
            missing_go_peer(skip_reason("derper"))
        with GoDerper(workdir, tls=tls, port=free_port() if tls else None) as d:
            yield Relay("go", d.url, d.ssl_context(), d)
    else:
        with OurRelay(tls=tls, workdir=str(workdir)) as r:
            yield Relay("ours", r.url, r.ssl_context(), r)


def relay_params(kinds=RELAY_KINDS) -> list:
    """pytest params for `kinds`, with the Go ones marked interop."""
    return [pytest.param(k, marks=pytest.mark.interop) if k.startswith("go") else k for k in kinds]
