"""A graceful relay restart under a derpquic transfer: SIGTERM, then a new relay process
on the same port (same key), loses nothing (SHA-256) and costs no more than the relay's
reconnect hint plus one retry step.

On SIGTERM our relay stops accepting (the port is free at once), sends every client a
Restarting frame (reconnect in HINT seconds), drains and exits 0 (derpnet.server.restart).
The test starts the next relay as soon as the old one has stopped accepting, as a service
manager would. Each PacketConn honours the hint (derpnet.relaylink): it reconnects HINT
after its link ended, and while the hint's try-for lasts it retries every
RESTART_RETRY_STEP at most, so the outage of each link is at most
max(HINT, when the new relay was ready) + one step (+ the connect itself).
"""

from __future__ import annotations

import signal
import time

import pytest

from derpnet.relaylink import RESTART_RETRY_STEP
from tests.faults.harness import Fault, MiB, Pair, random_bytes, run_transfer
from tests.relays import OurRelay

DRAIN = 5.0
CONNECT = 0.5  # a TCP connect and DERP handshake on loopback, with room for a loaded machine


def graceful_restart(relay: OurRelay, hint: float, marks: dict) -> Fault:
    """SIGTERM the relay; once it stopped accepting, start the next one on the same port."""
    def apply() -> dict:
        old = relay.logged
        assert old is not None
        start = len(old.lines())
        old.proc.send_signal(signal.SIGTERM)
        old.wait_for_line(rf"restarting: stopped accepting; told 2 client\(s\) to reconnect in {hint:g}s",
                          start=start)
        relay.start()  # same port, same key file; returns at its ready line
        marks["ready"] = time.monotonic()
        marks["old_rc"] = old.proc.wait(timeout=DRAIN + 10)
        marks["old_output"] = old.output()
        old.stop()
        return {"old_rc": marks["old_rc"]}
    return Fault("graceful-restart", apply, ("a", "b"))


# 1.5 s: the new relay is up within the hint (it needs ~1 s); 0.2 s: it is not, and the
# clients' first tries fail: they retry every step while the hint's try-for lasts.
@pytest.mark.parametrize("hint", [1.5, 0.2])
@pytest.mark.parametrize("size", [pytest.param(16 * MiB, id="16MiB")])
def test_transfer_survives_a_graceful_restart(tmp_path, size, hint, figures):
    args = ["--restart-reconnect-in", str(hint), "--drain-timeout", str(DRAIN)]
    with OurRelay(workdir=str(tmp_path / "relay"), extra_args=args) as relay, Pair(relay.url) as pair:
        marks: dict = {}
        out = run_transfer(pair, random_bytes(size), fault=graceful_restart(relay, hint, marks))
        assert out.intact, f"received {out.received} of {out.size} bytes, or a different SHA-256"
        assert marks["old_rc"] == 0, marks["old_output"]
        assert "every client drained" in marks["old_output"]
        assert "Traceback" not in marks["old_output"]
        for side in ("a", "b"):
            log = pair.log(side)
            (t_down, _), (t_up, up) = log.downs[0], log.ups[-1]
            assert up.generation == 2 and len(log.downs) == 1, (log.downs, log.ups)
            outage = t_up - t_down
            bound = max(hint, marks["ready"] - t_down) + RESTART_RETRY_STEP + CONNECT
            figures(f"graceful restart side {side}: link down {outage:.3f}s (hint {hint}s, new relay ready "
                    f"{marks['ready'] - t_down:+.3f}s after the link ended) {out.line()}", outage_s=outage)
            assert outage >= hint * 0.95, "reconnected before the relay's hint"
            assert outage <= bound, (outage, bound)
