"""Relays inside a Lab's internet namespace: ours (tests.relays.OurRelay) and Tailscale's Go
`derper` (tests.interop_peers.GoDerper), started through `ip netns exec`, listening on
lab.relay_ip, and stopped at the lab's teardown (or earlier by the test).

    relay = start_our_relay(lab)                          # http://198.18.0.1:3340
    relay = start_our_relay(lab, tls=True)                # https://198.18.0.1:443, relay.ca_file
    relay = start_our_relay(lab, stun_port=3478)          # OurRelay's own arguments pass through
    derper = start_go_derper(lab)                         # http://198.18.0.1:3340, STUN on 3478

With TLS the certificate comes from a fresh test CA (tests.interop_peers.make_test_ca) and
names the relay's IP address, so the Go derpconnect (`--derp=198.18.0.1`, which always
dials HOST:443 over TLS) accepts it with SSL_CERT_FILE=relay.ca_file (`go_client_env`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.interop_peers import GoDerper, derper_path, skip_reason
from tests.lab.netns import Lab
from tests.relays import OurRelay

__all__ = ["start_our_relay", "start_go_derper", "require_go_derper", "go_client_env", "STUN_PORT"]

STUN_PORT = 3478


def start_our_relay(lab: Lab, *, tls: bool = False, port: int | None = None, host: str | None = None,
                    extra_args: Sequence[str] = (), workdir=None, ready_timeout: float = 20.0,
                    **relay_kwargs) -> OurRelay:
    """`python -m derpnet.server` in lab.inet_ns on HOST:PORT (default lab.relay_ip, port 3340, or
    443 with `tls`), returned once its ready line is out (`.url`, `.public_key`, `.ca_file`).
    Other keyword arguments (e.g. `stun_port=3478`) go to OurRelay unchanged."""
    host = host or lab.relay_ip
    relay = OurRelay(tls=tls, hostname=host if tls else None, host=host, port=port or (443 if tls else 3340),
                     workdir=workdir, extra_args=extra_args, ready_timeout=ready_timeout,
                     argv_prefix=lab.exec_argv(lab.inet_ns, []), **relay_kwargs)
    def cleanup() -> None:
        relay.__exit__(None, None, None)
        _close_output(relay.logged)

    lab.add_cleanup(cleanup)
    return relay.start()


def require_go_derper() -> None:
    """In a pytest test: skip without a built derper (fail when DERPNET_REQUIRE_INTEROP=1)."""
    if derper_path() is None:
        from tests.conftest import missing_go_peer

        missing_go_peer(skip_reason("derper"))


def start_go_derper(lab: Lab, *, tls: bool = False, port: int | None = None, host: str | None = None,
                    stun_port: int | None = STUN_PORT, extra_args: Sequence[str] = (), workdir=None,
                    ready_timeout: float = 20.0) -> GoDerper:
    """Tailscale's `derper` in lab.inet_ns on HOST:PORT (default lab.relay_ip:3340, plain HTTP as
    with -dev; `tls`: port 443, `-certmode=manual` with a test-CA certificate for HOST) with its
    STUN server on HOST:stun_port (None: no STUN). Raises FileNotFoundError when derper is not
    built (see require_go_derper)."""
    host = host or lab.relay_ip
    own_dir = workdir is None
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="derpnet-lab-derper-"))
    derper = GoDerper(workdir, tls=tls, port=port or (443 if tls else 3340), hostname=host, bind_host=host,
                      stun_port=stun_port, extra_args=extra_args, ready_timeout=ready_timeout,
                      argv_prefix=lab.exec_argv(lab.inet_ns, []),
                      connect=lambda address, timeout: lab.connect(lab.inet_ns, address, timeout))

    def cleanup() -> None:
        derper.stop()
        _close_output(derper.proc)
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)

    lab.add_cleanup(cleanup)
    return derper.start()


def _close_output(logged) -> None:
    """Close a stopped LoggedProcess's output pipe (its reader has seen EOF; it leaves it open)."""
    if logged is not None and logged.proc.stdout is not None:
        logged.proc.stdout.close()


def go_client_env(relay) -> dict:
    """Environment additions for a Go client (derpconnect) of a TLS relay in the lab."""
    return {"SSL_CERT_FILE": str(relay.ca_file)} if getattr(relay, "ca_file", None) else {}
