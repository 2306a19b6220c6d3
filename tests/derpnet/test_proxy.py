"""Reaching a relay through an HTTP CONNECT proxy named by the environment (derpnet.proxy):
the selection rules, then a real proxy process on loopback in front of our relay."""

from __future__ import annotations

import base64
import socket
import threading

import pytest

from derpnet.client import DerpClient
from derpnet.keys import PrivateKey
from derpnet.proxy import ProxyURL, no_proxy_matches, parse_proxy_url, proxy_for
from tests.httpfront import ProxyProcess
from tests.relays import OurRelay

NAME = "relay.test"  # resolvable only by the proxy: a proxied client never resolves it itself

# ---------------------------------------------------------------- selection (pure)


@pytest.mark.parametrize("scheme, env, want", [
    ("https", {"HTTPS_PROXY": "proxy:3128"}, ProxyURL("proxy", 3128)),
    ("https", {"https_proxy": "http://p"}, ProxyURL("p", 80)),
    ("https", {"HTTPS_PROXY": "http://A", "https_proxy": "http://b"}, ProxyURL("a", 80)),
    ("https", {"HTTP_PROXY": "http://p:1"}, None),  # only HTTPS_PROXY for https relays
    ("http", {"HTTP_PROXY": "http://u:p%40ss@p:1"}, ProxyURL("p", 1, "u", "p@ss")),
    ("http", {"HTTPS_PROXY": "http://p:1"}, None),
    ("https", {}, None),
])
def test_which_variable(scheme, env, want):
    assert proxy_for(scheme, "relay.example.com", 443, env) == want


@pytest.mark.parametrize("no_proxy, host, port, bypass", [
    ("*", "relay.example.com", 443, True),
    ("example.com", "relay.example.com", 443, True),
    ("example.com", "example.com", 443, True),
    ("example.com", "badexample.com", 443, False),
    (".example.com", "relay.example.com", 443, True),
    (".example.com", "example.com", 443, False),
    ("*.example.com", "relay.example.com", 443, True),
    ("other.org, relay.example.com:443", "relay.example.com", 443, True),
    ("relay.example.com:8443", "relay.example.com", 443, False),
    ("10.0.0.0/8", "10.1.2.3", 443, True),
    ("10.0.0.0/8", "11.1.2.3", 443, False),
    ("10.1.2.3", "10.1.2.3", 443, True),
    ("[2001:db8::1]:443", "2001:db8::1", 443, True),
    ("", "relay.example.com", 443, False),
    ("EXAMPLE.COM.", "Relay.Example.Com", 443, True),
])
def test_no_proxy(no_proxy, host, port, bypass):
    assert no_proxy_matches(no_proxy, host, port) is bypass
    env = {"HTTPS_PROXY": "http://p:1", "no_proxy": no_proxy}
    assert (proxy_for("https", host, port, env) is None) is bypass


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1", "127.0.0.53"])
def test_loopback_is_never_proxied(host):
    assert proxy_for("https", host, 443, {"HTTPS_PROXY": "http://p:1"}) is None


@pytest.mark.parametrize("url", ["https://p:1", "socks5://p:1"])
def test_unsupported_proxy_schemes(url):
    with pytest.raises(ValueError, match="only http:// proxies"):
        parse_proxy_url(url)


def test_proxy_password_stays_out_of_messages():
    with pytest.raises(ValueError) as e:
        parse_proxy_url("socks5://user:hunter2@p:1")
    assert "hunter2" not in str(e.value)
    p = parse_proxy_url("http://user:hunter2@p:1")
    assert "hunter2" not in p.url and p.authorization() == "Basic " + base64.b64encode(b"user:hunter2").decode()


# ---------------------------------------------------------------- a real proxy


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    """Each test sets the proxy variables it means; none leak in from the environment."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tls_relay(tmp_path):
    with OurRelay(tls=True, hostname=NAME, workdir=str(tmp_path / "relay")) as r:
        yield r


def _echo_to_self(url: str, **opts) -> DerpClient:
    """Connect and send a packet to our own key: it comes back through the relay."""
    got = threading.Event()
    key = PrivateKey.generate()
    c = DerpClient(url, key, on_packet=lambda src, data: got.set() if data == b"ping self" else None, **opts)
    c.connect()
    try:
        c.send_packet(key.public_key, b"ping self")
        assert got.wait(10), "packet to self did not come back"
    finally:
        c.close()
    return c


@pytest.mark.parametrize("scheme", ["https", "wss"])
def test_https_proxy_connect(tls_relay, monkeypatch, scheme, tmp_path):
    with ProxyProcess(tmp_path, names={NAME: "127.0.0.1"}) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        _echo_to_self(f"{scheme}://{NAME}:{tls_relay.port}", ssl_context=tls_relay.ssl_context())
        proxy.wait_for(r"CONNECT \S+ -> 200")  # (its output lines come through a pipe)
        assert proxy.targets() == [(f"{NAME}:{tls_relay.port}", 200)]


def test_http_proxy_for_a_plain_relay(tmp_path, monkeypatch):
    with OurRelay(workdir=str(tmp_path)) as r, ProxyProcess(tmp_path, names={NAME: "127.0.0.1"}) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # not used for http:// relays
        _echo_to_self(f"http://{NAME}:{r.port}")
        proxy.wait_for(r"CONNECT \S+ -> 200")
        assert proxy.targets() == [(f"{NAME}:{r.port}", 200)]


def test_proxy_authorization(tls_relay, monkeypatch, tmp_path):
    auth = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    with ProxyProcess(tmp_path, names={NAME: "127.0.0.1"}, auth=auth) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://alice:s3cret@127.0.0.1:{proxy.port}")
        _echo_to_self(f"https://{NAME}:{tls_relay.port}", ssl_context=tls_relay.ssl_context())
        monkeypatch.setenv("HTTPS_PROXY", f"http://alice:wrong@127.0.0.1:{proxy.port}")
        with pytest.raises(ConnectionRefusedError, match="407") as e:
            DerpClient(f"https://{NAME}:{tls_relay.port}", PrivateKey.generate(),
                       ssl_context=tls_relay.ssl_context()).connect()
        assert "wrong" not in str(e.value) and f"relay https://{NAME}" in str(e.value)
        proxy.wait_for(r"CONNECT \S+ -> 407")
        assert [status for _, status in proxy.targets()] == [200, 407]


def test_no_proxy_bypasses_the_proxy(tls_relay, monkeypatch, tmp_path):
    with ProxyProcess(tmp_path, names={NAME: "127.0.0.1"}) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "other.example, .test")
        # direct: the client resolves relay.test itself, which only the proxy could
        with pytest.raises(socket.gaierror):
            DerpClient(f"https://{NAME}:{tls_relay.port}", PrivateKey.generate(),
                       ssl_context=tls_relay.ssl_context(), connect_timeout=10).connect()
        assert proxy.connections == 0


def test_proxy_that_cannot_reach_the_relay(monkeypatch, tmp_path):
    with ProxyProcess(tmp_path) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        with pytest.raises(ConnectionRefusedError, match="502"):
            DerpClient("https://unknown.invalid:1", PrivateKey.generate()).connect()
        proxy.wait_for(r"CONNECT \S+ -> 502")
        assert proxy.targets() == [("unknown.invalid:1", 502)]
