"""Small real HTTP middleboxes on loopback for tests, each a listening socket with named threads.

`ConnectProxy`: an HTTP CONNECT proxy (what HTTPS_PROXY names on a locked-down network);
`ProxyProcess` runs it as its own process (`python -m tests.httpfront connect-proxy`), which
prints one line per connection and per CONNECT.
It resolves names itself through `names` (so a client behind it never needs to resolve the
relay's name), can require Proxy-Authorization, and records every CONNECT target.
`WebSocketOnlyFront`: a reverse proxy that passes WebSocket upgrades to the relay behind it
and answers anything else with 403 (as fronts that only know WebSockets do).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["ConnectProxy", "WebSocketOnlyFront", "ProxyProcess"]


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(4096)
        if not data or len(buf) > 65536:
            return b"", b""
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Server:
    """A threaded TCP server on 127.0.0.1 calling `handle(conn)` per connection."""

    def __init__(self, name: str, log: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.log = log or (lambda line: None)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._spawn(self._accept, f"{name}-accept")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self.connections += 1
                self._socks.append(conn)
            self.log(f"accepted connection {self.connections}")
            self._spawn(self._serve, f"{self.name}-conn", conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except OSError:
            pass

    def handle(self, conn: socket.socket) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def track(self, s: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(s)
        return s

    def splice(self, a: socket.socket, b: socket.socket) -> None:
        self._spawn(_pipe, f"{self.name}-pipe", b, a)
        _pipe(a, b)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, threads = list(self._socks), list(self._threads)
        self.sock.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in threads:
            t.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ConnectProxy(_Server):
    """An HTTP CONNECT proxy; `url` for HTTPS_PROXY, `targets` lists what was asked for."""

    def __init__(self, names: dict[str, str] | None = None, auth: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.names = dict(names or {})
        self.auth = auth  # the required Proxy-Authorization value, if any
        self.targets: list[str] = []
        super().__init__("connect-proxy", log)

    def handle(self, conn: socket.socket) -> None:
        head, rest = _read_head(conn)
        lines = head.decode("latin-1").split("\r\n")
        method, target = (lines[0].split(" ") + ["", ""])[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if method != "CONNECT":
            conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.targets.append(target)
        if self.auth is not None and headers.get("proxy-authorization") != self.auth:
            self.log(f"CONNECT {target} -> 407")
            conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port = target.rpartition(":")
        try:
            upstream = self.track(socket.create_connection((self.names.get(host, host.strip("[]")), int(port)), 5))
        except OSError:
            self.log(f"CONNECT {target} -> 502")
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        self.log(f"CONNECT {target} -> 200")
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            upstream.sendall(rest)
        self.splice(conn, upstream)


class WebSocketOnlyFront(_Server):
    """Passes `Upgrade: websocket` requests to `backend` (host, port); 403 for the rest."""

    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self.refused = 0
        super().__init__("ws-front")

    def handle(self, conn: socket.socket) -> None:
        head, rest = _read_head(conn)
        if b"\r\nupgrade: websocket" not in head.lower():
            self.refused += 1
            body = b"only WebSocket upgrades pass here\n"
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))
            return
        upstream = self.track(socket.create_connection(self.backend, 5))
        upstream.sendall(head + b"\r\n\r\n" + rest)
        self.splice(conn, upstream)


class ProxyProcess:
    """`ConnectProxy` in a process of its own: `url`, and what it did from its output lines."""

    def __init__(self, workdir: Path, names: dict[str, str] | None = None, auth: str | None = None) -> None:
        from tests.interop_peers import LoggedProcess  # (a test helper, imported where used)

        root = Path(__file__).resolve().parent.parent
        argv = [sys.executable, "-m", "tests.httpfront", "connect-proxy"]
        for name, addr in (names or {}).items():
            argv += ["--name", f"{name}={addr}"]
        env = dict(os.environ, PYTHONPATH=str(root))
        if auth is not None:
            env["PROXY_AUTH"] = auth  # not on the command line
        self.proc = LoggedProcess(argv, Path(workdir) / "proxy.log", env=env, cwd=root)
        try:
            self.url = self.proc.wait_for_line(r"listening on (http://\S+)", timeout=20).group(1)
            self.port = int(self.url.rsplit(":", 1)[1])
        except BaseException:
            self.proc.stop()
            raise

    def targets(self) -> list[tuple[str, int]]:
        """(target, status) of every CONNECT so far."""
        return [(m.group(1), int(m.group(2))) for line in self.proc.lines()
                if (m := re.search(r"CONNECT (\S+) -> (\d+)", line))]

    @property
    def connections(self) -> int:
        return sum("accepted connection" in line for line in self.proc.lines())

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match:
        return self.proc.wait_for_line(pattern, timeout=timeout)

    def stop(self) -> None:
        self.proc.stop()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.httpfront")
    ap.add_argument("kind", choices=["connect-proxy"])
    ap.add_argument("--name", action="append", default=[], metavar="NAME=ADDR", help="resolve NAME to ADDR")
    args = ap.parse_args(argv)
    names = dict(n.split("=", 1) for n in args.name)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with ConnectProxy(names, os.environ.get("PROXY_AUTH"), log=lambda line: print(line, flush=True)) as proxy:
        print(f"listening on {proxy.url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
