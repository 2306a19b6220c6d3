"""The relays named by --derp: one (a host, a URL, or a region whose nodes are tried in
turn at start), or several (a comma-separated list, or --derp repeated), which serve and
join then use all at once through one multi-relay PacketConn (see derpnet.relayset)."""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import derpmap
from ..errors import DerpError
from .common import (
    EXIT_FAILURE,
    Stopper,
    UsageError,
    UserError,
    describe_error,
    relay_ssl_for,
    relay_target,
    run_bounded,
)
from .session import connect_relay

log = logging.getLogger("derpnet.cmd")

T = TypeVar("T")


class DerpAction(argparse.Action):
    """--derp: every occurrence adds its comma-separated relays to the list (the first one
    replaces the default from DERPNET_DERP). The value stays one comma-separated string."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        given = getattr(namespace, "_derp_given", False)
        current = getattr(namespace, self.dest, None) if given else None
        new = str(values)
        setattr(namespace, self.dest, f"{current},{new}" if current else new)
        namespace._derp_given = True


def split_specs(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (duplicates dropped, order kept)."""
    return list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))


@dataclass(frozen=True)
class Relays:
    """The relay targets of one command and their TLS settings."""

    spec: str
    targets: tuple[derpmap.RelayTarget, ...]
    ssl_for: tuple[Callable[[str], dict[str, Any]], ...]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Relays:
        specs = split_specs(getattr(args, "derp", None) or "")
        if len(specs) <= 1:
            one = argparse.Namespace(**{**vars(args), "derp": specs[0] if specs else None})
            target = relay_target(one)  # also the error for a missing --derp
            return cls(one.derp, (target,), (relay_ssl_for(args, target),))
        targets = []
        for spec in specs:
            one = argparse.Namespace(**{**vars(args), "derp": spec})
            targets.append(relay_target(one))
        return cls(",".join(specs), tuple(targets), tuple(relay_ssl_for(args, t) for t in targets))

    @property
    def several(self) -> bool:
        return len(self.targets) > 1

    def hosts(self) -> list[str]:
        """Several relays: the first node of each target (a region in a list stands for its
        first node; the link to it reconnects by itself while the others carry the traffic)."""
        return [t.host for t in self.targets]

    def ssl_options(self) -> dict[str, Any]:
        """The TLS options shared by every relay of the list (one PacketConn takes one set)."""
        options = [f(t.host) for f, t in zip(self.ssl_for, self.targets, strict=True)]
        if any(o != options[0] for o in options[1:]):
            raise UsageError("--derp: relays that need different TLS settings (InsecureForTests map "
                             "nodes next to others) cannot be combined in one list")
        return options[0]

    def connect(self, factory: Callable[[Any, dict[str, Any]], T], timeout: float, stop: Stopper) -> tuple[T, str]:
        """factory(host or [hosts], tls options) within `timeout`: (result, what to show).
        One relay: its nodes in turn, as before. Several: all at once; it starts when one
        answers and keeps trying the others in the background."""
        if not self.several:
            target, ssl_for = self.targets[0], self.ssl_for[0]
            return connect_relay(target, lambda h: factory(h, ssl_for(h)), timeout, stop)
        hosts, ssl = self.hosts(), self.ssl_options()
        log.debug("connecting to relays %s", ", ".join(hosts))
        try:
            result = run_bounded(functools.partial(factory, hosts, ssl), timeout, f"relays {', '.join(hosts)}", stop)
        except UserError:
            raise UserError(f"cannot connect: none of the relays {', '.join(hosts)} answered within {timeout:g} s",
                            EXIT_FAILURE) from None
        except (OSError, ValueError, DerpError) as e:
            raise UserError(f"cannot connect to any relay: {describe_error(e)}", EXIT_FAILURE) from None
        return result, ", ".join(hosts)

    def shown(self, connected_host: str) -> str:
        """The --derp value for the join line serve prints."""
        if not self.several and self.targets[0].region is not None:
            return connected_host
        return self.spec
