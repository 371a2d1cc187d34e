"""Where the page registry's records live, and what a mount does with what it finds there.

map=dev: the altmap carve-out of the image, 64 bytes a page right after the info block, as the
kernel places its struct pages. map=mem: a shared DRAM mapping (nothing survives the daemon).
The carve-out is volatile like the kernel's memmap: at mount its contents are only reported
(references left by the daemon that died, proved by the epoch) and then reset in bulk. When the
image's filesystem is full, records that cannot be allocated there go to a DRAM spill (pages.py).
"""

from __future__ import annotations

import errno
import logging
import mmap
from collections.abc import Callable

import numpy as np

from .errors import PmemfsError
from .infoblock import PAGE_SIZE, RESERVED_HEAD
from .pages import PageRegistry
from .records import CHUNK_PAGES, RECORD_DTYPE
from .region import Region
from .shared import MAP_NORESERVE, SharedState

log = logging.getLogger("pmemfs")
MEMMAP_OFFSET = RESERVED_HEAD
RESET_PIECE_BYTES = 256 << 20


def memmap_span(region: Region) -> tuple[int, int]:
    """The page-aligned byte range of the image that holds records."""
    end = MEMMAP_OFFSET + region.geometry.npfns * RECORD_DTYPE.itemsize
    return MEMMAP_OFFSET, -(-end // PAGE_SIZE) * PAGE_SIZE


def open_registry(
    region: Region,
    previous_epoch: int,
    epoch: int,
    shared: SharedState | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[PageRegistry, list[dict[str, int]]]:
    """Attach a registry for this mount; return it and the stale references it found.

    Nothing is written here: the mount may still fail, and a failed mount leaves the image as it
    was. Call :func:`reset_records` once the mount is committed (after ``mark_dirty``).
    """
    npfns = region.geometry.npfns
    if region.geometry.map == "mem":
        return PageRegistry(_dram_records(npfns), epoch=epoch, shared=shared), []

    start, end = memmap_span(region)
    records = region.image[start : start + npfns * RECORD_DTYPE.itemsize].view(type=np.ndarray, dtype=RECORD_DTYPE)

    def back_chunk(chunk: int) -> None:
        offset = start + chunk * CHUNK_PAGES * RECORD_DTYPE.itemsize
        region.back_with_zeros(offset, min(CHUNK_PAGES * RECORD_DTYPE.itemsize, end - offset))

    registry = PageRegistry(records, epoch=epoch, back_chunk=back_chunk, spill=_dram_records(npfns), shared=shared)
    extents = [
        ((lo - start) // RECORD_DTYPE.itemsize, min(-(-(hi - start) // RECORD_DTYPE.itemsize), npfns))
        for lo, hi in region.extents(start, end)
    ]
    stale = registry.store.stale_ranges(previous_epoch, extents, progress)
    if stale:
        pages = sum(r["npages"] for r in stale)
        log.warning("the daemon that died left %d referenced page(s) in the memmap: %s", pages, stale[:20])
        registry.trace(
            "reset", 0, "", 0, pages, f"stale references from the previous daemon cleared: {len(stale)} range(s)"
        )
    return registry, stale


def _dram_records(npfns: int) -> np.ndarray:
    """Records in shared DRAM: pages are taken only where records are used."""
    dram = mmap.mmap(-1, npfns * RECORD_DTYPE.itemsize, flags=mmap.MAP_SHARED | MAP_NORESERVE)
    return np.frombuffer(dram, dtype=RECORD_DTYPE)


def reset_records(region: Region, progress: Callable[[int, int], None] = lambda done, total: None) -> None:
    """Zero every record: punch the carve-out's allocated extents back to holes, a bounded piece at
    a time (a crashed daemon on a huge image may have left gigabytes of them; ``progress`` hears of
    each piece), or, on a filesystem that cannot punch holes, write zeros over them."""
    if region.geometry.map != "dev":
        return
    start, end = memmap_span(region)
    extents = region.extents(start, end)
    total, done = sum(hi - lo for lo, hi in extents), 0
    for lo, hi in extents:
        for piece in range(lo, hi, RESET_PIECE_BYTES):
            length = min(RESET_PIECE_BYTES, hi - piece)
            try:
                region.punch_hole(piece, length)
            except PmemfsError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                region.write_zeros(piece, length)
            done += length
            progress(done, total)
