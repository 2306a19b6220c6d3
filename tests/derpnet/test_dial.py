"""Reaching a relay (derpnet.dial), the parts without sockets: relay addresses and the
relay URL in error messages. (Dialling itself is tested through DerpClient, test_client.py.)"""

from __future__ import annotations

import errno
import socket
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpnet.dial import RelayAddress, parse_relay, with_relay_url
from derpnet.errors import AuthenticationError, HandshakeError, RemoteProtocolError, UpgradeError

URL = "https://relay.example:443"


# ---------------------------------------------------------------- relay addresses

@pytest.mark.parametrize("text,expected", [
    ("derp1.tailscale.com", RelayAddress("https", "derp1.tailscale.com", 443)),
    ("derp.example.com:8443", RelayAddress("https", "derp.example.com", 8443)),
    ("https://derp.example.com", RelayAddress("https", "derp.example.com", 443)),
    ("https://derp.example.com:444/derp", RelayAddress("https", "derp.example.com", 444)),
    ("http://127.0.0.1:3340", RelayAddress("http", "127.0.0.1", 3340)),
    ("HTTP://127.0.0.1:3340/", RelayAddress("http", "127.0.0.1", 3340)),
    ("http://[::1]:3340", RelayAddress("http", "::1", 3340)),
    ("::1", RelayAddress("https", "::1", 443)),
    ("wss://derp.example.com", RelayAddress("https", "derp.example.com", 443, websocket=True)),
    ("ws://127.0.0.1:3340/derp", RelayAddress("http", "127.0.0.1", 3340, websocket=True)),
])
def test_parse_relay(text, expected):
    assert parse_relay(text) == expected


@pytest.mark.parametrize("text", ["", "ftp://x", "wss://x/other", "https://x/other", "https://x/derp?q=1",
                                  "https://u:p@x", "https://x:99999"])
def test_parse_relay_rejects(text):
    with pytest.raises(ValueError):
        parse_relay(text)


def test_host_header_and_url():
    assert parse_relay("wss://derp.example.com").url == "wss://derp.example.com:443"
    assert parse_relay("ws://h:1").url == "ws://h:1"
    assert parse_relay("derp.example.com").host_header == "derp.example.com"
    assert parse_relay("https://derp.example.com:8443").host_header == "derp.example.com:8443"
    assert parse_relay("http://[::1]:80").host_header == "[::1]"
    assert parse_relay("http://[::1]:3340").url == "http://[::1]:3340"


@pytest.mark.parametrize("host, is_ip", [("1.2.3.4", True), ("::1", True), ("fe80::1", True),
                                         ("relay.example", False), ("1.2.3", False)])
def test_is_ip(host, is_ip):
    assert RelayAddress("https", host, 443).is_ip is is_ip


def test_tls_follows_the_scheme_and_str_is_the_url():
    assert parse_relay("relay.example").tls and not parse_relay("http://relay.example").tls
    assert str(parse_relay("http://[::1]:3340")) == "http://[::1]:3340"
    assert parse_relay("http://relay.example").port == 80


def test_relay_address_passes_through_and_other_types_are_refused():
    addr = RelayAddress("http", "h", 1)
    assert parse_relay(addr) is addr
    with pytest.raises(TypeError):
        parse_relay(443)  # type: ignore[arg-type]


_HOSTS = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True),
    st.ip_addresses().map(str),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["http", "https"]), _HOSTS, st.integers(1, 65535))
def test_url_round_trips(scheme, host, port):
    addr = RelayAddress(scheme, host, port)
    assert parse_relay(addr.url) == addr
    assert parse_relay(addr.url + "/derp") == addr
    default = 443 if scheme == "https" else 80
    assert (":" + str(port) in addr.host_header) == (port != default)


# ---------------------------------------------------------------- the relay URL in errors

def test_os_errors_keep_type_and_errno():
    e = with_relay_url(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), URL)
    assert type(e) is ConnectionRefusedError and e.errno == errno.ECONNREFUSED
    assert str(e) == f"[Errno {errno.ECONNREFUSED}] relay {URL}: Connection refused"


def test_timeout_and_abort_messages():
    e = with_relay_url(TimeoutError(errno.ETIMEDOUT, "timed out after 0.3s in the DERP handshake"), URL)
    assert type(e) is TimeoutError and "relay https://relay.example:443: timed out after 0.3s" in str(e)
    e = with_relay_url(ConnectionAbortedError(errno.ECONNABORTED, "connect aborted (client closed)"), URL)
    assert type(e) is ConnectionAbortedError and URL in str(e)


def test_gaierror_keeps_its_type():
    e = with_relay_url(socket.gaierror(socket.EAI_NONAME, "cannot resolve 'x'"), URL)
    assert isinstance(e, socket.gaierror) and e.errno == socket.EAI_NONAME and URL in str(e)


def test_os_error_without_errno():
    e = with_relay_url(OSError("weird"), URL)
    assert type(e) is OSError and str(e) == f"relay {URL}: weird"


def test_certificate_errors_keep_their_verify_fields():
    orig = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    orig.verify_code = 18
    orig.verify_message = "self-signed certificate"
    orig.reason = "CERTIFICATE_VERIFY_FAILED"
    e = with_relay_url(orig, URL)
    assert isinstance(e, ssl.SSLCertVerificationError)
    assert e.verify_code == 18 and e.verify_message == "self-signed certificate"
    assert "certificate verify failed: self-signed certificate (CERTIFICATE_VERIFY_FAILED)" in str(e)


def test_upgrade_error_keeps_its_status():
    e = with_relay_url(UpgradeError("relay answered HTTP 404", status=404), URL)
    assert type(e) is UpgradeError and e.status == 404 and str(e) == f"relay {URL}: relay answered HTTP 404"


@pytest.mark.parametrize("cls", [HandshakeError, RemoteProtocolError, AuthenticationError])
def test_derp_errors_keep_their_type(cls):
    """No conversion: a handshake failure is a HandshakeError because the connection raised one."""
    e = with_relay_url(cls("box does not open"), URL)
    assert type(e) is cls and str(e) == f"relay {URL}: box does not open"


def test_other_exceptions_pass_through():
    orig = KeyError("x")
    assert with_relay_url(orig, URL) is orig
