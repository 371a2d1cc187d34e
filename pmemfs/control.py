"""The ``.pmemfs/`` control files: what each one shows, rendered as a snapshot when it is opened."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from .badblocks import BadBlocks
from .counters import FILE_IO_COUNTERS, IO_COUNTERS
from .holders import holders_by_range
from .logwrites import WriteLog
from .loops import loop_devices_for
from .pages import PageRegistry
from .region import Region


@dataclass(frozen=True)
class ControlFile:
    name: str
    render: Callable[[], bytes]
    # Takes what a client writes; raises PmemfsError (its errno goes to the writer) for bad input.
    store: Callable[[bytes], None] | None = None


def _json(snapshot: object) -> bytes:
    return (json.dumps(snapshot, indent=2) + "\n").encode()


def control_files(
    *,
    region: Region,
    registry: PageRegistry,
    badblocks: BadBlocks,
    mountpoint: str,
    log_path: str | None,
    stale: list[dict[str, int]],
    serving: Callable[[], dict[str, object]],
    write_log: WriteLog | None = None,
) -> list[ControlFile]:
    pmem0_path = os.path.join(mountpoint, "pmem0")
    # Rendered in whichever serving process gets the request: name the daemon (this process,
    # before any fork), which is what unmount waits for.
    daemon_pid = os.getpid()

    def status() -> bytes:
        blockdevs = loop_devices_for(pmem0_path)
        counters = registry.counters.totals()
        return _json(
            {
                "mountpoint": mountpoint,
                "pid": daemon_pid,
                "serving": serving(),
                "image": region.path,
                "log": log_path,
                **region.geometry.as_dict(),
                **region.header.as_dict(),
                "badblock_count": badblocks.sector_count,
                "previous_shutdown": "clean" if region.previous_shutdown_clean else "unclean",
                "stale_references": {"pages": sum(r["npages"] for r in stale), "ranges": stale[:64]},
                "blockdev": blockdevs[0] if blockdevs else None,
                "allocated_bytes": region.allocated_bytes(),
                "counters": {name: counters[name] for name in IO_COUNTERS},
                "file_counters": {name: counters[name] for name in FILE_IO_COUNTERS},
                "open_files": counters["data_opens"] - counters["data_releases"],
                "registry": registry.statistics(),
                "coordination": registry.coordination(),
                "write_log": write_log.statistics() if write_log else None,
            }
        )

    def pages() -> bytes:
        now = time.time_ns()
        ranges = registry.referenced_ranges()
        holders = registry.holders()
        described = [h.as_dict(now) for h in holders]
        for r, overlapping in zip(ranges, holders_by_range(ranges, holders), strict=True):
            r["holders"] = [described[i] for i in overlapping]  # type: ignore[assignment]
        return _json({"ranges": ranges, "holders": described})

    def trace() -> bytes:
        return "".join(event.line() + "\n" for event in registry.events()).encode()

    def trace_json() -> bytes:
        # The same events for programs (pmemfs trace --perfetto): exact times, no line to parse.
        return _json({"now_ns": time.time_ns(), "events": [event._asdict() for event in registry.events()]})

    return [
        ControlFile("status", status),
        ControlFile("pages", pages),
        ControlFile("trace", trace),
        ControlFile("badblocks", badblocks.sysfs, badblocks.store_sysfs),
        ControlFile("trace.json", trace_json),
    ]
