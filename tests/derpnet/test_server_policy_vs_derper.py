"""Access control and rate limits with derper's own options, on our relay and on Tailscale's
Go derper side by side: the same admission-controller request, the same verdicts, and the
same rate-config file holding a client to the same rate. The derper runs are `interop`."""

from __future__ import annotations

import contextlib
import json
import time

import pytest

from derpnet.errors import HandshakeError
from derpnet.keys import PrivateKey
from tests.conftest import missing_go_peer
from tests.derpnet.test_server_access import Controller
from tests.derpnet.test_server_metrics import PAYLOAD, Flood, Meter
from tests.interop_peers import GoDerper, derper_path, skip_reason
from tests.rawderp import RawDerpClient, wait_until
from tests.relays import OurRelay

KINDS = ["ours", pytest.param("go", marks=pytest.mark.interop)]


@contextlib.contextmanager
def relay_with(kind: str, tmp_path, options: dict[str, str]):
    """The URL of a relay of `kind` started with derper-named `options` (name -> value)."""
    if kind == "ours":
        with OurRelay(workdir=str(tmp_path), extra_args=[f"--{k}={v}" for k, v in options.items()]) as r:
            yield r.url
        return
    if derper_path() is None:
        missing_go_peer(skip_reason("derper"))
    with GoDerper(tmp_path, extra_args=[f"-{k}={v}" for k, v in options.items()]) as d:
        yield d.url


@pytest.fixture
def controller():
    c = Controller()
    yield c
    c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_admission_controller_sees_the_same_request_and_verdicts(kind, tmp_path, controller):
    yes, no = PrivateKey.generate(), PrivateKey.generate()
    controller.verdicts = {str(yes.public_key): {"Allow": True}, str(no.public_key): {"Allow": False}}
    with relay_with(kind, tmp_path, {"verify-client-url": controller.url}) as url:
        with RawDerpClient(url, yes) as a:
            a.send(yes.public_key, b"admitted")
            assert a.recv_packet().data == b"admitted"
        # derper closes without a word; ours says why first: either way no ServerInfo.
        with pytest.raises((HandshakeError, ConnectionError)):
            RawDerpClient(url, no, timeout=10)
        assert controller.requests == [{"NodePublic": str(yes.public_key), "Source": "127.0.0.1"},
                                       {"NodePublic": str(no.public_key), "Source": "127.0.0.1"}]


LIMIT = 1_000_000


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_rate_config_holds_a_client_to_the_same_rate(kind, tmp_path):
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"PerClientRateLimitBytesPerSec": LIMIT, "PerClientRateBurstBytes": 0}))
    with relay_with(kind, tmp_path / "relay", {"rate-config": str(rates)}) as url:
        meter = Meter(url)
        assert meter.client.public_key is not None
        flood = Flood(url, PrivateKey.generate(), meter.client.public_key)
        try:
            t0 = time.monotonic()
            flood.thread.start()
            start, end = t0 + 1.0, t0 + 5.0
            wait_until(lambda: meter.times and meter.times[-1][0] > end, timeout=30,
                       what="traffic past the measuring window")
            rate = meter.rate(start, end)
            # derper charges each frame's length (32 + payload, not the 5-byte header); we charge
            # the bytes read (37 + payload): 0.05 % apart here.
            expected = LIMIT * PAYLOAD / (PAYLOAD + 32)
            print(f"{kind}: {rate / 1e6:.3f} MB/s held to {expected / 1e6:.3f}")
            assert abs(rate - expected) <= 0.10 * expected, (rate, expected)
            assert flood.thread.is_alive()  # slowed, never cut
        finally:
            flood.close()
            meter.client.close()
