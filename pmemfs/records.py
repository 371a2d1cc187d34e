"""Page records: the refcount words of every data page, where they live and how they are summed.

A record is 64 bytes a page (the kernel's ``page_struct_size``): an epoch that proves which daemon
wrote it, and one signed refcount word per serving process (``COLUMNS`` of them). Process ``c``
adds to and subtracts from word ``c`` only, so no store is ever contended; a page's refcount is
the sum of its row, and a word may go negative when another process drops a reference this one
took (the sum never does: ``sub`` refuses an unbalanced put).

Records are backed (allocated in the image, stamped with the epoch) a page of records, 64 data
pages, at a time, when a reference first needs them. When the image's filesystem is full, a
chunk's records live in a shared DRAM twin of the array instead (the spill): a reference, and so
a read, never fails for want of space for its record. The shared ``backed`` byte of a chunk says
where its records live; it changes once per mount, from unbacked to one or the other, under
``Lock.BACKING`` (two processes backing one chunk in different places would hide each other's
references). Only backed chunks are ever read: a hole of the image may be unreadable (a full
tmpfs) and reading it would allocate it (any tmpfs). A dead process leaves its words as they
were; the next mount reports them (``stale_ranges``) and resets the carve-out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from .errors import NoSpace
from .infoblock import PAGE_SIZE
from .ranges import runs
from .shared import COLUMNS, CrossProcessLock

# Refcounts are zero-based as in Linux: get_page adds 1, pin_user_pages adds this (FOLL_PIN), and
# a page is "maybe DMA pinned" from it up.
GUP_PIN_COUNTING_BIAS = 1024
RECORD_DTYPE = np.dtype([("epoch", "<u4"), ("flags", "<u4"), ("refs", "<i4", (COLUMNS,))])
assert RECORD_DTYPE.itemsize == 64, "a record is the kernel's page_struct_size: change COLUMNS with care"
CHUNK_PAGES = PAGE_SIZE // RECORD_DTYPE.itemsize
CHUNK_SHIFT = CHUNK_PAGES.bit_length() - 1
assert 1 << CHUNK_SHIFT == CHUNK_PAGES
UNBACKED, IN_IMAGE, SPILLED = 0, 1, 2
# Queries read this many chunks of records at a time (1M pages, 64 MiB): bounded memory on any device.
QUERY_BATCH_CHUNKS = 16384
# The stale-reference scan at mount reads the carve-out this many records at a time.
SCAN_BATCH_PAGES = 1 << 20
_CHUNK_OFFSETS = np.arange(CHUNK_PAGES)


def chunks_for(npfns: int) -> int:
    return -(-npfns // CHUNK_PAGES)


class RecordStore:
    def __init__(
        self,
        records: np.ndarray,
        *,
        epoch: int,
        backed: np.ndarray,
        backing_lock: CrossProcessLock,
        back_chunk: Callable[[int], None] | None = None,
        spill: np.ndarray | None = None,
        column: int = 0,
    ) -> None:
        """``back_chunk(chunk)`` allocates a chunk's records in the image (raising NoSpace when it
        cannot); then ``spill``, an array like ``records`` in shared DRAM, holds them instead."""
        assert records.dtype == RECORD_DTYPE
        self.records = records
        self.npfns = len(records)
        self.epoch = epoch
        self._refs = records["refs"]
        self._back_chunk = back_chunk
        self._spill = records if spill is None else spill
        assert self._spill.dtype == RECORD_DTYPE and len(self._spill) == self.npfns
        self._spill_refs = self._spill["refs"]
        assert len(backed) >= chunks_for(self.npfns)
        self.backed = backed
        # A memoryview item costs a tenth of a numpy scalar: the one-page fast paths use these.
        self.backed_bytes = backed.data
        self._backing_lock = backing_lock
        self.set_column(column)

    def set_column(self, column: int) -> None:
        """Write refcount word ``column`` from now on (become that serving process)."""
        assert 0 <= column < COLUMNS
        self.column = column
        self._own = self._refs[:, column]
        self._spill_own = self._spill_refs[:, column]
        # This process's word of every record, indexed by pfn (a strided view: no index arithmetic).
        self.own_in_image = memoryview(self._own)  # type: ignore[arg-type]
        self.own_in_spill = memoryview(self._spill_own)  # type: ignore[arg-type]

    def own_words(self, pfn: int) -> memoryview:
        """This process's words where page ``pfn``'s (backed) record lives."""
        return self.own_in_image if self.backed_bytes[pfn >> CHUNK_SHIFT] == IN_IMAGE else self.own_in_spill

    def add(self, pfn: int, npages: int, delta: int) -> None:
        """Add ``delta`` to this process's word of [pfn, pfn + npages), backing records first."""
        first, last = pfn >> CHUNK_SHIFT, (pfn + npages - 1) >> CHUNK_SHIFT
        if npages == 1:
            if not self.backed_bytes[first]:
                self._back(first, first)
            self.own_words(pfn)[pfn] += delta
            return
        if not self.backed[first : last + 1].all():
            self._back(first, last)
        self._apply(pfn, npages, delta, first, last)

    def sub(self, pfn: int, npages: int, delta: int) -> bool:
        """Take ``delta`` off [pfn, pfn + npages) if every page's refcount allows it; False (and
        nothing changed) for an unbalanced put. Unbacked records hold no reference (nor are read)."""
        first, last = pfn >> CHUNK_SHIFT, (pfn + npages - 1) >> CHUNK_SHIFT
        states = self.backed[first : last + 1]
        if not states.all():
            return False
        if npages == 1:
            words = self.own_words(pfn)
            # Fast path: this process took the reference it drops. Otherwise another process may have.
            if words[pfn] >= delta or self.values(pfn, 1)[0] >= delta:
                words[pfn] -= delta
                return True
            return False
        # This process's words, read in place when every record is in the image (the usual case).
        mine = self._own[pfn : pfn + npages] if (states == IN_IMAGE).all() else self.values(pfn, npages, self.column)
        if mine.min() >= delta or (self.values(pfn, npages) >= delta).all():
            self._apply(pfn, npages, -delta, first, last)
            return True
        return False

    def _apply(self, pfn: int, npages: int, delta: int, first: int, last: int) -> None:
        """Add ``delta`` to this column over a range whose records are all backed."""
        states = self.backed[first : last + 1]
        if (states == IN_IMAGE).all():
            self._own[pfn : pfn + npages] += delta
        elif (states == SPILLED).all():
            self._spill_own[pfn : pfn + npages] += delta
        else:
            for chunk in range(first, last + 1):
                lo, hi = max(pfn, chunk * CHUNK_PAGES), min(pfn + npages, (chunk + 1) * CHUNK_PAGES)
                own = self._own if self.backed_bytes[chunk] == IN_IMAGE else self._spill_own
                own[lo:hi] += delta

    def _back(self, first_chunk: int, last_chunk: int) -> None:
        """Back the unbacked chunks of records in [first_chunk, last_chunk]: in the image, or, when
        its filesystem is full, in the spill."""
        with self._backing_lock:
            for chunk in np.flatnonzero(self.backed[first_chunk : last_chunk + 1] == UNBACKED) + first_chunk:
                state = IN_IMAGE
                if self._back_chunk is not None:
                    try:
                        self._back_chunk(int(chunk))
                    except NoSpace:
                        state = SPILLED
                lo = int(chunk) * CHUNK_PAGES
                # The epoch proves to the next mount that a record is ours; the spill dies with us.
                if state == IN_IMAGE:
                    self.records["epoch"][lo : lo + CHUNK_PAGES] = self.epoch
                self.backed[chunk] = state

    def values(self, pfn: int, npages: int, column: int | None = None) -> np.ndarray:
        """Refcounts (column None) or one column's words over a range; unbacked records count 0."""
        first, last = pfn >> CHUNK_SHIFT, (pfn + npages - 1) >> CHUNK_SHIFT
        states = self.backed[first : last + 1]
        values = np.zeros(npages, dtype=np.int64)
        for state, refs in ((IN_IMAGE, self._refs), (SPILLED, self._spill_refs)):
            for c0, c1 in runs(np.flatnonzero(states == state) + first):
                lo, hi = max(pfn, c0 * CHUNK_PAGES), min(pfn + npages, c1 * CHUNK_PAGES)
                block = refs[lo:hi]
                values[lo - pfn : hi - pfn] = block.sum(axis=1) if column is None else block[:, column]
        return values

    def scan(self, pfn_lo: int = 0, pfn_hi: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(pfns, refcounts) of the backed records within [pfn_lo, pfn_hi), in pfn order, a bounded
        batch at a time: the cost follows what was ever referenced, not the size of the device."""
        pfn_hi = self.npfns if pfn_hi is None else min(pfn_hi, self.npfns)
        if pfn_hi <= pfn_lo:
            return
        first, end = pfn_lo >> CHUNK_SHIFT, ((pfn_hi - 1) >> CHUNK_SHIFT) + 1
        # A copy first: other processes back chunks meanwhile, and np.flatnonzero of an array that
        # changes under it raises ("number of non-zero array elements changed").
        chunks = np.flatnonzero(self.backed[first:end].copy()) + first
        for i in range(0, len(chunks), QUERY_BATCH_CHUNKS):
            pfns = (chunks[i : i + QUERY_BATCH_CHUNKS, None] * CHUNK_PAGES + _CHUNK_OFFSETS).ravel()
            pfns = pfns[(pfns >= pfn_lo) & (pfns < pfn_hi)]
            states = self.backed[pfns >> CHUNK_SHIFT]
            counts = np.zeros(len(pfns), dtype=np.int64)
            for state, refs in ((IN_IMAGE, self._refs), (SPILLED, self._spill_refs)):
                where = states == state
                if where.any():
                    counts[where] = refs[pfns[where]].sum(axis=1)
            yield pfns, counts

    def spilled_pages(self) -> int:
        """Pages whose records are in DRAM because the image's filesystem had no room for them."""
        return int(np.count_nonzero(self.backed == SPILLED)) * CHUNK_PAGES

    def stale_ranges(
        self,
        previous_epoch: int,
        pfn_extents: list[tuple[int, int]],
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> list[dict[str, int]]:
        """Referenced ranges left by the daemon of ``previous_epoch`` within ``pfn_extents`` (the
        records that are allocated at all); records written by anyone else are not ours and ignored.
        ``progress(records done, records in all)`` is called after each batch."""
        ranges: list[dict[str, int]] = []
        total, done = sum(hi - lo for lo, hi in pfn_extents), 0
        for extent_lo, extent_hi in pfn_extents:
            for lo in range(extent_lo, extent_hi, SCAN_BATCH_PAGES):
                hi = min(lo + SCAN_BATCH_PAGES, extent_hi)
                block = self.records[lo:hi]
                counts = np.where(block["epoch"] == previous_epoch, block["refs"].sum(axis=1), 0)
                busy = np.flatnonzero(counts)
                append_runs(ranges, busy + lo, counts[busy])
                done += hi - lo
                progress(done, total)
        return ranges


def append_runs(ranges: list[dict[str, int]], pfns: np.ndarray, counts: np.ndarray) -> None:
    """Append runs of consecutive pages with equal refcount (pfns sorted, all counts nonzero)."""
    if not len(pfns):
        return
    breaks = np.flatnonzero((np.diff(pfns) != 1) | (np.diff(counts) != 0)) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(pfns)]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        first, stop, refcount = int(pfns[start]), int(pfns[end - 1]) + 1, int(counts[start])
        last = ranges[-1] if ranges else None
        if last and last["pfn"] + last["npages"] == first and last["refcount"] == refcount:
            last["npages"] += stop - first
        else:
            ranges.append(
                {"pfn": first, "npages": stop - first, "refcount": refcount, "pins": refcount // GUP_PIN_COUNTING_BIAS}
            )
