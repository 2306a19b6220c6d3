"""`derpconnect regions`: list the DERP map's regions, probe their latency, refresh the map."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from .. import derpmap
from .common import EXIT_FAILURE, EXIT_OK, UsageError, UserError, derp_map, relay_ssl_context

log = logging.getLogger("derpnet.cmd")

NAME = "regions"
HELP = "list DERP regions (from the shipped map); --probe measures latency"
DESCRIPTION = f"""\
List the regions of the DERP map that --derp=<code|id> resolves through: the copy written
by `regions --refresh` if there is one, else the snapshot shipped with derpnet (see
derpnet/data/README.md for its date); --derp-map FILE uses another map.

--probe measures HTTPS latency to every region (GET /derp/latency-check on the first node,
best of --samples, all regions at once) and marks the closest with '*'; the whole probe,
name lookups included, ends within --timeout seconds (progress on stderr in a terminal).
--refresh [URL|FILE] downloads (default {derpmap.DEFAULT_MAP_URL}) or reads a DERP map,
checks it and saves it as the user's copy ({derpmap.user_cache_path()}); plain http://
only with --insecure.
Nothing else ever fetches the map.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", action="store_true", help="measure HTTPS latency to each region")
    p.add_argument("--samples", metavar="N", type=int, default=3, help="probe samples per region (default 3)")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=3.0,
                   help="time limit of the whole probe, DNS included (default %(default)g)")
    p.add_argument("--refresh", metavar="URL|FILE", nargs="?", const=derpmap.DEFAULT_MAP_URL,
                   help="fetch or read a DERP map and save it as the user's copy")
    p.add_argument("--insecure", action="store_true",
                   help="let --refresh fetch from a plain http:// URL (anyone on the path could rewrite the map)")
    p.add_argument("--json", action="store_true", help="print the map as JSON")
    p.add_argument("region", metavar="REGION", nargs="*", help="only these region codes or ids")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.samples <= 20:
        raise UsageError("--samples must be between 1 and 20")
    if not 0 < args.timeout <= 60:
        raise UsageError("--timeout must be between 0 and 60 seconds")
    if args.refresh:
        try:
            m, path = derpmap.refresh(args.refresh, ssl_context=relay_ssl_context(args), insecure=args.insecure)
        except derpmap.DerpMapError as e:
            raise UserError(f"refresh failed: {e}") from None
        except OSError as e:
            raise UserError(f"refresh failed: cannot write {derpmap.user_cache_path()}: {e.strerror or e}") from None
        log.info("saved a DERP map of %d regions from %s to %s", len(m), args.refresh, path)
        if not (args.probe or args.json or args.region):
            return EXIT_OK
    else:
        m = derp_map(args)
    regions = list(m)
    if args.region:
        regions = []
        for ident in args.region:
            r = m.region(ident)
            if r is None:
                raise UsageError(f"unknown region {ident!r} in {m.source or 'the DERP map'}")
            regions.append(r)
    if args.json:
        sys.stdout.write(m.to_json())
        return EXIT_OK
    out = sys.stdout
    log.info("DERP map: %s (%d regions)", m.source or "?", len(m))
    if not args.probe:
        rows = [(str(r.region_id), r.code, r.name, _first_host(r), str(len(r.derp_nodes()))) for r in regions]
        _table(out, ("ID", "CODE", "NAME", "HOST", "NODES"), rows)
        return EXIT_OK
    progress = _Progress(sys.stderr, len(regions)) if sys.stderr.isatty() else None
    try:
        results = derpmap.probe(m, regions=regions, samples=args.samples, timeout=args.timeout,
                                ssl_context=relay_ssl_context(args),
                                on_result=progress.update if progress is not None else None)
    finally:
        if progress is not None:
            progress.clear()
    answered = [(p.latency, p) for p in results if p.latency is not None]
    best_latency, best = min(answered, key=lambda a: a[0]) if answered else (0.0, None)
    probe_rows = []
    for p in results:
        mark = "*" if best is not None and p is best else ""
        lat = f"{p.latency * 1000:.1f} ms" if p.latency is not None else f"- ({p.error})"
        host = p.node.host_name if p.node is not None else _first_host(p.region)
        probe_rows.append((mark, str(p.region.region_id), p.region.code, p.region.name, host, lat))
    _table(out, ("", "ID", "CODE", "NAME", "HOST", "LATENCY"), probe_rows)
    if best is None:
        raise UserError(f"no region answered the latency probe ({len(results)} tried)", EXIT_FAILURE)
    out.write(f"closest: {best.region.code} ({best.region.name}), {best_latency * 1000:.1f} ms: "
              f"--derp={best.region.code}\n")
    return EXIT_OK


class _Progress:
    """One self-overwriting status line on a terminal while the probe runs."""

    def __init__(self, err: TextIO, total: int) -> None:
        self.err = err
        self.answered = 0
        self._write(f"probing {total} regions...")

    def update(self, result: derpmap.ProbeResult, done: int, total: int) -> None:
        self.answered += result.latency is not None
        self._write(f"\rprobing {total} regions: {done} done, {self.answered} answered")

    def clear(self) -> None:
        self._write("\r\x1b[K")

    def _write(self, text: str) -> None:
        try:
            self.err.write(text)
            self.err.flush()
        except (OSError, ValueError):
            pass


def _first_host(r: derpmap.DerpRegion) -> str:
    nodes = r.derp_nodes()
    return nodes[0].host_name if nodes else "-"


def _table(out: TextIO, header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)] if rows else [len(h) for h in header]
    for row in (header, *rows):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    out.flush()
