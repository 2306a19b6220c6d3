"""pytest plugin: how many tests run without sockets, threads or subprocesses ("pure" tests).

Not part of the normal run; load it explicitly:

    python -m pytest -p tests.tools.pure_count [--pure-list=FILE] tests/derpnet tests/derpquic

(or, for another checkout that lacks this file: PYTHONPATH=/path/to/tests/tools
python -m pytest -p pure_count ...). It records, never fails: a socket created
(`socket.socket.__init__`, which also covers create_connection, socketpair and asyncio),
a thread started (`threading.Thread.start`) or a subprocess spawned (`subprocess.Popen`)
while a test's fixtures are set up, while it runs or while it is torn down. A test also
counts as using what the fixtures it requested used when they were set up (a relay made
once per module is charged to every test of the module). At the end it prints how many of
the tests that ran (not skipped) used none.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

KINDS = ("socket", "thread", "subprocess")


class _Recorder:
    def __init__(self) -> None:
        self.used: set[str] = set()
        self._originals: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        rec = self

        def patch(owner: Any, name: str, kind: str) -> None:
            original = getattr(owner, name)

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                rec.used.add(kind)
                return original(*args, **kwargs)

            self._originals.append((owner, name, original))
            setattr(owner, name, wrapper)

        patch(socket.socket, "__init__", "socket")
        patch(threading.Thread, "start", "thread")
        patch(subprocess.Popen, "__init__", "subprocess")

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals.clear()

    def take(self) -> set[str]:
        used, self.used = self.used, set()
        return used


class PureCount:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.rec = _Recorder()
        self.fixture_use: dict[int, set[str]] = {}  # id(FixtureDef) -> what its last setup used
        self.item_use: dict[str, set[str]] = {}
        self.ran: set[str] = set()
        self.skipped: set[str] = set()

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: Any) -> Generator[None, Any, Any]:
        outer = self.rec.take()  # what the test used so far, set aside
        try:
            return (yield)
        finally:
            used = self.rec.take()
            self.fixture_use[id(fixturedef)] = used
            self.rec.used = outer | used

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: Any) -> Generator[None, Any, Any]:
        self.rec.take()
        try:
            return (yield)
        finally:
            used = self.rec.take()
            info = getattr(item, "_fixtureinfo", None)
            for defs in getattr(info, "name2fixturedefs", {}).values():
                for fixturedef in defs:
                    used |= self.fixture_use.get(id(fixturedef), set())
            self.item_use[item.nodeid] = used

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            self.ran.add(report.nodeid)
        elif report.skipped:
            self.skipped.add(report.nodeid)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        ran = sorted(self.ran)
        pure = [n for n in ran if not self.item_use.get(n)]
        counts = {k: sum(1 for n in ran if k in self.item_use.get(n, set())) for k in KINDS}
        no_sock_thread = [n for n in ran if not ({"socket", "thread"} & self.item_use.get(n, set()))]
        tr = terminalreporter
        tr.section("pure tests (tests/tools/pure_count.py)")
        tr.write_line(f"ran: {len(ran)} (skipped: {len(self.skipped - self.ran)})")
        tr.write_line(f"without sockets or threads: {len(no_sock_thread)}")
        tr.write_line(f"without sockets, threads or subprocesses: {len(pure)}")
        tr.write_line("using: " + ", ".join(f"{k} {counts[k]}" for k in KINDS))
        out = self.config.getoption("pure_list")
        if out:
            lines = [f"{'pure' if n in pure else ','.join(sorted(self.item_use[n]))}\t{n}" for n in ran]
            Path(out).write_text("\n".join(lines) + "\n")
            tr.write_line(f"per-test list: {out}")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--pure-list", dest="pure_list", metavar="FILE", default=None,
                     help="pure_count: write one line per test run: 'pure' or what it used, then its id")


def pytest_configure(config: pytest.Config) -> None:
    plugin = PureCount(config)
    plugin.rec.install()
    config.pluginmanager.register(plugin, "pure_count_plugin")
    config.add_cleanup(plugin.rec.uninstall)
