"""Where the page registry's records live, and what a mount does with what it finds there.

map=dev: the altmap carve-out of the image, 64 bytes a page right after the info block, as the
kernel places its struct pages. map=mem: a shared DRAM mapping (nothing survives the daemon).
The carve-out is volatile like the kernel's memmap: at mount its contents are only reported
(references left by the daemon that died, proved by the epoch) and then reset in bulk.
"""

from __future__ import annotations

import logging
import mmap

import numpy as np

from .infoblock import PAGE_SIZE, RESERVED_HEAD
from .pages import CHUNK_PAGES, RECORD_DTYPE, PageRegistry
from .region import Region
from .shared import SharedState

log = logging.getLogger("pmemfs")
MEMMAP_OFFSET = RESERVED_HEAD


def memmap_span(region: Region) -> tuple[int, int]:
    """The page-aligned byte range of the image that holds records."""
    end = MEMMAP_OFFSET + region.geometry.npfns * RECORD_DTYPE.itemsize
    return MEMMAP_OFFSET, -(-end // PAGE_SIZE) * PAGE_SIZE


def open_registry(
    region: Region, previous_epoch: int, epoch: int, shared: SharedState | None = None
) -> tuple[PageRegistry, list[dict[str, int]]]:
    """Attach a registry for this mount; return it and the stale references it found and cleared."""
    npfns = region.geometry.npfns
    if region.geometry.map == "mem":
        dram = mmap.mmap(-1, npfns * RECORD_DTYPE.itemsize, flags=mmap.MAP_SHARED)
        return PageRegistry(np.frombuffer(dram, dtype=RECORD_DTYPE), epoch=epoch, shared=shared), []

    start, end = memmap_span(region)
    records = region.image[start : start + npfns * RECORD_DTYPE.itemsize].view(type=np.ndarray, dtype=RECORD_DTYPE)

    def back_chunk(chunk: int) -> None:
        offset = start + chunk * CHUNK_PAGES * RECORD_DTYPE.itemsize
        region.allocate(offset, min(CHUNK_PAGES * RECORD_DTYPE.itemsize, end - offset))

    registry = PageRegistry(records, epoch=epoch, back_chunk=back_chunk, shared=shared)
    extents = [
        ((lo - start) // RECORD_DTYPE.itemsize, -(-(hi - start) // RECORD_DTYPE.itemsize))
        for lo, hi in region.extents(start, end)
    ]
    stale = registry.stale_ranges(previous_epoch, [(lo, min(hi, npfns)) for lo, hi in extents])
    if stale:
        pages = sum(r["npages"] for r in stale)
        log.warning("the daemon that died left %d referenced page(s) in the memmap: %s", pages, stale[:20])
        registry.trace(
            "reset", 0, "", 0, pages, f"stale references from the previous daemon cleared: {len(stale)} range(s)"
        )
    if extents:
        reset_records(region)
    return registry, stale


def reset_records(region: Region) -> None:
    """Zero every record at once by punching the carve-out back to a hole."""
    if region.geometry.map == "dev":
        start, end = memmap_span(region)
        region.punch_hole(start, end - start)
