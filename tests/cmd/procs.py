"""Helpers to run our `derpconnect` (python -m derpnet.cmd) as real processes, plus the
local services the CLI tests forward to. Plain functions and classes, no pytest: the
interop tests reuse them next to tests/interop_peers.py's Go peers.

Typical use::

    env = cli_env(tmp_path)
    with start_relay(tmp_path / "relay", env) as relay:            # our relay, plain HTTP
        with CliProcess.serve(relay.url, 8000, env) as srv:         # waits for "Join with"
            with CliProcess.join(relay.url, srv.pubkey, env) as cli:  # waits for "Listening on"
                socket.create_connection(("127.0.0.1", cli.listen_port))

Readiness is always a log line or a port (bounded polling), never a fixed sleep.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.interop_peers import LoggedProcess, free_port, wait_for_port  # noqa: E402,F401

REPO_ROOT = Path(__file__).resolve().parents[2]

JOIN_LINE_RX = (r'Listening through DERP\. Join with '
                r'"derpconnect --derp=(\S+)(?: --derp-ca \S+)? join ([A-Za-z0-9_-]{43})"')
LISTEN_LINE_RX = r"Listening on (\S+)"


# --------------------------------------------------------------------------
# Environment and one-shot runs


def cli_argv(*args) -> list[str]:
    return [sys.executable, "-m", "derpnet.cmd", *[str(a) for a in args]]


def cli_env(home, **extra) -> dict:
    """An environment whose config and cache dirs (and HOME) are under `home`, so that no
    test touches the real home; the repository is importable without installing it."""
    home = Path(home)
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "cache").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERPNET_")}
    env.update({
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(args: Sequence, env: dict, timeout: float = 60.0, input: bytes | None = None
            ) -> subprocess.CompletedProcess:
    """Run `derpconnect ARGS` to completion; text stdout/stderr captured separately."""
    return subprocess.run(cli_argv(*args), env=env, capture_output=True, timeout=timeout,
                          input=input, cwd=str(REPO_ROOT), text=input is None)


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines of stderr (what a user sees)."""
    return [line for line in stderr.splitlines() if line.strip()]


# --------------------------------------------------------------------------
# Ports


# --------------------------------------------------------------------------
# Processes with watched output


class Proc(LoggedProcess):
    """A subprocess whose output tests can wait on, started in the repository by default."""

    def __init__(self, argv: Sequence, env: dict | None = None, log_path=None, cwd=None) -> None:
        super().__init__(argv, log_path, env=env, cwd=str(cwd or REPO_ROOT))


class CliProcess(Proc):
    """A long-running `derpconnect` (serve, join or relay)."""

    pubkey: str | None = None  # serve: the 43-char base64url key from the "Join with" line
    join_derp: str | None = None  # serve: the --derp value in that line
    listen_addr: str | None = None  # join: "HOST:PORT" from "Listening on"
    listen_port: int | None = None

    def __init__(self, args: Sequence, env: dict, log_path=None) -> None:
        super().__init__(cli_argv(*args), env=env, log_path=log_path)

    @classmethod
    def serve(cls, relay: str, target, env: dict, *, extra: Sequence = (), log_path=None,
              timeout: float = 30.0) -> CliProcess:
        """`derpconnect --derp=RELAY serve TARGET EXTRA...`, returned once the join line is out."""
        p = cls([f"--derp={relay}", "serve", str(target), *extra], env, log_path)
        try:
            m = p.wait_for_line(JOIN_LINE_RX, timeout=timeout)
            p.join_derp, p.pubkey = m.group(1), m.group(2)
        except BaseException:
            p.stop()
            raise
        return p

    @classmethod
    def join(cls, relay: str, pubkey: str, env: dict, listen="0", *, extra: Sequence = (), log_path=None,
             timeout: float = 30.0) -> CliProcess:
        """`derpconnect --derp=RELAY join PUBKEY LISTEN EXTRA...`, returned once listening."""
        p = cls([f"--derp={relay}", "join", pubkey, str(listen), *extra], env, log_path)
        try:
            p.listen_addr = p.wait_for_line(LISTEN_LINE_RX, timeout=timeout).group(1)
            p.listen_port = int(p.listen_addr.rsplit(":", 1)[1])
        except BaseException:
            p.stop()
            raise
        return p

    def interrupt(self) -> None:
        self.send_signal(signal.SIGINT)


