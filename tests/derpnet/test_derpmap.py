"""derpnet.derpmap: the shipped snapshot, parsing/validation, and --derp resolution."""

from __future__ import annotations

import json

import pytest

from derpnet import derpmap
from derpnet.derpmap import DerpMapError, parse, resolve


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_snapshot_is_a_valid_default_map():
    m = derpmap.snapshot()
    assert len(m) >= 20
    nyc = m.region("nyc")
    assert nyc is not None and nyc.region_id == 1 and nyc.name == "New York City"
    assert m.region(1) is nyc and m.region("1") is nyc and m.region("NYC") is nyc
    for r in m:
        assert r.code and r.name and r.derp_nodes(), r
        for n in r.nodes:
            assert n.region_id == r.region_id
            assert n.host_name.endswith(".tailscale.com")
    # round trip keeps the wire shape
    again = parse(m.to_json())
    assert again.raw == m.raw


def test_load_prefers_a_valid_user_copy(tmp_path):
    assert derpmap.load().source == "built-in snapshot"
    lab = {"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "RegionName": "Lab",
                               "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1",
                                          "DERPPort": 3340}]}}}
    src = tmp_path / "lab.json"
    src.write_text(json.dumps(lab))
    m, path = derpmap.refresh(str(src))
    assert path == derpmap.user_cache_path()
    assert derpmap.load().region("lab").nodes[0].port == 3340
    path.write_text("{broken")
    assert derpmap.load().source == "built-in snapshot"  # a damaged cache never breaks resolution
    with pytest.raises(DerpMapError):
        derpmap.load(path)  # ... but an explicitly named file does


@pytest.mark.parametrize("doc, msg", [
    ("[]", "expected a JSON object"),
    ("{}", "Regions"),
    ('{"Regions": {"x": {}}}', "decimal"),
    ('{"Regions": {"1": {"RegionID": 2}}}', "does not match"),
    ('{"Regions": {"1": {"RegionID": 1, "Nodes": [{"Name": "a"}]}}}', "HostName"),
    ('{"Regions": {"1": {"RegionID": 1, "Nodes": [{"HostName": "h", "DERPPort": 70000}]}}}', "out of range"),
    ('{"Regions": {"1": {"RegionID": "1"}}}', "must be int"),
    ("not json", "not JSON"),
])
def test_parse_rejects(doc, msg):
    with pytest.raises(DerpMapError, match=msg):
        parse(doc)


def test_parse_ignores_deleted_regions_and_unknown_fields():
    m = parse('{"Regions": {"1": null, "2": {"RegionID": 2, "RegionCode": "b", "Extra": 1, '
              '"Nodes": [{"HostName": "h", "STUNOnly": true}, {"HostName": "d"}]}}, "HomeParams": {}}')
    assert list(m.regions) == [2]
    assert [n.host_name for n in m.region("b").derp_nodes()] == ["d"]


def test_resolve_forms():
    m = derpmap.snapshot()
    t = resolve("nyc", m)
    assert t.region.region_id == 1 and t.host == "derp1f.tailscale.com" and len(t.hosts) >= 2
    assert resolve("1", m).hosts == t.hosts
    assert resolve("derp1f.tailscale.com", m).hosts == ("derp1f.tailscale.com",)
    assert resolve("localhost", m).hosts == ("localhost",)
    assert resolve("relay.example:8443").hosts == ("https://relay.example:8443",)
    assert resolve("relay.example:443").hosts == ("relay.example",)
    assert resolve("https://relay.example:8443/").hosts == ("https://relay.example:8443",)
    assert resolve("http://127.0.0.1:3340").hosts == ("http://127.0.0.1:3340",)
    assert resolve("[::1]:8443").hosts == ("https://[::1]:8443",)
    lab = parse('{"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", '
                '"Nodes": [{"HostName": "127.0.0.1", "DERPPort": 8443, "InsecureForTests": true}]}}}')
    t = resolve("lab", lab)
    assert t.hosts == ("https://127.0.0.1:8443",) and t.insecure


