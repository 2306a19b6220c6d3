"""The relay's counters in Prometheus text format, for `/metrics` on `--metrics-listen`.

Layer: relay server. `render(stats, process)` is pure: from `RelayServer.stats()` (plus
per-connection queue figures and the process's memory) to the text exposition format
(version 0.0.4). Names follow derper's `/debug/varz` where derper has the counter
(`derp_current_connections`, `derp_packets_dropped`, `derp_rate_limit_per_client_waited`,
...), as Prometheus names: counters end in `_total`. Nothing here carries a key: the
figures are totals, never per client. What each one means: README, "Running a relay for
others", and the HELP lines.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["render", "process_stats", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Sample = tuple[str, float]  # (label text, value); label text is "" or 'name="value",...'

# One metric a line: name, type, stats key (a dotted path into RelayServer.stats()), help.
_SIMPLE_TABLE = """
derp_current_connections gauge clients DERP clients connected (past their hello)
derp_current_client_keys gauge client_keys distinct keys connected
derp_current_dup_client_keys gauge dup_client_keys keys with more than one connection
derp_current_open_connections gauge connections_open TCP connections open, handshaking ones included
derp_current_unauthenticated gauge unauthenticated connections that have not completed their hello
derp_queued_packets gauge queued_packets packets queued for clients, all queues together
derp_write_buffer_bytes gauge write_buffer_bytes bytes in the connections' write buffers, all together
derp_preauth_buffer_bytes gauge preauth_bytes bytes held by connections before their hello
derp_accepts_total counter connections_accepted TCP connections accepted
derp_http_requests_total counter http_requests plain HTTP requests answered (probes, home page)
derp_packets_received_total counter packets_received SendPacket frames received from clients
derp_bytes_received_total counter bytes_received payload bytes of the SendPacket frames received
derp_packets_forwarded_total counter packets_forwarded packets written to their destination client
derp_bytes_forwarded_total counter bytes_forwarded payload bytes of the packets written
derp_got_ping_total counter pings Ping frames received
derp_sent_pong_total counter pongs_sent Pong frames sent
derp_keepalives_sent_total counter keepalives_sent KeepAlive frames sent
derp_write_timeouts_total counter write_timeouts clients dropped for not reading (write timeout)
derp_protocol_errors_total counter protocol_errors connections closed for a protocol error
derp_rate_limit_per_client_waited_total counter rate_limit_waits reads a client had to wait after (rate limit)
derp_verify_failed_open_total counter access.verify_failed_open clients admitted, admission controller unreachable
derp_log_lines_left_out_total counter log_lines_left_out client-provoked log lines left out by rate limiting
"""
_SIMPLE = [(name, kind, key, help_text) for name, kind, key, help_text in
           (line.split(" ", 3) for line in _SIMPLE_TABLE.strip().splitlines())]


def process_stats() -> dict[str, float]:
    """This process's resident memory (bytes) and open file descriptors, from /proc (Linux)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as f:
            out["resident_memory_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        out["open_fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return out


def _get(stats: Mapping[str, Any], path: str) -> Any:
    v: Any = stats
    for part in path.split("."):
        if not isinstance(v, Mapping):
            return None
        v = v.get(part)
    return v


def _family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = str(int(value)) if float(value).is_integer() else repr(float(value))
        lines.append(f"{name}{{{labels}}} {text}" if labels else f"{name} {text}")
    return lines


def _labelled(label: str, values: Mapping[str, Any]) -> list[Sample]:
    return [(f'{label}="{k}"', float(v)) for k, v in sorted(values.items())]


def render(stats: Mapping[str, Any], process: Mapping[str, float] | None = None,
           extra: Mapping[str, float] | None = None) -> str:
    """The Prometheus text for `stats` (RelayServer.stats()), `process` (process_stats()) and
    `extra` gauges (name -> value, e.g. the deepest client queue)."""
    lines: list[str] = []
    for name, kind, key, help_text in _SIMPLE:
        v = _get(stats, key)
        if isinstance(v, (int, float)):
            lines += _family(name, kind, help_text, [("", float(v))])
    refused = _get(stats, "access.refused") or {}
    outcomes = {
        "admitted": stats.get("clients_total", 0),
        "refused": sum(refused.values()),
        "timeout": stats.get("handshake_timeouts", 0),
        "failed": stats.get("handshake_failures", 0),
        "tls_error": stats.get("tls_errors", 0),
    }
    lines += _family("derp_handshakes_total", "counter", "connections by how their handshake ended",
                     _labelled("outcome", outcomes))
    lines += _family("derp_refused_clients_total", "counter",
                     "clients refused or disconnected by access control, by reason", _labelled("reason", refused))
    lines += _family("derp_accept_rejected_total", "counter", "connections closed at accept, by reason",
                     _labelled("reason", {"rate": stats.get("rejected_rate", 0),
                                          "unauthenticated": stats.get("rejected_unauthenticated", 0)}))
    lines += _family("derp_packets_dropped_total", "counter", "packets dropped, by reason",
                     _labelled("reason", stats.get("dropped") or {}))
    lines += _family("derp_peer_gone_frames_total", "counter", "PeerGone frames sent, by reason",
                     _labelled("reason", stats.get("peer_gone_sent") or {}))
    stun = stats.get("stun")
    if isinstance(stun, Mapping):
        lines += _family("derp_stun_answered_total", "counter", "STUN Binding requests answered",
                         [("", float(stun.get("answered", 0)))])
        lines += _family("derp_stun_dropped_total", "counter", "STUN datagrams dropped, by reason",
                         _labelled("reason", stun.get("dropped_by") or {}))
    for name, value in sorted((extra or {}).items()):
        lines += _family(name, "gauge", _EXTRA_HELP.get(name, name), [("", value)])
    proc = process or {}
    if "resident_memory_bytes" in proc:
        lines += _family("process_resident_memory_bytes", "gauge", "resident memory of the relay process",
                         [("", proc["resident_memory_bytes"])])
    if "open_fds" in proc:
        lines += _family("process_open_fds", "gauge", "open file descriptors", [("", proc["open_fds"])])
    return "\n".join(lines) + "\n"


_EXTRA_HELP = {
    "derp_queue_depth_max": "packets queued for the client with the deepest queue",
    "derp_rate_limit_per_client_bytes_per_second": "the default per-client rate limit (0: none)",
    "derp_rate_limit_per_client_burst_bytes": "the default per-client burst",
    "derp_rate_limit_overrides": "keys with a rate limit of their own",
    "derp_allowed_keys": "keys on the allow list (-1: no allow list)",
    "derp_draining": "1 while the relay drains for a restart",
}
