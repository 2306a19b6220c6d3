"""Who may connect to the relay: an allow list of keys and/or derper's admission URL.

Layer: relay server. `--allow-clients FILE` lists the public keys that may connect (one
per line in any form `PublicKey.parse` takes; `#` comments and blank lines allowed);
`parse_allow_list` reads it and names the line of a bad entry. `--verify-client-url URL`
asks an admission controller about every client, as derper does: a POST of the JSON
`{"NodePublic": "nodekey:<hex>", "Source": "<client IP>"}` (tailcfg.DERPAdmitClientRequest),
5 s timeout, admitted only on HTTP 200 with `{"Allow": true}`; when the URL cannot be
reached the client is admitted unless `--verify-client-url-fail-open=false` (derper's
default is to fail open). The request blocks, so it runs in a small thread pool
(`derpnet-verify-N`), never on the relay's loop; the connection stops reading meanwhile.

A refused client is sent a Health frame saying why (the only text frame DERP has; derper
just closes), then the connection is closed, and the refusal is counted by reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..keys import PublicKey
from .configfile import ConfigError
from .connhooks import refuse, run_deferred

if TYPE_CHECKING:  # pragma: no cover
    from .conn import ClientProtocol

__all__ = ["AccessControl", "parse_allow_list", "verify_client", "VERIFY_TIMEOUT", "REFUSAL_REASONS"]

log = logging.getLogger(__name__)

VERIFY_TIMEOUT = 5.0  # derper's admission-controller timeout
VERIFY_WORKERS = 8
_RESPONSE_LIMIT = 4 << 10  # derper reads at most 4 KiB of the controller's answer

REFUSAL_REASONS = (
    "not_allowed",      # not in --allow-clients
    "verify_denied",    # the admission controller said no (or answered other than 200 + JSON)
    "verify_error",     # the controller could not be reached and --verify-client-url-fail-open=false
    "removed",          # connected, then removed from the allow list by a reload
)


def parse_allow_list(text: str, source: str = "allow list") -> frozenset[PublicKey]:
    """The keys of an allow file: one per line, any accepted form; `#` starts a comment.
    Raises ConfigError naming the first bad line."""
    keys = set()
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            keys.add(PublicKey.parse(entry))
        except ValueError as e:
            raise ConfigError(source, n, str(e)) from None
    return frozenset(keys)


def verify_client(url: str, key: PublicKey, source_ip: str, timeout: float = VERIFY_TIMEOUT) -> bool | None:
    """Ask the admission controller at `url` about `key` (blocking): True/False, or None when it
    could not be reached (the caller applies fail-open)."""
    body = json.dumps({"NodePublic": str(key), "Source": source_ip}).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            if res.status != 200:
                log.info("relay: admission controller answered %d for %s", res.status, key.short())
                return False
            raw = res.read(_RESPONSE_LIMIT)
    except urllib.error.HTTPError as e:  # answered, but not 200: refused (derper does the same)
        log.info("relay: admission controller answered %d for %s", e.code, key.short())
        return False
    except (OSError, ValueError) as e:  # unreachable, timed out, bad URL
        log.warning("relay: admission controller %s unreachable: %s", url, getattr(e, "reason", e))
        return None
    try:
        answer = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        log.info("relay: admission controller sent no JSON for %s", key.short())
        return False
    return isinstance(answer, dict) and answer.get("Allow") is True


class AccessControl:
    """The relay's admission rules and what they refused (used from the relay's loop)."""

    def __init__(self, allowed: frozenset[PublicKey] | None = None, verify_url: str | None = None,
                 fail_open: bool = True, timeout: float = VERIFY_TIMEOUT) -> None:
        self.allowed = allowed
        self.verify_url = verify_url or None
        self.fail_open = fail_open
        self.timeout = timeout
        self.refused: Counter[str] = Counter({r: 0 for r in REFUSAL_REASONS})
        self.verified = 0        # clients the controller admitted
        self.failed_open = 0     # clients admitted because the controller was unreachable
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @staticmethod
    def check_url(url: str) -> None:
        """Refuse a --verify-client-url that could never be asked (it would fail open for everyone)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--verify-client-url: expected an http:// or https:// URL, not {url!r}")

    @property
    def active(self) -> bool:
        return self.allowed is not None or self.verify_url is not None

    def permits(self, key: PublicKey) -> bool:
        """The allow list's verdict (True without a list)."""
        return self.allowed is None or key in self.allowed

    def judge(self, conn: ClientProtocol, key: PublicKey, admit: Callable[[], None]) -> None:
        """Call `admit()` if `key` may connect (now, or once the controller answered), else refuse `conn`."""
        if not self.permits(key):
            self.refuse(conn, "not_allowed", "this relay does not admit key " + key.short())
            return
        if self.verify_url is None:
            admit()
            return
        transport = conn.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        source = source.removeprefix("::ffff:") if "." in source else source  # as Go reports a v4 client
        transport.pause_reading()  # frames pipelined behind the ClientInfo wait for the verdict
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(VERIFY_WORKERS, thread_name_prefix="derpnet-verify")
        fut = conn.loop.run_in_executor(self._pool, verify_client, self.verify_url, key, source, self.timeout)
        fut.add_done_callback(lambda f: self._verdict(conn, key, f, admit))

    def _verdict(self, conn: ClientProtocol, key: PublicKey, fut: asyncio.Future[bool | None],
                 admit: Callable[[], None]) -> None:
        if conn.closed or conn.transport is None or fut.cancelled():
            return
        allowed = fut.result()
        if allowed is None:
            if not self.fail_open:
                self.refuse(conn, "verify_error", "the relay's admission controller is unavailable")
                return
            self.failed_open += 1
            log.info("relay: admission controller unreachable; allowing client %s", key.short())
        elif not allowed:
            self.refuse(conn, "verify_denied", "the relay's admission controller did not admit key " + key.short())
            return
        else:
            self.verified += 1
        conn.transport.resume_reading()
        run_deferred(conn, admit)

    def refuse(self, conn: ClientProtocol, reason: str, text: str) -> None:
        """Count the refusal, tell the client why (a Health frame) and close after it is written."""
        self.refused[reason] += 1
        conn.server.error_log.log(logging.INFO, "relay: refusing %s: %s", conn.name, text)
        refuse(conn, "access denied: " + text)

    def close(self) -> None:
        """Stop the verification threads (pending answers are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def stats(self) -> dict[str, object]:
        return {"refused": dict(self.refused), "verified": self.verified, "verify_failed_open": self.failed_open}
