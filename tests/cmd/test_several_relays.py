"""serve and join on two relays at once (`--derp A,B`, or --derp repeated), as real
processes: a download through join survives killing the relay that carries it
(SHA-256 checked), serve's join line names both relays, and a relay that is down at
start does not stop serve from starting on the other."""

from __future__ import annotations

import hashlib
import socket

import pytest

from tests.cmd.procs import CliProcess, TransferService, cli_env, free_port
from tests.relays import OurRelay

SIZE = 40 << 20
KILL_AT = 8 << 20


@pytest.fixture
def service():
    with TransferService() as s:
        yield s


def test_download_survives_killing_the_relay_in_use(tmp_path, service):
    with OurRelay(workdir=str(tmp_path / "a")) as a, OurRelay(workdir=str(tmp_path / "b")) as b:
        relays = {a.url: a, b.url: b}
        with CliProcess.serve(f"{a.url},{b.url}", service.port, cli_env(tmp_path / "srv"),
                              extra=["--no-direct"], log_path=tmp_path / "serve.log") as srv:
            assert srv.join_derp == f"{a.url},{b.url}"
            with CliProcess(["--derp", b.url, "--derp", a.url, "join", srv.pubkey, "0", "--no-direct"],
                            cli_env(tmp_path / "cli"), tmp_path / "join.log") as cli:
                port = int(cli.wait_for_line(r"Listening on (\S+)").group(1).rsplit(":", 1)[1])
                with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                    s.sendall(b"D %d\n" % SIZE)
                    h, got, killed = hashlib.sha256(), 0, None
                    while True:
                        data = s.recv(1 << 16)
                        if not data:
                            break
                        h.update(data)
                        got += len(data)
                        if killed is None and got >= KILL_AT:
                            # the relay serve sends the download through (to join's key)
                            via = [line for line in srv.lines() if "through relay" in line]
                            assert via, srv.output()
                            killed = via[-1].rsplit(" ", 1)[1]
                            relays[killed].kill()
                assert killed is not None
                assert got == SIZE, f"{got} of {SIZE} bytes"
                assert h.hexdigest() == TransferService.expected(SIZE), "corrupted"
                other = b.url if killed == a.url else a.url
                assert any(f"through relay {other}" in line for line in srv.lines()), srv.output()


def test_serve_starts_when_one_relay_is_down(tmp_path, service):
    dead = f"http://127.0.0.1:{free_port()}"
    with OurRelay() as b:
        with CliProcess.serve(f"{dead},{b.url}", service.port, cli_env(tmp_path / "srv"),
                              extra=["--no-direct"], log_path=tmp_path / "serve.log") as srv:
            assert f"relay {dead} did not answer" in srv.output()
            with CliProcess.join(b.url, srv.pubkey, cli_env(tmp_path / "cli"), extra=["--no-direct"]) as cli:
                assert cli.listen_port is not None
                TransferService.download(cli.listen_port, 1 << 20)


def test_derp_lists_and_repeats_add_up(monkeypatch):
    from derpnet.cmd.cli import build_parser
    from derpnet.cmd.relays import Relays, split_specs

    monkeypatch.setenv("DERPNET_DERP", "http://127.0.0.1:1")
    args = build_parser().parse_args(["--derp", "http://127.0.0.1:2", "--derp=http://127.0.0.1:3, http://127.0.0.1:2",
                                      "serve", "80"])
    assert split_specs(args.derp) == ["http://127.0.0.1:2", "http://127.0.0.1:3"]  # the env default replaced
    relays = Relays.from_args(args)
    assert relays.several and relays.hosts() == ["http://127.0.0.1:2", "http://127.0.0.1:3"]
    assert relays.shown("ignored") == "http://127.0.0.1:2,http://127.0.0.1:3"
    args = build_parser().parse_args(["serve", "80"])
    assert not Relays.from_args(args).several  # the env default alone


def test_a_bad_relay_in_a_list_is_a_usage_error(tmp_path):
    from tests.cmd.procs import run_cli
    r = run_cli(["--derp", "http://127.0.0.1:2,ftp://x", "serve", "80"], cli_env(tmp_path))
    assert r.returncode == 2, r
    assert r.stderr.startswith("derpconnect: error: --derp=ftp://x: "), r.stderr


def test_serve_is_reachable_on_each_of_its_relays(tmp_path, service):
    """A serve on A and B answers a join that only knows A, and one that only knows B."""
    with OurRelay(workdir=str(tmp_path / "a")) as a, OurRelay(workdir=str(tmp_path / "b")) as b:
        with CliProcess.serve(f"{a.url},{b.url}", service.port, cli_env(tmp_path / "srv"),
                              extra=["--no-direct"], log_path=tmp_path / "serve.log") as srv:
            for i, relay in enumerate((a, b)):
                with CliProcess.join(relay.url, srv.pubkey, cli_env(tmp_path / f"cli{i}"),
                                     extra=["--no-direct"]) as cli:
                    assert cli.listen_port is not None
                    TransferService.download(cli.listen_port, 1 << 20)