# --------------------------------------------------------------------------
# Relays


class RelayProc:
    """Our relay (`python -m derpnet.cmd relay`) on a free loopback port: `.url` is what to
    pass as --derp. With `tls=True` it serves a self-signed certificate written to
    `workdir` (`.ca_file`, to pass as --derp-ca)."""

    def __init__(self, workdir, env: dict, *, tls: bool = False, extra: Sequence = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.tls = tls
        self.extra = list(extra)
        self.port = free_port()
        self.proc: CliProcess | None = None
        self.ca_file: str | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> RelayProc:
        args = ["relay", "--listen", f"127.0.0.1:{self.port}"]
        if not any(a.split("=", 1)[0] == "--stun-port" for a in map(str, self.extra)):
            args += ["--stun-port", "0"]  # parallel relays must not fight over UDP 3478
        if self.tls:
            cert, key = make_self_signed(self.workdir, ["localhost", "127.0.0.1"])
            args += ["--cert", cert, "--tls-key", key]
            self.ca_file = cert
        self.proc = CliProcess(args + self.extra, self.env, self.workdir / "relay.log")
        try:
            wait_for_port("127.0.0.1", self.port, timeout=20, proc=self.proc.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> RelayProc:
        return self if self.proc is not None else self.start()  # start_relay() already started it

    def __exit__(self, *exc) -> None:
        self.stop()


def start_relay(workdir, env: dict, *, tls: bool = False, extra: Sequence = ()) -> RelayProc:
    """A started RelayProc (use as a context manager)."""
    return RelayProc(workdir, env, tls=tls, extra=extra).start()


# --------------------------------------------------------------------------
# Local services


class HttpFileServer(Proc):
    """`python -m http.server` serving `directory` on 127.0.0.1 (a real, separate process)."""

    def __init__(self, directory, log_path=None) -> None:
        self.port = free_port()
        super().__init__([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port),
                          "--directory", str(directory)], log_path=log_path)
        try:
            wait_for_port("127.0.0.1", self.port, timeout=20, proc=self.proc)
        except BaseException:
            self.stop()
            raise


class CountingServer:
    """A TCP server in this process on 127.0.0.1: echoes every connection (half-close
    aware: answers with what it got, then closes), and counts accepted connections.
    `banner`: sent first, before anything is read (a server-speaks-first protocol)."""

    def __init__(self, *, echo: bool = True, banner: bytes = b"") -> None:
        self.banner = banner
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.echo = echo
        self.accepted = 0
        self.lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="counting-server", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.banner:
                    conn.sendall(self.banner)
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    if self.echo:
                        conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> CountingServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TransferService:
    """A TCP server in this process on 127.0.0.1 for transfers through a tunnel; each
    connection sends one request line:

    - ``D <n>``: n bytes (`PATTERN` repeated) come back, then a FIN;
    - ``U``: everything up to the client's FIN is hashed; the SHA-256 hex digest comes back;
    - ``S``: `PATTERN` chunks every 10 ms until the connection breaks (a stream to cut).

    `download`, `upload` and `first_byte` are the client sides (all SHA-256 checked, all
    failing with TimeoutError after `inactivity` seconds without progress)."""

    PATTERN = bytes(random.Random(20261201).getrandbits(8) for _ in range(1 << 16)) * 16  # 1 MiB

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._loop, name="transfer-service", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._one, args=(c,), name="transfer-service-conn", daemon=True).start()

    def _one(self, c: socket.socket) -> None:
        try:
            with c:
                c.settimeout(300)
                line = b""
                while not line.endswith(b"\n"):
                    b = c.recv(1)
                    if not b:
                        return
                    line += b
                if line.startswith(b"D "):
                    left = int(line[2:])
                    view = memoryview(self.PATTERN)
                    while left:
                        n = min(left, len(view))
                        c.sendall(view[:n])
                        left -= n
                    c.shutdown(socket.SHUT_WR)
                    while c.recv(1 << 16):
                        pass
                elif line.startswith(b"S"):
                    while True:
                        c.sendall(self.PATTERN[:1 << 16])
                        time.sleep(0.01)
                else:
                    h = hashlib.sha256()
                    while True:
                        b = c.recv(1 << 16)
                        if not b:
                            break
                        h.update(b)
                    c.sendall(h.hexdigest().encode())
        except OSError:
            pass

    @classmethod
    def expected(cls, n: int) -> str:
        """The SHA-256 hex digest of a `D n` download."""
        h = hashlib.sha256()
        while n:
            k = min(n, len(cls.PATTERN))
            h.update(cls.PATTERN[:k])
            n -= k
        return h.hexdigest()

    @classmethod
    def download(cls, port: int, n: int, *, inactivity: float = 15.0, host: str = "127.0.0.1") -> float:
        """Fetch n bytes through `port` and check them (and the FIN after them); MB/s."""
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=inactivity) as s:
            s.sendall(b"D %d\n" % n)
            h = hashlib.sha256()
            got = 0
            while True:
                b = s.recv(1 << 16)
                if not b:
                    break
                h.update(b)
                got += len(b)
            dt = time.perf_counter() - t0
        assert got == n, f"download through the tunnel ended after {got} of {n} bytes"
        assert h.hexdigest() == cls.expected(n), "download through the tunnel corrupted"
        return n / dt / 1e6

    @staticmethod
    def upload(port: int, n: int, *, inactivity: float = 15.0, host: str = "127.0.0.1") -> float:
        """Send n random bytes through `port`, half-close, and check the service's digest; MB/s."""
        blob = os.urandom(min(n, 1 << 20))
        want = hashlib.sha256()
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=inactivity) as s:
            s.sendall(b"U\n")
            left = n
            while left:
                k = min(left, len(blob))
                s.sendall(blob[:k])
                want.update(blob[:k])
                left -= k
            s.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                b = s.recv(128)
                if not b:
                    break
                got += b
        dt = time.perf_counter() - t0
        assert got.decode(errors="replace") == want.hexdigest(), f"upload digest mismatch: {got[:64]!r}"
        return n / dt / 1e6

    @staticmethod
    def first_byte(port: int, *, inactivity: float = 15.0, host: str = "127.0.0.1") -> float:
        """Milliseconds from the TCP connect to the first byte of a 100-byte download."""
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=inactivity) as s:
            s.sendall(b"D 100\n")
            if not s.recv(1):
                raise ConnectionError("no reply through the tunnel")
            dt = time.perf_counter() - t0
            while s.recv(100):
                pass
        return dt * 1e3

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass

    def __enter__(self) -> TransferService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_self_signed(directory, names: Iterable[str] = ("localhost", "127.0.0.1")) -> tuple[str, str]:
    """A self-signed server certificate (also usable as its own CA file) and its key, PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derpnet test")])
    sans = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class TlsProbeServer:
    """A TLS HTTP server in this process answering `GET /derp/latency-check` with 200 (the
    part of a DERP server that `regions --probe` talks to). Counts requests."""

    def __init__(self, cert: str, key: str) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._thread = threading.Thread(target=self._loop, name="tls-probe-server", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                ok = data.startswith(b"GET /derp/latency-check ")
                self.requests += ok
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" if ok else
                          b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> TlsProbeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
