"""Our relay as a real subprocess for tests: `python -m derpnet.server` (pure Python, no fixtures).

    with OurRelay() as relay:                 # http://127.0.0.1:<free port>
        ... relay.url, relay.port, relay.public_key ...
    with OurRelay(tls=True) as relay:         # https://localhost:<port>, leaf from a test CA
        ctx = relay.ssl_context()             # trusts relay.ca_file

`restart()` brings it back on the same port with the same key (fault tests); `kill()`
SIGKILLs it. Readiness is the relay's ready line, never a sleep. The test CA comes
from tests.interop_peers.make_test_ca, and the process handling from its LoggedProcess.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from derpnet.keys import PublicKey
from tests.interop_peers import LoggedProcess, make_test_ca

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_RX = r"derpnet relay listening on (?P<url>https?://\S+) \(server key (?P<key>nodekey:[0-9a-f]{64})\)"
STUN_RX = r"STUN on udp (?P<addr>\S+):(?P<port>\d+)$"


class OurRelay:
    """`python -m derpnet.server` on loopback, started on enter and stopped on exit."""

    def __init__(self, *, tls: bool = False, cert: str | None = None, key: str | None = None,
                 hostname: str | None = None, port: int = 0, workdir: str | None = None,
                 extra_args: Sequence[str] = (), ready_timeout: float = 20.0,
                 host: str = "127.0.0.1", argv_prefix: Sequence[str] = (), stun_port: int | None = None) -> None:
        # host: the listen address; argv_prefix: run it through e.g. `ip netns exec NS`
        self.host, self.argv_prefix = host, list(argv_prefix)
        # stun_port: None → --stun-port 0 (no STUN, so parallel relays never fight over 3478),
        # unless extra_args has its own --stun-port; N → STUN on UDP N (self.stun_port once started)
        self.requested_stun_port = stun_port
        self.stun_port: int | None = None
        self.tls = tls or cert is not None
        self.hostname = hostname or ("localhost" if self.tls else None)
        self.requested_port = port
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="derpnet-relay-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key_file = self.workdir / "relay.key"  # persists the server key across restart()
        self.ca_file: str | None = None
        self.cert, self.key = cert, key
        if self.tls and cert is None:
            self.ca_file, make_leaf = make_test_ca(self.workdir / "pki")
            self.cert, self.key = make_leaf(list(dict.fromkeys([self.hostname, self.host, "127.0.0.1"])))
        self.logged: LoggedProcess | None = None
        self.url = ""
        self.port = 0
        self.public_key: PublicKey | None = None
        self._starts = 0

    @property
    def proc(self) -> subprocess.Popen:
        """The running `python -m derpnet.server` process."""
        if self.logged is None:
            raise RuntimeError("relay not started")
        return self.logged.proc

    def argv(self, port: int) -> list:
        """The command line for a relay on `port`."""
        argv = [*self.argv_prefix, sys.executable, "-m", "derpnet.server", "--listen", f"{self.host}:{port}",
                "--key-file", str(self.key_file)]
        if self.tls:
            argv += ["--cert", str(self.cert), "--tls-key", str(self.key)]
        if self.hostname:
            argv += ["--hostname", self.hostname]
        if not any(a.split("=", 1)[0] == "--stun-port" for a in self.extra_args):
            argv += ["--stun-port", str(self.requested_stun_port or 0)]
        return argv + self.extra_args

    def start(self) -> OurRelay:
        """Start the process and wait for its ready line (url, port, key)."""
        port = self.port or self.requested_port
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._starts += 1
        self.logged = LoggedProcess(self.argv(port), self.workdir / f"relay-{self._starts}.log", env=env, cwd=REPO_ROOT)
        try:
            m = self.logged.wait_for_line(READY_RX, timeout=self.ready_timeout)
            if self.requested_stun_port:
                self.stun_port = int(self.logged.wait_for_line(STUN_RX, timeout=self.ready_timeout).group("port"))
        except BaseException:
            self.logged.stop()
            raise
        self.url = m.group("url")
        self.port = int(self.url.rsplit(":", 1)[1])
        self.public_key = PublicKey.parse(m.group("key"))
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context trusting the test CA (None for plain HTTP)."""
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=self.ca_file)

    def output(self) -> str:
        """The relay's stdout and stderr so far."""
        return self.logged.output() if self.logged else ""

    def kill(self) -> None:
        """SIGKILL the relay (a crash, for fault tests)."""
        if self.logged is not None and self.logged.proc.poll() is None:
            self.logged.proc.kill()
            self.logged.proc.wait(timeout=10)
        if self.logged is not None:
            self.logged.stop()

    def restart(self) -> OurRelay:
        """Kill if running, then start again on the same port with the same server key."""
        self.kill()
        return self.start()

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.logged is None:
            return None
        return self.logged.stop(timeout=10)

    def __enter__(self) -> OurRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