@pytest.mark.parametrize("spec, msg", [
    ("", "empty"),
    ("atlantis", "unknown region code"),
    ("4242", "unknown region id"),
    ("ftp://x.example", "scheme"),
    ("https://x.example/derp?x=1", "scheme://host"),
    ("host.example:99999", "bad port"),
    ("ho st.example", "not a valid host name"),
])
def test_resolve_rejects(spec, msg):
    with pytest.raises(DerpMapError, match=msg):
        resolve(spec, derpmap.snapshot())


# ---------------------------------------------------------------- InsecureForTests (issue 9, item 12)

_TWO_NODES = ('{"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "Nodes": ['
              '{"Name": "900a", "HostName": "127.0.0.1", "DERPPort": 8443, "InsecureForTests": true},'
              '{"Name": "900b", "HostName": "relay.example"}]}}}')


def test_insecure_for_tests_is_scoped_to_its_node():
    t = resolve("lab", parse(_TWO_NODES))
    assert t.hosts == ("https://127.0.0.1:8443", "relay.example")
    assert t.insecure_hosts == frozenset({"https://127.0.0.1:8443"}) and t.insecure


def test_cli_tls_options_per_host(tmp_path):
    """The CLI's TLS options: only the InsecureForTests node goes unchecked, and an explicit
    --derp-ca is used for every node, that one included."""
    import argparse
    import ssl

    from derpnet.cmd.common import relay_ssl_for
    from tests.interop_peers import make_test_ca

    t = resolve("lab", parse(_TWO_NODES))
    for_host = relay_ssl_for(argparse.Namespace(derp_ca=None), t)
    ctx = for_host("https://127.0.0.1:8443")["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert for_host("relay.example") == {}  # the library's default verification
    ca_file, _ = make_test_ca(tmp_path / "pki")
    for_host = relay_ssl_for(argparse.Namespace(derp_ca=ca_file), t)
    for host in t.hosts:
        ctx = for_host(host)["ssl_context"]
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname, host


def test_probe_with_an_explicit_ca_ignores_insecure_for_tests(tmp_path):
    """regions --probe --derp-ca: the given CA is checked even for an InsecureForTests node."""
    import ssl

    from tests.relays import OurRelay

    with OurRelay(tls=True) as relay:
        node = derpmap.DerpNode(name="x", region_id=900, host_name="127.0.0.1", derp_port=relay.port,
                                insecure_for_tests=True)
        assert derpmap.probe_node(node, samples=1, timeout=5) > 0  # no CA given: unchecked, as marked
        other_ca = ssl.create_default_context()  # the system roots: do not know the test CA
        with pytest.raises(ssl.SSLCertVerificationError):
            derpmap.probe_node(node, samples=1, timeout=5, ssl_context=other_ca)
        assert derpmap.probe_node(node, samples=1, timeout=5, ssl_context=relay.ssl_context()) > 0


def test_refresh_over_plain_http_needs_insecure(tmp_path):
    with pytest.raises(DerpMapError, match="plain http"):
        derpmap.refresh("http://127.0.0.1:9/derpmap.json", dest=tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


def test_probe_is_bounded_even_by_a_name_lookup_that_never_returns(monkeypatch, tmp_path):
    """getaddrinfo() has no timeout (offline, a lookup took 5-10 s each): probe() must return
    within its timeout anyway, the hung regions reported as timed out (issue 11, item 12).
    The lookup is the only thing replaced: it blocks until the test ends."""
    import socket
    import threading
    import time

    release = threading.Event()
    real = socket.getaddrinfo

    def hung(host, *args, **kwargs):
        if str(host).endswith(".hang.test"):
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    regions = {str(900 + i): {"RegionID": 900 + i, "RegionCode": f"h{i}", "RegionName": f"Hang {i}",
                              "Nodes": [{"Name": f"{900 + i}{n}", "RegionID": 900 + i,
                                         "HostName": f"{n}.r{i}.hang.test", "DERPPort": 4443} for n in "ab"]}
               for i in range(40)}
    m = parse(json.dumps({"Regions": regions}))
    try:
        t0 = time.monotonic()
        results = derpmap.probe(m, samples=3, timeout=0.5)
        took = time.monotonic() - t0
    finally:
        release.set()
    assert took < 1.5, took
    assert len(results) == 40 and all(r.latency is None and r.error == "timed out" for r in results)
