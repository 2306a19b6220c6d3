"""Who may connect to a real relay process: --allow-clients (reloaded on SIGHUP), derper's
--verify-client-url against a real admission controller on loopback, and bad files
refused with their line number (at start) or kept out (on reload)."""

from __future__ import annotations

import http.server
import json
import signal
import socket
import threading

import pytest

from derpnet.client import DerpClient
from derpnet.errors import HandshakeError
from derpnet.keys import PrivateKey
from tests.derpnet.test_server_cli import run_cli
from tests.rawderp import RawDerpClient, wait_until
from tests.relays import OurRelay


def _reload(relay: OurRelay, expect: str) -> None:
    """SIGHUP the relay and wait for its line saying how the reload went."""
    start = len(relay.logged.lines())
    relay.proc.send_signal(signal.SIGHUP)
    relay.logged.wait_for_line(expect, timeout=10, start=start)


def _refusal(relay: OurRelay, key: PrivateKey) -> str:
    with pytest.raises(HandshakeError) as e:
        DerpClient(relay.url, key, connect_timeout=10).connect()
    return str(e.value)


def test_allow_list_admits_listed_keys_refuses_others_and_reloads(tmp_path):
    alice, bob, carol = (PrivateKey.generate() for _ in range(3))
    allow = tmp_path / "allow.txt"
    allow.write_text(f"# the team\n{alice.public_key}\n{bob.public_key.b64()}   # bob\n")
    with OurRelay(extra_args=["--allow-clients", str(allow)]) as relay:
        with RawDerpClient(relay.url, alice) as a, RawDerpClient(relay.url, bob) as b:
            a.send(bob.public_key, b"allowed")
            assert b.recv_packet().data == b"allowed"
            msg = _refusal(relay, carol)
            assert "relay refused the connection: access denied: this relay does not admit key" in msg
            assert carol.public_key.short() in msg and carol.public_key.hex() not in msg

            # carol is added and bob removed: bob is told why and disconnected, alice stays.
            allow.write_text(f"{alice.public_key}\n{carol.public_key}\n")
            _reload(relay, r"configuration applied: allowed 2 key\(s\).* 1 client\(s\) disconnected")
            assert any(f.problem.endswith("was removed from the relay's allow list")
                       for f in _frames_until_closed(b) if hasattr(f, "problem"))
            with RawDerpClient(relay.url, carol) as c:
                a.send(carol.public_key, b"still here")
                assert c.recv_packet().data == b"still here"
            assert "does not admit key" in _refusal(relay, bob)

            # A broken file is logged with its line and changes nothing.
            allow.write_text(f"{alice.public_key}\nnot-a-key\n")
            _reload(relay, r"reload failed, keeping the previous configuration: .*allow.txt, line 2: ")
            with RawDerpClient(relay.url, carol) as c:
                a.send(carol.public_key, b"after a bad reload")
                assert c.recv_packet().data == b"after a bad reload"
            a.send(alice.public_key, b"alice never dropped")
            assert a.recv_packet().data == b"alice never dropped"


def _frames_until_closed(c: RawDerpClient) -> list:
    frames = []
    try:
        while True:
            frames.append(c.recv_frame(timeout=5))
    except ConnectionError:
        return frames


@pytest.mark.parametrize("name, text, where", [
    ("allow.txt", "# ok\nnodekey:" + "ab" * 32 + "\nnodekey:zz\n", "allow.txt, line 3: nodekey"),
    ("rates.json", '{\n "PerClientRateLimitBytesPerSec": 1000,\n "Burst": 5\n}', "rates.json, line 3: unknown field"),
    ("rates.json", '{\n "PerClientRateLimitBytesPerSec": 1000,,\n}', "rates.json, line 2: not valid JSON"),
])
def test_bad_file_is_refused_at_start_with_its_line(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    flag = "--allow-clients" if name.startswith("allow") else "--rate-config"
    r = run_cli("--listen", "127.0.0.1:0", "--stun-port", "0", flag, str(path))
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"derpnet relay: {path.parent}/{where}"), r.stderr
    r = run_cli("--listen", "127.0.0.1:0", "--stun-port", "0", flag, str(tmp_path / "missing"))
    assert r.returncode == 1 and "missing: cannot read it: No such file or directory" in r.stderr


