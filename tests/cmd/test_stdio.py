"""`join PUBKEY -` / `join --stdio PUBKEY`: one stream over stdin/stdout, as ssh's
ProxyCommand uses it. A separate client program (tests/cmd/stdio_client.py) runs the
command through `sh -c` as ssh does and talks to a real TCP service behind a real `serve`
through a real relay: uploads and downloads SHA-256 checked, half-close both ways,
nothing but the stream on stdout (even with -v), and a broken stream is exit 1 with one
error line. Where an `ssh` client is installed, OpenSSH itself runs it as its ProxyCommand
and exchanges identification lines with a server behind `serve` (no sshd needed)."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from tests.cmd.procs import REPO_ROOT, CliProcess, CountingServer, TransferService, cli_argv, cli_env, run_cli
from tests.relays import OurRelay


@pytest.fixture(scope="module")
def relay():
    with OurRelay() as r:
        yield r


@pytest.fixture(scope="module")
def service():
    with TransferService() as s:
        yield s


@pytest.fixture(scope="module")
def served(relay, service, tmp_path_factory):
    home = tmp_path_factory.mktemp("srv")
    with CliProcess.serve(relay.url, service.port, cli_env(home), extra=["--no-direct"],
                          log_path=home / "serve.log") as srv:
        yield srv


def _proxy_command(relay, pubkey: str, *extra: str) -> str:
    return shlex.join(cli_argv(f"--derp={relay.url}", "join", pubkey, *extra))


def _client(mode: str, n: int, command: str, env: dict, tmp_path) -> dict:
    env = {**env, "STDIO_CLIENT_STDERR": str(tmp_path / "proxy.stderr")}
    r = subprocess.run([sys.executable, "-m", "tests.cmd.stdio_client", mode, str(n), command], env=env,
                       cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    result["stderr"] = (tmp_path / "proxy.stderr").read_text()
    return result


def _log_lines(stderr: str) -> list[str]:
    """stderr's lines but the one-time note that a key file was created (first use)."""
    return [line for line in stderr.splitlines() if line.strip() and "created a new private key" not in line]


@pytest.mark.parametrize("form", [["-"], ["--stdio"]])
def test_upload_half_closes_and_stdout_carries_only_the_stream(relay, served, tmp_path, form):
    """stdin's EOF reaches the service as a FIN (it answers only then), the answer and the
    service's FIN come back on stdout, and nothing else does, with -v logging on."""
    env = cli_env(tmp_path / "cli")
    r = _client("upload", 6 << 20, _proxy_command(relay, served.pubkey, *form, "-v"), env, tmp_path)
    assert r["ok"], r
    assert r["rc"] == 0, r
    assert "stdio to" in r["stderr"]  # the -v logs went to stderr
    assert "Traceback" not in r["stderr"]


def test_download_closes_stdout_at_the_stream_end_while_stdin_stays_open(relay, served, tmp_path):
    env = cli_env(tmp_path / "cli")
    n = 5 * 1000 * 1000 + 7
    r = _client("download", n, _proxy_command(relay, served.pubkey, "-"), env, tmp_path)
    assert r["ok"], r
    assert r["stdout_eof_with_stdin_open"], r
    assert r["rc"] == 0, r
    assert _log_lines(r["stderr"]) == [], r["stderr"]  # quiet by default: ssh shows this in the terminal


class ResetServer(CountingServer):
    """Reads the request line, then resets the connection (RST)."""

    def _handle(self, conn: socket.socket) -> None:
        conn.recv(100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def test_a_reset_stream_is_exit_1_with_one_error_line(relay, tmp_path):
    reset = ResetServer()
    try:
        with CliProcess.serve(relay.url, reset.port, cli_env(tmp_path / "srv"), extra=["--no-direct"]) as srv:
            p = subprocess.Popen(cli_argv(f"--derp={relay.url}", "join", srv.pubkey, "-"),
                                 env=cli_env(tmp_path / "cli"), cwd=str(REPO_ROOT),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert p.stdin is not None
                p.stdin.write(b"hello\n")
                p.stdin.flush()  # stdin stays open: the reset alone must end the process
                out, err = p.communicate(timeout=60)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    finally:
        reset.close()
    assert p.returncode == 1, (out, err)
    assert out == b""
    lines = _log_lines(err.decode())
    assert len(lines) == 1 and lines[0].startswith("derpconnect: error: the stream to "), lines


def test_listen_address_with_stdio_is_a_usage_error(tmp_path):
    r = run_cli(["--derp=http://127.0.0.1:9", "join", "--stdio", "nodekey:" + "ab" * 32, "8080"],
                cli_env(tmp_path))
    assert r.returncode == 2, r
    assert r.stderr.startswith("derpconnect: error: --stdio"), r.stderr
    assert r.stdout == ""


class SshBannerServer(CountingServer):
    """Speaks the first step of SSH: sends its identification line, records the client's."""

    def __init__(self) -> None:
        self.client_banners: list[bytes] = []
        super().__init__(banner=b"SSH-2.0-derpnet_test_server\r\n")

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall(self.banner)
            data = b""
            conn.settimeout(30)
            while b"\n" not in data:
                chunk = conn.recv(256)
                if not chunk:
                    break
                data += chunk
            self.client_banners.append(data.split(b"\n")[0])


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client on this machine")
def test_the_real_ssh_client_talks_through_it(relay, tmp_path):
    """OpenSSH's ssh runs `join KEY -` as its ProxyCommand and exchanges identification
    lines with the server behind serve, both ways (the key exchange then fails: the
    server only speaks that first line)."""
    server = SshBannerServer()
    try:
        with CliProcess.serve(relay.url, server.port, cli_env(tmp_path / "srv"), extra=["--no-direct"]) as srv:
            env = cli_env(tmp_path / "cli")
            proxy = _proxy_command(relay, srv.pubkey, "-")
            r = subprocess.run(["ssh", "-v", "-F", "/dev/null", "-o", f"ProxyCommand={proxy}", "-o", "BatchMode=yes",
                                "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path / 'kh'}",
                                "-o", "ConnectTimeout=60", "nobody@derpnet-test"],
                               env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        server.close()
    assert "remote software version derpnet_test_server" in r.stderr, r.stderr
    assert server.client_banners and server.client_banners[0].startswith(b"SSH-2.0-OpenSSH"), server.client_banners


def test_an_unreachable_peer_is_exit_1_with_one_error_line(relay, tmp_path):
    nobody = "nodekey:" + "cd" * 32
    r = subprocess.run(cli_argv(f"--derp={relay.url}", "join", nobody, "-", "--dial-timeout", "2", "--no-direct"),
                       env=cli_env(tmp_path), cwd=str(REPO_ROOT), capture_output=True, timeout=60, input=b"x")
    assert r.returncode == 1, r
    assert r.stdout == b""
    lines = _log_lines(r.stderr.decode())
    assert len(lines) == 1 and lines[0].startswith("derpconnect: error: cannot reach peer "), lines
