"""A graceful restart of the relay: tell every client when to come back, drain, close.

Layer: relay server, on the loop. On SIGTERM the CLI calls `drain()`: the relay stops
accepting (so a new process can bind the port at once), queues a Restarting frame
(reconnect in `reconnect_in`, keep trying for `try_for`; shared/derp-protocol.md §4.7)
behind what every client still has to receive, stops forwarding what clients send from
then on (counted as drops, reason "restarting": the senders retransmit through the next
relay), tells nobody that a peer left (no PeerGone: they are all coming back), waits
until every client has been written everything, then closes each connection (FIN, TLS
close_notify) and waits for them to go, all within `timeout`.
What is left after it is dropped by `RelayServer.close()`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .connhooks import drained, restarting

if TYPE_CHECKING:  # pragma: no cover
    from .server import RelayServer

__all__ = ["drain", "DEFAULT_RECONNECT_IN", "DEFAULT_TRY_FOR", "DEFAULT_DRAIN_TIMEOUT"]

log = logging.getLogger(__name__)

DEFAULT_RECONNECT_IN = 1.0   # about what a relay needs to start again
DEFAULT_TRY_FOR = 10.0
DEFAULT_DRAIN_TIMEOUT = 5.0
_POLL = 0.01  # how often the drain looks at the connections' buffers


async def drain(server: RelayServer, reconnect_in: float = DEFAULT_RECONNECT_IN, try_for: float = DEFAULT_TRY_FOR,
                timeout: float = DEFAULT_DRAIN_TIMEOUT) -> bool:
    """Stop accepting, send Restarting to every client, drain and close them within `timeout`.
    True if every connection was closed in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    server.draining = True
    server.stop_accepting()
    clients = [c for c in server.connections() if c.registered]
    for c in clients:
        restarting(c, reconnect_in, try_for)
    log.info("relay: restarting: stopped accepting; told %d client(s) to reconnect in %gs (try for %gs); "
             "draining for up to %gs", len(clients), reconnect_in, try_for, timeout)
    pending = server.connections()  # until connection_lost
    while pending and loop.time() < deadline:
        for c in pending:
            if c.closed:
                continue  # closing: waiting for its transport to go
            if not c.registered:
                c.abort("relay restarting", level=logging.DEBUG)  # still in its handshake
            elif drained(c):
                c.finish()  # everything written: FIN (close_notify), the client sees the end
        await asyncio.sleep(_POLL)
        pending = server.connections()
    left = len(pending)
    if left:
        log.info("relay: restarting: %d connection(s) not drained within %gs; dropping them", left, timeout)
    else:
        log.info("relay: restarting: every client drained")
    return not left