# ---------------------------------------------------------------- --verify-client-url

class Controller:
    """A real admission controller on loopback: records derper's requests, answers from `verdicts`."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.verdicts: dict[str, object] = {}  # NodePublic -> {"Allow": ...} body, or an int status
        self.gate = threading.Event()
        self.gate.set()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.gate.wait(10)
                verdict = outer.verdicts.get(body["NodePublic"], {"Allow": False})
                status = verdict if isinstance(verdict, int) else 200
                data = b"" if isinstance(verdict, int) else json.dumps(verdict).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/admit"
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-admission", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def controller():
    c = Controller()
    yield c
    c.close()


def test_verify_client_url_speaks_derpers_protocol(controller):
    yes, no, teapot = (PrivateKey.generate() for _ in range(3))
    controller.verdicts = {str(yes.public_key): {"Allow": True}, str(no.public_key): {"Allow": False},
                           str(teapot.public_key): 418}
    with OurRelay(extra_args=["--verify-client-url", controller.url]) as relay:
        with RawDerpClient(relay.url, yes) as a:
            a.send(yes.public_key, b"admitted")
            assert a.recv_packet().data == b"admitted"
        assert controller.requests[0] == {"NodePublic": str(yes.public_key), "Source": "127.0.0.1"}
        assert "admission controller did not admit key" in _refusal(relay, no)
        assert "admission controller did not admit key" in _refusal(relay, teapot)  # not 200: refused
        assert [r["NodePublic"] for r in controller.requests] == [str(k.public_key) for k in (yes, no, teapot)]


def test_unreachable_controller_fails_open_by_default_and_closed_when_asked():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port nobody listens on: connection refused
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/admit"
        with OurRelay(extra_args=["--verify-client-url", dead]) as relay:
            with RawDerpClient(relay.url) as a:
                a.send(a.public_key, b"fail open")
                assert a.recv_packet().data == b"fail open"
            relay.logged.wait_for_line(r"admission controller unreachable; allowing client")
        with OurRelay(extra_args=["--verify-client-url", dead, "--verify-client-url-fail-open=false"]) as relay:
            assert "admission controller is unavailable" in _refusal(relay, PrivateKey.generate())


def test_a_slow_controller_never_stalls_the_relay(controller):
    """Verification runs off the relay's loop: while a hello waits for the controller,
    admitted clients keep exchanging packets; the waiting client gets in afterwards."""
    first, late = PrivateKey.generate(), PrivateKey.generate()
    controller.verdicts = {str(first.public_key): {"Allow": True}, str(late.public_key): {"Allow": True}}
    with OurRelay(extra_args=["--verify-client-url", controller.url]) as relay:
        with RawDerpClient(relay.url, first) as a:
            controller.gate.clear()  # the controller now holds every answer
            result: dict = {}
            t = threading.Thread(target=lambda: result.update(c=RawDerpClient(relay.url, late, timeout=15)),
                                 name="test-late-client", daemon=True)
            t.start()
            wait_until(lambda: len(controller.requests) == 2, what="the second verification")
            for i in range(20):
                a.send(first.public_key, b"%d" % i)
                assert a.recv_packet().data == b"%d" % i
            assert t.is_alive()  # still waiting for its verdict
            controller.gate.set()
            t.join(15)
            with result["c"] as c:
                a.send(late.public_key, b"welcome")
                assert c.recv_packet().data == b"welcome"


def test_a_verify_url_that_is_not_http_is_refused_at_start():
    r = run_cli("--listen", "127.0.0.1:0", "--stun-port", "0", "--verify-client-url", "admission.example.com")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == ("derpnet relay: --verify-client-url: expected an http:// or https:// URL, "
                                "not 'admission.example.com'")


def test_refusal_reason_arrives_over_tls_too(tmp_path):
    allowed, other = PrivateKey.generate(), PrivateKey.generate()
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{allowed.public_key}\n")
    with OurRelay(tls=True, extra_args=["--allow-clients", str(allow)]) as relay:
        ctx = relay.ssl_context()
        with DerpClient(relay.url, allowed, ssl_context=ctx).connect() as a:
            assert a.connected
        with pytest.raises(HandshakeError, match="access denied: this relay does not admit key"):
            DerpClient(relay.url, other, ssl_context=ctx, connect_timeout=10).connect()
