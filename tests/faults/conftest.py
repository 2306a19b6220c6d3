"""Fixtures of the fault tests: relays that can be restarted, fault proxies, figures.

`relay` is parametrised over our relay ("ours") and Tailscale's Go derper ("go",
marked interop: skipped with a reason when it is not built, required in CI). Both are
plain HTTP on loopback, module-scoped, and come back on the same port with the same key
after `relay.restart()`.

Figures (throughput, outages) are printed as they are measured (visible with `-s`),
attached to the test report (`record_property`, in --junitxml) and listed again in a
"fault figures" section at the end of the run.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import missing_go_peer
from tests.faults.harness import relay_of
from tests.faults.proxy import FaultProxy

_FIGURES: list = []

RELAY_KINDS = ["ours", pytest.param("go", marks=pytest.mark.interop)]


def _threads(*prefixes: str) -> list:
    return [t for t in threading.enumerate() if t.name.startswith(prefixes)]


def assert_no_threads(*prefixes: str, timeout: float = 10.0) -> None:
    """Every thread named with one of `prefixes` ends within `timeout` (joined, not slept on)."""
    deadline = time.monotonic() + timeout
    for t in _threads(*prefixes):
        t.join(max(0.0, deadline - time.monotonic()))
    left = _threads(*prefixes)
    assert not left, f"threads left running: {left}"


def start_relay(kind: str, workdir):
    """relay_of() for a fixture: skips (or fails in CI) when the Go derper is missing."""
    if kind == "go":
        from tests.interop_peers import DERPER_MISSING, derper_path
        if not derper_path():
            missing_go_peer(DERPER_MISSING)
    return relay_of(kind, workdir)


@pytest.fixture(scope="module", params=RELAY_KINDS)
def relay(request, tmp_path_factory):
    with start_relay(request.param, tmp_path_factory.mktemp(f"relay-{request.param}")) as r:
        r.kind = request.param
        yield r


@pytest.fixture
def our_relay(tmp_path):
    """A fresh relay of ours for this test alone (memory measurements)."""
    with start_relay("ours", tmp_path / "relay") as r:
        r.kind = "ours"
        yield r


@pytest.fixture
def proxies(relay):
    """Two FaultProxies in front of `relay` (for sides a and b); at the end: closed, their
    threads gone, and no frame was ever re-emitted inexactly."""
    made = [FaultProxy(relay.port), FaultProxy(relay.port)]
    try:
        yield made
    finally:
        for p in made:
            p.close()
    for p in made:
        assert p.errors == [], p.errors
    assert_no_threads("faultproxy-")


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    yield
    assert_no_threads("derpquic-", "derpnet-reader-", "faultproxy-", "faults-")


@pytest.fixture
def figures(request, record_property):
    """figures(name, text, **values): print a measured figure and keep it for the summary."""
    def note(text: str, **values) -> None:
        line = f"{request.node.name}: {text}"
        print(f"\n[fault figures] {line}")
        _FIGURES.append(line)
        for k, v in values.items():
            record_property(k, v)
    return note


def pytest_terminal_summary(terminalreporter) -> None:
    if _FIGURES:
        terminalreporter.section("fault figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
