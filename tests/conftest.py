"""Shared fixtures: real relays on loopback (ours, and Tailscale's Go derper where built).

Interop tests are marked `interop`. They skip with a reason when the Go peers are
missing, unless DERPNET_REQUIRE_INTEROP=1 (set by .ci/run), where a missing peer fails.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

import pytest

REQUIRE_INTEROP = os.environ.get("DERPNET_REQUIRE_INTEROP") == "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the long variants (also DERPNET_SLOW=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if config.getoption("--run-slow") or os.environ.get("DERPNET_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="long variant: run with --run-slow or DERPNET_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def missing_go_peer(reason: str) -> None:
    """Skip (locally) or fail (in CI, where interop is required) for a missing Go peer."""
    if REQUIRE_INTEROP:
        pytest.fail(f"interop required (DERPNET_REQUIRE_INTEROP=1) but {reason}")
    pytest.skip(reason)


@dataclass
class Relay:
    """How to reach a running relay: pass `url` and `ssl_context` to listen_packet()."""

    kind: str  # "ours" or "go"
    url: str
    ssl_context: ssl.SSLContext | None = None
    process: object = None  # the handle that owns the process (for fault tests)
