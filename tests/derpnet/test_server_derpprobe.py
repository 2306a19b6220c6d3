"""Tailscale's own monitoring client, `derpprobe --once` (v1.102.3, built by interop/build.sh),
against our relay over TLS with a DERP map file: its TLS, STUN, mesh (single node) and
10 MB bandwidth probes must all report good. Marked `interop`: skipped without the binary,
required when DERPNET_REQUIRE_INTEROP=1."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess

import pytest

from tests.conftest import missing_go_peer
from tests.interop_peers import find_go_tool, free_port, make_test_ca
from tests.relays import OurRelay

pytestmark = pytest.mark.interop

DERPPROBE_MISSING = "Tailscale's derpprobe is not built: run interop/build.sh (needs Go)"
PROBE_LINE = re.compile(r"\b(good|bad): (\S+?):")


def derp_map(port: int, stun_port: int) -> dict:
    """One region with one node: our relay (TLS as "localhost" on 127.0.0.1) and its STUN port."""
    node = {"Name": "900a", "RegionID": 900, "HostName": "localhost", "IPv4": "127.0.0.1", "IPv6": "",
            "DERPPort": port, "STUNPort": stun_port}
    return {"Regions": {"900": {"RegionID": 900, "RegionCode": "dn", "RegionName": "derpnet test",
                                "Nodes": [node]}}}


def test_derpprobe_once_reports_every_probe_good(tmp_path):
    probe = find_go_tool("derpprobe")
    if probe is None:
        missing_go_peer(DERPPROBE_MISSING)
    # derpprobe's TLS probe calls a certificate expiring within 7 days bad: the test CA's
    # leaf lives 7 days, so that probe would fail on the certificate, not the relay.
    ca_file, make_leaf = make_test_ca(tmp_path / "pki", days=30)
    cert, key = make_leaf(["localhost", "127.0.0.1"])
    with OurRelay(cert=cert, key=key, hostname="localhost", workdir=str(tmp_path / "relay"),
                  stun_port=free_port(kind=socket.SOCK_DGRAM)) as relay:
        assert relay.stun_port is not None
        map_file = tmp_path / "derpmap.json"
        map_file.write_text(json.dumps(derp_map(relay.port, relay.stun_port)))
        env = dict(os.environ, SSL_CERT_FILE=ca_file)
        argv = [probe, "--once", f"--derp-map=file://{map_file}", "--spread=false",
                "--bw-interval=15s", "--bw-probe-size-bytes=10000000"]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        out = done.stdout + done.stderr
        results = PROBE_LINE.findall(out)
        kinds = {name.rsplit("/", 1)[-1] for _, name in results}
        assert done.returncode == 0 and results and all(v == "good" for v, _ in results), out[-3000:]
        assert {"tls", "udp", "mesh", "bw"} <= kinds, out[-3000:]
    stats = relay.output()
    assert "Traceback" not in stats, stats[-3000:]
