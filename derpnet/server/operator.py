"""The relay's operator options: access control, rate limits, metrics, graceful restarts.

Layer: relay server, the CLI's side of access.py, ratelimit.py, reload.py, metrics_http.py
and restart.py. `add_arguments` adds the flags (derper's names where derper has the
option), `configure` checks the files before the relay starts (a bad one: one error line
naming file and line), `Operator.start` binds the metrics listener and installs the
SIGHUP reload.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal

from .access import AccessControl
from .configfile import ConfigError
from .metrics_http import MetricsServer
from .reload import Policy, apply
from .restart import DEFAULT_DRAIN_TIMEOUT, DEFAULT_RECONNECT_IN, DEFAULT_TRY_FOR
from .server import RelayServer

__all__ = ["add_arguments", "configure", "Operator", "ConfigError"]

log = logging.getLogger(__name__)


def _go_bool(text: str) -> bool:
    """Go flag package booleans: --flag=false / --flag=true (and 0/1)."""
    v = text.strip().lower()
    if v in ("1", "t", "true", "yes"):
        return True
    if v in ("0", "f", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _seconds(text: str) -> float:
    try:
        v = float(text.rstrip("s"))
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, not {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The operator's flags (see the README, "Running a relay for others")."""
    g = parser.add_argument_group("running a relay for others")
    g.add_argument("--allow-clients", metavar="FILE",
                   help="admit only the public keys listed in FILE (one per line, any key form, # comments); "
                        "reloaded on SIGHUP, removed keys are disconnected")
    g.add_argument("--verify-client-url", metavar="URL",
                   help="ask this admission controller about every client, as derper does (POST "
                        '{"NodePublic","Source"}, admitted on 200 with {"Allow":true})')
    g.add_argument("--verify-client-url-fail-open", type=_go_bool, nargs="?", const=True, default=True,
                   metavar="BOOL", help="admit clients when the admission controller is unreachable "
                                        "(default true, as derper; --verify-client-url-fail-open=false to refuse)")
    g.add_argument("--rate-config", metavar="FILE",
                   help="per-client receive rate limits: derper's JSON (PerClientRateLimitBytesPerSec, "
                        "PerClientRateBurstBytes) plus PerKey overrides; reloaded on SIGHUP")
    g.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve /metrics (Prometheus) and /debug/ on this separate address (default: off)")
    g.add_argument("--restart-reconnect-in", type=_seconds, default=DEFAULT_RECONNECT_IN, metavar="SECONDS",
                   help="on SIGTERM, tell clients to reconnect after this long (default %(default)g)")
    g.add_argument("--restart-try-for", type=_seconds, default=DEFAULT_TRY_FOR, metavar="SECONDS",
                   help="... and to keep trying for this long (default %(default)g)")
    g.add_argument("--drain-timeout", type=_seconds, default=DEFAULT_DRAIN_TIMEOUT, metavar="SECONDS",
                   help="on SIGTERM, drain clients for at most this long before exiting (default %(default)g)")


class Operator:
    """What the operator flags set up for one RelayServer."""

    def __init__(self, args: argparse.Namespace, policy: Policy) -> None:
        self.args = args
        self.policy = policy
        self.metrics: MetricsServer | None = None
        self._signals: list[int] = []

    async def start(self, server: RelayServer, metrics_addr: tuple[str | None, int] | None) -> str | None:
        """Bind metrics on `metrics_addr` (if any) and install SIGHUP, on the running loop; the
        error line, if any."""
        if metrics_addr is not None:
            metrics = MetricsServer(server)
            try:
                await metrics.start(*metrics_addr)
            except OSError as e:
                why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
                return f"cannot serve metrics on {self.args.metrics_listen}: {why}"
            self.metrics = metrics
        if self.policy.reloadable:
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGHUP, self._reload, server)
                self._signals.append(signal.SIGHUP)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / not POSIX
                pass
        return None

    def _reload(self, server: RelayServer) -> None:
        log.info("relay: SIGHUP: reloading %s", " and ".join(p for p in (self.policy.allow_file,
                                                                         self.policy.rate_file) if p))
        self.policy.reload(server)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()


def configure(server: RelayServer, args: argparse.Namespace) -> Operator:
    """Load and check the operator's files and install them in `server` (raises ConfigError, or
    ValueError for a --verify-client-url that is not an HTTP URL)."""
    if args.verify_client_url:
        AccessControl.check_url(args.verify_client_url)
    policy = Policy(allow_file=args.allow_clients, rate_file=args.rate_config)
    loaded = policy.load()
    server.access = AccessControl(loaded.allowed, args.verify_client_url, args.verify_client_url_fail_open)
    if policy.reloadable:
        apply(server, loaded)
    return Operator(args, policy)
