"""`bench/relay.py --policies`: the same relays with access control and rate limiting on.

Both relays get derper's options, so they are compared on the same work:
`--verify-client-url` (an admission controller in the bench process that admits every
key, as a real one would for a team) and `--rate-config` with a per-client limit far
above what any client sends (1 GB/s, burst 1 GB): every read is charged to a token
bucket, none has to wait. The rows show what the checks cost per packet (the limiter,
per read) and per connection (one HTTP round trip at connect time).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["policy_args", "admission_controller", "RATE"]

RATE = 1_000_000_000  # bytes/s per client: on, but never binding here


@contextlib.contextmanager
def admission_controller() -> Iterator[tuple[str, list[int]]]:
    """An admit-everyone controller on loopback: (its URL, [requests answered])."""
    answered = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"Allow": True}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            answered[0] += 1

        def log_message(self, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            failed[0] += 1  # e.g. a relay that gave up waiting (5 s) and hung up: it then fails open

    failed = [0]
    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="bench-admission", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/admit", answered
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def policy_args(go: bool, url: str, workdir: Path) -> list[str]:
    """The relay flags for access control and a non-binding rate limit (derper's spelling for Go)."""
    rates = workdir / "rates.json"
    rates.write_text(json.dumps({"PerClientRateLimitBytesPerSec": RATE, "PerClientRateBurstBytes": RATE}))
    dash = "-" if go else "--"
    return [f"{dash}verify-client-url={url}", f"{dash}rate-config={rates}"]
