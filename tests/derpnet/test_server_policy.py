"""The relay's operator policies, sans-IO: the rate limiter, the rate config, the allow
list, their errors (with line numbers), the metrics text and the client's retry pacing
after a Restarting frame. Time is an argument everywhere."""

from __future__ import annotations

import json
import re

import pytest

from derpnet.keys import PrivateKey
from derpnet.relaylink import RESTART_RETRY_STEP, backoff_delay, retry_delay
from derpnet.server.access import parse_allow_list
from derpnet.server.configfile import ConfigError
from derpnet.server.metrics import render
from derpnet.server.ratelimit import MIN_BURST, ReadLimiter, parse_rate_config

K1, K2 = PrivateKey.generate().public_key, PrivateKey.generate().public_key


# ---------------------------------------------------------------- ReadLimiter

def test_limiter_lets_the_burst_through_then_holds_the_rate():
    lim = ReadLimiter(rate=100_000, burst=200_000, now=0.0)
    assert lim.charge(200_000, 0.0) == 0.0  # the whole burst at once
    assert lim.charge(50_000, 0.0) == pytest.approx(0.5)  # in debt: wait until it is paid
    assert lim.waits == 1
    # Reads that come exactly when allowed keep the client at the rate, never faster.
    t, sent = 0.5, 0
    for _ in range(100):
        d = lim.charge(10_000, t)
        sent += 10_000
        t += d
    assert t == pytest.approx(0.5 + 100 * 0.1)  # each 10 kB read costs 0.1 s: 100 kB/s exactly
    assert lim.waits == 101 and lim.waited == pytest.approx(10.5)


def test_limiter_refills_only_up_to_the_burst():
    lim = ReadLimiter(rate=1000, burst=MIN_BURST, now=0.0)
    assert lim.charge(MIN_BURST, 0.0) == 0.0
    # An hour idle saves up one burst, not an hour's worth.
    assert lim.charge(MIN_BURST, 3600.0) == 0.0
    assert lim.charge(1000, 3600.0) == pytest.approx(1.0)


def test_limiter_burst_is_at_least_one_whole_packet_as_derper():
    assert ReadLimiter(rate=10, burst=1, now=0.0).burst == 65536 + 32
    with pytest.raises(ValueError):
        ReadLimiter(rate=0, burst=1, now=0.0)


# ---------------------------------------------------------------- rate config

def test_derper_rate_config_and_per_key_overrides():
    text = json.dumps({"PerClientRateLimitBytesPerSec": 1_000_000, "PerClientRateBurstBytes": 10,
                       "PerKey": {str(K1): {"PerClientRateLimitBytesPerSec": 0},
                                  K2.b64(): {"PerClientRateLimitBytesPerSec": 5000,
                                             "PerClientRateBurstBytes": 1 << 20}}}, indent=1)
    rc = parse_rate_config(text)
    assert rc.default.rate == 1_000_000 and rc.default.burst == MIN_BURST  # raised as derper does
    assert rc.limit_for(K1).rate is None  # unlimited by override
    assert (rc.limit_for(K2).rate, rc.limit_for(K2).burst) == (5000, 1 << 20)
    assert rc.limit_for(PrivateKey.generate().public_key) == rc.default
    assert parse_rate_config("{}").default.rate is None
    assert parse_rate_config('{"PerClientRateLimitBytesPerSec": 0}').limit_for(K1).limiter(0.0) is None


@pytest.mark.parametrize("text, line, words", [
    ('{\n  "PerClientRateLimitBytesPerSec": 10,\n  oops\n}', 3, "not valid JSON"),
    ('{\n  "PerClientRateLimitBytesPerSec": -5\n}', 2, "must be a number >= 0"),
    ('{\n  "PerClientRateLimitBytesPerSec": 10,\n  "PerClientRateBurst": 5\n}', 3, "unknown field"),
    ('{\n "PerKey": {\n  "nodekey:1234": {}\n }\n}', 3, "nodekey: expected 64 hex"),
    ('{\n "PerKey": {\n  "' + str(K1) + '": {\n   "PerClientRateLimitBytesPerSec": "fast"\n  }\n }\n}', 4, ">= 0"),
    ('[1, 2]', 1, "a JSON object"),
])
def test_bad_rate_config_names_its_line(text, line, words):
    with pytest.raises(ConfigError) as e:
        parse_rate_config(text, "rates.json")
    assert e.value.line == line, str(e.value)
    assert str(e.value).startswith(f"rates.json, line {line}: ") and words in str(e.value)


# ---------------------------------------------------------------- allow list

def test_allow_list_takes_every_key_form_and_comments():
    k3 = PrivateKey.generate().public_key
    text = f"# the team\n\n{K1}\n  {K2.hex()}   # bob's laptop\n{k3.b64()}\n"
    assert parse_allow_list(text) == {K1, K2, k3}
    assert parse_allow_list("# nobody\n") == frozenset()


def test_bad_allow_list_names_its_line_and_never_echoes_the_text():
    secret = PrivateKey.generate().to_text()  # privkey:... pasted by mistake
    with pytest.raises(ConfigError) as e:
        parse_allow_list(f"{K1}\n# fine\n{secret}\n", "allow.txt")
    assert e.value.line == 3 and str(e.value).startswith("allow.txt, line 3: ")
    assert secret[8:] not in str(e.value)
    with pytest.raises(ConfigError, match=r"line 2: nodekey: expected 64 hex"):
        parse_allow_list(f"{K1}\nnodekey:abcd\n")


# ---------------------------------------------------------------- metrics text

def test_metrics_text_is_prometheus_and_carries_no_keys():
    stats = {"clients": 2, "clients_total": 7, "packets_forwarded": 12345678901, "bytes_forwarded": 3,
             "dropped": {"unknown_dest": 4, "queue_head": 0}, "access": {"refused": {"not_allowed": 3}},
             "handshake_timeouts": 1, "peer_gone_sent": {"disconnected": 1, "not_here": 2}}
    text = render(stats, {"resident_memory_bytes": 50_000_000.0}, {"derp_queue_depth_max": 5.0})
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) [a-z_]+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples["derp_current_connections"] == 2
    assert samples["derp_packets_forwarded_total"] == 12345678901  # no rounding of big counters
    assert "12345678901" in text
    assert samples['derp_packets_dropped_total{reason="unknown_dest"}'] == 4
    assert samples['derp_handshakes_total{outcome="admitted"}'] == 7
    assert samples['derp_handshakes_total{outcome="refused"}'] == 3
    assert samples['derp_refused_clients_total{reason="not_allowed"}'] == 3
    assert samples["process_resident_memory_bytes"] == 50_000_000
    assert samples["derp_queue_depth_max"] == 5
    assert not re.search(r"[0-9a-f]{64}", text)


# ---------------------------------------------------------------- the client's retries

def test_retries_are_quick_while_the_relays_try_for_lasts():
    rng = lambda: 0.999  # noqa: E731 - the longest jitter
    assert backoff_delay(8, rng) > RESTART_RETRY_STEP
    assert retry_delay(8, now=5.0, try_until=10.0, rng=rng) == RESTART_RETRY_STEP
    assert retry_delay(2, now=5.0, try_until=10.0, rng=rng) == backoff_delay(2, rng)  # already quicker
    assert retry_delay(8, now=10.0, try_until=10.0, rng=rng) == backoff_delay(8, rng)  # window over
