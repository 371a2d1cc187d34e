"""The page registry: get_page/put_page and pin_user_pages over page ranges, the device reference.

Refcounts are zero-based as in Linux: 0 is an idle page, ``get_page`` adds 1, ``pin_user_pages``
adds ``GUP_PIN_COUNTING_BIAS`` (FOLL_PIN), and a page is "maybe DMA pinned" from that bias up.
Records are 64 bytes a page (``page_struct_size``): an epoch that proves which daemon wrote them,
and one signed counter column per serving process, so each process writes only its own column
and a page's refcount is the sum of its row. Every operation works on whole ranges with numpy.

Records are backed (allocated in the image, stamped with the epoch) one page of records, 64 data
pages, at a time, when a reference first needs them. When the image's filesystem is full, a
chunk's records live in a shared DRAM twin of the array instead (the spill): a reference, and so a
read, never fails for want of space for its record. ``backed`` says where each chunk lives; it
changes once per mount, from unbacked to one or the other, under BACKING_LOCK.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import errno
import itertools
import struct
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from . import membarrier
from .errors import DeviceGone, NoSpace, PageBusy, PmemfsError, UnbalancedPut
from .infoblock import PAGE_SHIFT, PAGE_SIZE
from .ranges import runs
from .shared import (
    BACKING_LOCK,
    COUNTER,
    DEVICE_ALIVE,
    DEVICE_KILLER,
    FLAGS_LOCK,
    GATE_DEVICE_DEAD,
    GATE_TRACING_IO,
    GATE_ZEROING,
    HOLDER_SLOTS,
    IO_GATE,
    NCOLUMNS,
    OPENS_HELD,
    REGISTRY_COUNTERS,
    TRACE_DTYPE,
    TRACE_EVENTS,
    TRACE_IO,
    TRACE_NOTE,
    ZEROING_END,
    ZEROING_FIRST,
    ZEROING_LOCK,
    SharedState,
)

GUP_PIN_COUNTING_BIAS = 1024
# An open of pmem0/dax0 that finds opens held back waits this long for the unmount's check to back
# off (it takes microseconds when a file is open) before it fails with ENXIO, looking this often.
# No longer: a serving process waiting here serves nothing else, and with one serving process the
# unmount's own requests would wait behind it.
OPEN_WAIT_S = 0.02
OPEN_POLL_S = 0.001
# A transfer into pages that a zero is clearing waits for it, as I/O waits on a truncate's lock,
# this long at most (then EBUSY: a zero takes milliseconds); it looks again this often.
ZEROING_WAIT_S = 10.0
ZEROING_POLL_S = 0.0002
RECORD_DTYPE = np.dtype([("epoch", "<u4"), ("flags", "<u4"), ("refs", "<i4", (NCOLUMNS,))])
REFS_OFFSET = 8
assert RECORD_DTYPE.itemsize == 64 and RECORD_DTYPE.fields is not None and RECORD_DTYPE.fields["refs"][1] == REFS_OFFSET
# Records are backed a page of records at a time (see the module's doc); only backed chunks are
# read when listing references, so a query never faults in (or, on tmpfs, allocates) a hole.
CHUNK_PAGES = PAGE_SIZE // RECORD_DTYPE.itemsize
CHUNK_SHIFT = CHUNK_PAGES.bit_length() - 1
assert 1 << CHUNK_SHIFT == CHUNK_PAGES
UNBACKED, IN_IMAGE, SPILLED = 0, 1, 2
# Queries read this many chunks of records at a time (1M pages, 64 MiB): bounded memory on any device.
QUERY_BATCH_CHUNKS = 16384
# The stale-reference scan at mount reads the carve-out this many records at a time.
SCAN_BATCH_PAGES = 1 << 20
_CHUNK_OFFSETS = np.arange(CHUNK_PAGES)
FILES = ("", "pmem0", "dax0")
WHATS = (
    "",
    "get",
    "put",
    "pin",
    "unpin",
    "refused",
    "teardown",
    "revive",
    "reset",
    "session",
    "zero",
    "inject",
    "uninject",
)
_TRACE_RECORD = struct.Struct(f"<QQiBBxxQQ{TRACE_NOTE}s")
assert _TRACE_RECORD.size == TRACE_DTYPE.itemsize


class Kind(enum.Enum):
    # The values are what the shared holder table stores.
    GET = "get"  # get_page: buffered page-cache fills and writebacks
    PIN = "pin"  # pin_user_pages (FOLL_PIN): a direct-I/O transfer, or a short-term session pin
    LONGTERM = "longterm"  # FOLL_PIN | FOLL_LONGTERM: an RDMA-style registration

    @property
    def code(self) -> int:
        return KIND_CODES[self]


class Holder(NamedTuple):
    """Who holds a reference: the process that opened the file, the file, the range, the kind, since when.

    A NamedTuple because the direct-I/O path makes one per transfer.
    """

    id: int
    pid: int
    file: str
    pfn: int
    npages: int
    kind: Kind
    since_ns: int

    def as_dict(self, now_ns: int | None = None) -> dict[str, object]:
        now_ns = now_ns or time.time_ns()
        return {
            "id": self.id,
            "pid": self.pid,
            "file": self.file,
            "pfn": self.pfn,
            "npages": self.npages,
            "offset": self.pfn * 4096,
            "length": self.npages * 4096,
            "kind": self.kind.value,
            "age_s": round((now_ns - self.since_ns) / 1e9, 3),
        }


KIND_CODES = {Kind.GET: 1, Kind.PIN: 2, Kind.LONGTERM: 3}
KINDS = {code: kind for kind, code in KIND_CODES.items()}


class Event(NamedTuple):
    column: int
    seq: int
    time_ns: int
    what: str  # get, put, pin, unpin, refused, teardown, revive, reset, session
    pid: int
    file: str
    pfn: int
    npages: int
    note: str = ""

    def line(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time_ns / 1e9)) + f".{self.time_ns % 10**9 // 1000:06d}"
        where = f" {self.file} pfn {self.pfn}+{self.npages}" if self.npages else ""
        return (
            f"{self.column}:{self.seq} {stamp} {self.what} pid {self.pid}{where}{' ' + self.note if self.note else ''}"
        )


NR_PIN_ACQUIRED, NR_PIN_RELEASED, NR_GET_PAGE, NR_PUT_PAGE, NR_UNBALANCED, NR_REFUSED = (
    COUNTER[n] for n in REGISTRY_COUNTERS
)
WHAT_GET, WHAT_PUT, WHAT_PIN, WHAT_UNPIN = (WHATS.index(w) for w in ("get", "put", "pin", "unpin"))


def chunks_for(npfns: int) -> int:
    return -(-npfns // CHUNK_PAGES)


class PageRegistry:
    """Refcounts for ``npfns`` data pages over a record array that lives in the image or in DRAM.

    Counters, holders, the trace and the device reference live in ``shared``, so that every
    serving process sees one registry; this process writes column ``column`` of each.
    """

    def __init__(
        self,
        records: np.ndarray,
        *,
        epoch: int,
        column: int = 0,
        back_chunk: Callable[[int], None] | None = None,
        spill: np.ndarray | None = None,
        shared: SharedState | None = None,
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
        self.shared = shared or SharedState(chunks_for(self.npfns))
        assert len(self.shared.backed) >= chunks_for(self.npfns)
        self._flags = self.shared.flag_cells()
        self._flag_bytes = self.shared.flag_bytes()
        self.set_column(column)
        # Transfers under way in this process (a read whose reply is being sent, a write being
        # stored): the I/O path makes one per request, and a tuple costs a fifth of a NamedTuple.
        self.in_flight: list[tuple] = []

    def set_column(self, column: int) -> None:
        """Become serving process ``column``: write that column of records, counters, trace and holders."""
        assert 0 <= column < NCOLUMNS
        self.column = column
        self._own = self._refs[:, column]
        self._spill_own = self._spill_refs[:, column]
        # Single pages (most 4k transfers) go through a memoryview: a tenth of numpy's scalar cost.
        self._words = self.records.view(np.int32).reshape(-1).data
        self._spill_words = self._spill.view(np.int32).reshape(-1).data
        self._own_word = REFS_OFFSET // 4 + column
        self._backed = self.shared.backed
        self._backed_bytes = self._backed.data
        self.counter_row = self.shared.counter_row(column)
        self._holder_slots = self.shared.holders[column]
        self._holder_ids = itertools.count(column * 1_000_000_000 + 1)
        self._trace_base = column * TRACE_EVENTS
        self._seq = itertools.count(int(self.shared.trace_heads[column]) + 1)

    # The kernel's operations, on [pfn, pfn + npages).
    def get_page(self, pfn: int, npages: int = 1) -> None:
        self._add(pfn, npages, 1)
        self.counter_row[NR_GET_PAGE] += npages

    def put_page(self, pfn: int, npages: int = 1) -> None:
        self._sub(pfn, npages, 1)
        self.counter_row[NR_PUT_PAGE] += npages

    def pin_user_pages(self, pfn: int, npages: int = 1) -> None:
        self._add(pfn, npages, GUP_PIN_COUNTING_BIAS)
        # Checked after the pin is taken, as the I/O path does (see begin_transfer).
        if not self._flags[DEVICE_ALIVE]:
            self._sub(pfn, npages, GUP_PIN_COUNTING_BIAS)
            self.counter_row[NR_REFUSED] += 1
            raise DeviceGone("the device is being torn down: no new pins")
        self.counter_row[NR_PIN_ACQUIRED] += npages

    def unpin_user_pages(self, pfn: int, npages: int = 1) -> None:
        self._sub(pfn, npages, GUP_PIN_COUNTING_BIAS)
        self.counter_row[NR_PIN_RELEASED] += npages

    def count_refused(self) -> None:
        self.counter_row[NR_REFUSED] += 1

    def page_ref_count(self, pfn: int) -> int:
        return int(self.refcounts(pfn, 1)[0])

    def page_maybe_dma_pinned(self, pfn: int) -> bool:
        return self.page_ref_count(pfn) >= GUP_PIN_COUNTING_BIAS

    def refcounts(self, pfn: int, npages: int) -> np.ndarray:
        """The refcounts of [pfn, pfn + npages): the sums of every column, wherever the records live."""
        return self._values(pfn, npages, None)

    def _values(self, pfn: int, npages: int, column: int | None) -> np.ndarray:
        """Refcounts (column None) or one column's counts over a range; unbacked records count 0
        and are never read."""
        first, last = pfn >> CHUNK_SHIFT, (pfn + npages - 1) >> CHUNK_SHIFT
        states = self._backed[first : last + 1]
        values = np.zeros(npages, dtype=np.int64)
        for state, refs in ((IN_IMAGE, self._refs), (SPILLED, self._spill_refs)):
            for c0, c1 in runs(np.flatnonzero(states == state) + first):
                lo, hi = max(pfn, c0 * CHUNK_PAGES), min(pfn + npages, c1 * CHUNK_PAGES)
                block = refs[lo:hi]
                values[lo - pfn : hi - pfn] = block.sum(axis=1) if column is None else block[:, column]
        return values

    def _own_for(self, chunk: int) -> np.ndarray:
        return self._own if self._backed_bytes[chunk] == IN_IMAGE else self._spill_own

    def _add(self, pfn: int, npages: int, delta: int) -> None:
        first, last = pfn >> CHUNK_SHIFT, (pfn + npages - 1) >> CHUNK_SHIFT
        if npages == 1:
            if not self._backed_bytes[first]:
                self._back(first, first)
            words = self._words if self._backed_bytes[first] == IN_IMAGE else self._spill_words
            words[pfn * 16 + self._own_word] += delta
            return
        states = self._backed[first : last + 1]
        if not states.all():
            self._back(first, last)
        self._apply(pfn, npages, delta, first, last)

    def _apply(self, pfn: int, npages: int, delta: int, first: int, last: int) -> None:
        """Add ``delta`` to this column over a range whose records are all backed."""
        states = self._backed[first : last + 1]
        if (states == IN_IMAGE).all():
            self._own[pfn : pfn + npages] += delta
        elif (states == SPILLED).all():
            self._spill_own[pfn : pfn + npages] += delta
        else:
            for chunk in range(first, last + 1):
                lo, hi = max(pfn, chunk * CHUNK_PAGES), min(pfn + npages, (chunk + 1) * CHUNK_PAGES)
                self._own_for(chunk)[lo:hi] += delta

    def _sub(self, pfn: int, npages: int, delta: int) -> None:
        first, last = pfn >> CHUNK_SHIFT, (pfn + npages - 1) >> CHUNK_SHIFT
        # Unbacked records hold no reference: nothing to drop there (and nothing to read).
        if self._backed[first : last + 1].all():
            if npages == 1:
                words = self._words if self._backed_bytes[first] == IN_IMAGE else self._spill_words
                index = pfn * 16 + self._own_word
                # Fast path: this process took the reference it drops. Otherwise another process may have.
                if words[index] >= delta or self.page_ref_count(pfn) >= delta:
                    words[index] -= delta
                    return
            elif self._values(pfn, npages, self.column).min() >= delta or (self.refcounts(pfn, npages) >= delta).all():
                self._apply(pfn, npages, -delta, first, last)
                return
        self.counter_row[NR_UNBALANCED] += 1
        bad = pfn + int(np.flatnonzero(self.refcounts(pfn, npages) < delta)[0])
        self.trace("refused", 0, "", pfn, npages, f"unbalanced: page {bad} has refcount {self.page_ref_count(bad)}")
        raise UnbalancedPut(f"unbalanced put of {delta} on page {bad} (refcount {self.page_ref_count(bad)})")

    def _back(self, first_chunk: int, last_chunk: int) -> None:
        """Back the unbacked chunks of records in [first_chunk, last_chunk]: in the image, or, when
        its filesystem is full, in the spill. Under a lock: two processes must not back one chunk
        in different places (references taken in one would be invisible in the other)."""
        with self.shared.locked(BACKING_LOCK):
            for chunk in np.flatnonzero(self._backed[first_chunk : last_chunk + 1] == UNBACKED) + first_chunk:
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
                self._backed[chunk] = state

    # Holders: each reference taken for a client knows who took it, in the shared holder table.
    def take(self, kind: Kind, pid: int, file: str, pfn: int, npages: int, *, session: int = 0) -> Holder:
        """Take a reference of ``kind`` for a client and remember it; drop it with :meth:`drop`."""
        free = np.flatnonzero(self._holder_slots["in_use"] == 0)
        if not len(free):
            raise PmemfsError(f"this serving process holds {HOLDER_SLOTS} references already", errno=errno.ENOMEM)
        if kind is Kind.GET:
            self.get_page(pfn, npages)
        else:
            self.pin_user_pages(pfn, npages)
        holder = Holder(next(self._holder_ids), pid, file, pfn, npages, kind, time.time_ns())
        slot = self._holder_slots[int(free[0])]
        slot["kind"], slot["file"], slot["pid"], slot["session"] = kind.code, FILES.index(file), pid, session
        slot["id"], slot["pfn"], slot["npages"], slot["since_ns"] = holder.id, pfn, npages, holder.since_ns
        slot["in_use"] = 1  # last: readers in other processes skip the slot until it is whole
        return holder

    def drop(self, holder: Holder) -> None:
        """Drop a reference taken by :meth:`take`, in whichever serving process took it."""
        table = self.shared.holders
        where = np.argwhere((table["in_use"] == 1) & (table["id"] == holder.id))
        if not len(where):
            raise UnbalancedPut(f"no holder {holder.id}")
        table["in_use"][tuple(where[0])] = 0
        if holder.kind is Kind.GET:
            self.put_page(holder.pfn, holder.npages)
        else:
            self.unpin_user_pages(holder.pfn, holder.npages)

    def _holder_rows(self, session: int | None = None) -> np.ndarray:
        table = self.shared.holders
        mask = table["in_use"] == 1
        if session is not None:
            mask &= table["session"] == session
        return table[mask]

    def holders(self, *, session: int | None = None) -> list[Holder]:
        found = [
            Holder(
                int(r["id"]),
                int(r["pid"]),
                FILES[r["file"]],
                int(r["pfn"]),
                int(r["npages"]),
                KINDS[int(r["kind"])],
                int(r["since_ns"]),
            )
            for r in self._holder_rows(session)
        ]
        if session is None:
            found += [
                Holder(0, pid, FILES[file], pfn, npages, Kind.PIN if pin else Kind.GET, since)
                for pin, pid, file, pfn, npages, since in self.in_flight
            ]
        return sorted(found, key=lambda h: (h.pfn, h.id))

    def holders_of(self, pfn: int, npages: int = 1) -> list[Holder]:
        return [h for h in self.holders() if h.pfn < pfn + npages and pfn < h.pfn + h.npages]

    # The device reference (dev_pagemap's percpu_ref).
    @property
    def alive(self) -> bool:
        return bool(self._flags[DEVICE_ALIVE])

    def kill(self, session: int = 0) -> None:
        with self.shared.locked(FLAGS_LOCK):
            # The killer first: a process that sees the reference dead must find who killed it.
            self._flags[DEVICE_KILLER] = session
            self._flags[DEVICE_ALIVE] = 0
            self._flag_bytes[GATE_DEVICE_DEAD] = 1  # last: a transfer that sees it finds the rest set
        membarrier.barrier()  # a transfer's reference, or its sight of the gate: never neither
        self.trace("teardown", 0, "", 0, 0, "device reference killed: new pins fail with ENXIO")

    # Holding opens back: how an unmount makes sure that no data file is open before it kills the
    # device reference, so that no transfer ever sees the kill. An open counts itself and then
    # looks at the hold; the unmount holds opens, runs membarrier, then counts: it sees the open,
    # or the open sees the hold (and waits for the unmount to go on or back off).
    def hold_opens(self, session: int) -> None:
        """Hold new opens of pmem0/dax0 back; PageBusy (EBUSY, and opens let go again) if any is open."""
        with self.shared.locked(FLAGS_LOCK):
            self._flags[OPENS_HELD] = session
        membarrier.barrier()
        still_open = self.shared.open_data_files()
        if still_open:
            self.release_opens(session)
            raise PageBusy(f"{still_open} pmem0/dax0 handle(s) open")
        self.trace("teardown", 0, "", 0, 0, "new opens of pmem0/dax0 held back")

    def release_opens(self, session: int | None = None) -> None:
        """Let opens go on again; with ``session``, only if that session held them."""
        with self.shared.locked(FLAGS_LOCK):
            if session is None or self._flags[OPENS_HELD] == session:
                self._flags[OPENS_HELD] = 0

    def may_open(self) -> bool:
        """For an open of a data file, counted already: whether it may go on. At once when no unmount
        is under way; else if the unmount's check backs off within OPEN_WAIT_S: False if the device
        is going away, as a removed disk's opens fail."""
        flags = self._flags
        deadline = time.monotonic() + OPEN_WAIT_S
        while flags[OPENS_HELD] or not flags[DEVICE_ALIVE]:
            if time.monotonic() > deadline:
                self.counter_row[NR_REFUSED] += 1
                return False
            time.sleep(OPEN_POLL_S)
        return True

    def revive(self, killer: int | None = None) -> bool:
        """Make the device reference live again; with ``killer``, only if that session killed it.
        Return whether it is alive now."""
        with self.shared.locked(FLAGS_LOCK):
            if self.alive:
                return True
            if killer is not None and self._flags[DEVICE_KILLER] != killer:
                return False
            self._flags[DEVICE_KILLER] = 0
            self._flags[DEVICE_ALIVE] = 1
            self._flag_bytes[GATE_DEVICE_DEAD] = 0
        self.trace("revive", 0, "", 0, 0, "device reference revived")
        return True

    # Queries.
    def _scan(self, pfn_lo: int = 0, pfn_hi: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(pfns, refcounts) of the backed records within [pfn_lo, pfn_hi), in pfn order, a bounded
        batch at a time: the cost follows what was ever referenced, not the size of the device."""
        pfn_hi = self.npfns if pfn_hi is None else min(pfn_hi, self.npfns)
        if pfn_hi <= pfn_lo:
            return
        first, end = pfn_lo >> CHUNK_SHIFT, ((pfn_hi - 1) >> CHUNK_SHIFT) + 1
        # A copy first: other processes back chunks meanwhile, and np.flatnonzero of an array that
        # changes under it raises ("number of non-zero array elements changed").
        chunks = np.flatnonzero(self._backed[first:end].copy()) + first
        for i in range(0, len(chunks), QUERY_BATCH_CHUNKS):
            pfns = (chunks[i : i + QUERY_BATCH_CHUNKS, None] * CHUNK_PAGES + _CHUNK_OFFSETS).ravel()
            pfns = pfns[(pfns >= pfn_lo) & (pfns < pfn_hi)]
            states = self._backed[pfns >> CHUNK_SHIFT]
            counts = np.zeros(len(pfns), dtype=np.int64)
            for state, refs in ((IN_IMAGE, self._refs), (SPILLED, self._spill_refs)):
                where = states == state
                if where.any():
                    counts[where] = refs[pfns[where]].sum(axis=1)
            yield pfns, counts

    def referenced_ranges(self) -> list[dict[str, int]]:
        """Runs of pages with the same nonzero refcount, reading only records that were ever backed."""
        ranges: list[dict[str, int]] = []
        for pfns, counts in self._scan():
            busy = counts != 0
            _append_runs(ranges, pfns[busy], counts[busy])
        return ranges

    def first_busy_page(self, pfn: int, npages: int) -> int | None:
        """The first page of the range that someone references (``dax_layout_busy_page``), else None."""
        for pfns, counts in self._scan(pfn, pfn + npages):
            busy = np.flatnonzero(counts)
            if len(busy):
                return int(pfns[busy[0]])
        return None

    def statistics(self) -> dict[str, object]:
        ranges = self.referenced_ranges()
        totals = self.shared.counter_totals()
        return {
            **{name: totals[name] for name in REGISTRY_COUNTERS},
            "referenced_pages": sum(r["npages"] for r in ranges),
            "pinned_pages": sum(r["npages"] for r in ranges if r["refcount"] >= GUP_PIN_COUNTING_BIAS),
            "holders": len(self.holders()),
            "device_alive": self.alive,
            # Pages whose records are in DRAM because the image's filesystem had no room for them.
            "spilled_record_pages": int(np.count_nonzero(self._backed == SPILLED)) * CHUNK_PAGES,
        }

    # Trace: one ring per serving process, merged by time when read. Every I/O transfer is traced
    # only while a session asks for it (``pmemfs trace --io``): a trace record costs a third of
    # the registry's work per request.
    def trace_io(self, session: int, on: bool) -> None:
        with self.shared.locked(FLAGS_LOCK):
            if on:
                self._flags[TRACE_IO] = session
                self._flag_bytes[GATE_TRACING_IO] = 1
            elif self._flags[TRACE_IO] == session:
                self._flags[TRACE_IO] = 0
                self._flag_bytes[GATE_TRACING_IO] = 0

    def trace(self, what: str, pid: int, file: str, pfn: int, npages: int, note: str = "") -> None:
        self._record(time.time_ns(), WHATS.index(what), pid, FILES.index(file), pfn, npages, note.encode()[:TRACE_NOTE])

    def _record(self, now_ns: int, what: int, pid: int, file: int, pfn: int, npages: int, note: bytes = b"") -> None:
        seq = next(self._seq)
        _TRACE_RECORD.pack_into(
            self.shared.trace_bytes, (self._trace_base + seq % TRACE_EVENTS) * _TRACE_RECORD.size,
            now_ns, seq, pid, what, file, pfn, npages, note,
        )  # fmt: skip
        self.shared.trace_heads[self.column] = seq

    def events(self) -> list[Event]:
        # One copy of the rings: other processes go on writing them while we read.
        ring = self.shared.trace.copy()
        written = ring["seq"] > 0
        rows, columns = ring[written], np.nonzero(written)[0]
        events = [
            Event(int(c), int(r["seq"]), int(r["time_ns"]), WHATS[r["what"]], int(r["pid"]), FILES[r["file"]],
                  int(r["pfn"]), int(r["npages"]), r["note"].decode(errors="replace"))
            for c, r in zip(columns, rows, strict=True)
        ]  # fmt: skip
        return sorted(events, key=lambda e: (e.time_ns, e.column, e.seq))

    # The I/O path: one call to start a transfer's reference, one to end every transfer under way
    # (a read's ends once its reply has gone out, a write's once its data is stored). In between,
    # ``in_flight`` holds plain tuples (pin, pid, file code, pfn, npages, since_ns). The one-page case
    # with its records already backed (most 4k transfers) touches nothing but memoryview items.
    def begin_transfer(self, pin: bool, pid: int, file: int, off: int, size: int) -> None:
        """Reference the pages of bytes [off, off + size): a pin for direct I/O, get_page for the
        page cache."""
        pfn = off >> PAGE_SHIFT
        npages = ((off + size - 1) >> PAGE_SHIFT) - pfn + 1
        delta = GUP_PIN_COUNTING_BIAS if pin else 1
        if npages == 1 and self._backed_bytes[pfn >> CHUNK_SHIFT] == IN_IMAGE:
            self._words[pfn * 16 + self._own_word] += delta
        else:
            self._add(pfn, npages, delta)
        # The gate is read after the reference is taken: an operation that closes it and then looks
        # for references (teardown, zero) sees ours, or we see the gate (membarrier on its side).
        since = 0
        if self._flags[IO_GATE]:
            self._through_gate(pin, pfn, npages, delta)
            if self._flags[TRACE_IO]:
                since = time.time_ns()
                self._record(since, WHAT_PIN if pin else WHAT_GET, pid, file, pfn, npages)
        if pin:
            self.counter_row[NR_PIN_ACQUIRED] += npages
        else:
            self.counter_row[NR_GET_PAGE] += npages
        self.in_flight.append((pin, pid, file, pfn, npages, since))

    def _through_gate(self, pin: bool, pfn: int, npages: int, delta: int) -> None:
        """The slow path of a transfer that holds its reference: refuse it, or wait, or go on."""
        flags = self._flags
        if pin and not flags[DEVICE_ALIVE]:
            self._sub(pfn, npages, delta)
            self.counter_row[NR_REFUSED] += 1
            raise DeviceGone("the device is being torn down: no new pins")
        deadline = time.monotonic() + ZEROING_WAIT_S
        while self._flag_bytes[GATE_ZEROING] and pfn < flags[ZEROING_END] and flags[ZEROING_FIRST] < pfn + npages:
            # Out of the zero's way while it runs (it would see our reference and give up).
            self._sub(pfn, npages, delta)
            if self.shared.try_lock(ZEROING_LOCK):
                # Nobody holds the zero's lock: its serving process died with the gate closed.
                self._flag_bytes[GATE_ZEROING] = 0
                self.shared.unlock(ZEROING_LOCK)
            elif time.monotonic() > deadline:
                raise PageBusy(f"pages {pfn}+{npages} stayed under a zero for {ZEROING_WAIT_S:g} s")
            else:
                time.sleep(ZEROING_POLL_S)
            self._add(pfn, npages, delta)

    @contextlib.contextmanager
    def excluding_transfers(self, pfn: int, npages: int) -> Iterator[None]:
        """Keep new transfers out of [pfn, pfn + npages) while a zero checks and clears it: they
        wait, as direct I/O waits on the lock a hole punch holds. The zero itself never waits for
        references (its client retries), so the wait lasts one zero at most. One zero at a time:
        another gets EBUSY and retries."""
        if not self.shared.try_lock(ZEROING_LOCK):
            raise PageBusy("another zero is under way")
        try:
            self._flags[ZEROING_FIRST] = pfn
            self._flags[ZEROING_END] = pfn + npages
            self._flag_bytes[GATE_ZEROING] = 1
            membarrier.barrier()
            yield
        finally:
            self._flag_bytes[GATE_ZEROING] = 0
            self.shared.unlock(ZEROING_LOCK)

    def end_transfers(self) -> None:
        """Drop the references of every transfer begun in this process."""
        in_flight = self.in_flight
        while in_flight:
            pin, pid, file, pfn, npages, _ = in_flight.pop()
            if pin:
                delta = GUP_PIN_COUNTING_BIAS
                self.counter_row[NR_PIN_RELEASED] += npages
            else:
                delta = 1
                self.counter_row[NR_PUT_PAGE] += npages
            # The image's records are read only where they are backed: a hole may be unreadable
            # (a full tmpfs) and reading it would allocate it (any tmpfs).
            if npages == 1 and self._backed_bytes[pfn >> CHUNK_SHIFT] == IN_IMAGE:
                index = pfn * 16 + self._own_word
                left = self._words[index] - delta
                if left >= 0:
                    self._words[index] = left
                else:
                    self._sub(pfn, npages, delta)
            else:
                self._sub(pfn, npages, delta)
            if self._flags[IO_GATE] and self._flags[TRACE_IO]:
                self._record(time.time_ns(), WHAT_UNPIN if pin else WHAT_PUT, pid, file, pfn, npages)

    # Reset after a daemon that died.
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
                _append_runs(ranges, busy + lo, counts[busy])
                done += hi - lo
                progress(done, total)
        return ranges


def holders_by_range(ranges: list[dict[str, int]], holders: list[Holder]) -> list[list[int]]:
    """For each referenced range (disjoint, sorted), the indices of the holders overlapping it:
    O(H log R + the answer), not a scan of every holder for every range."""
    starts = [r["pfn"] for r in ranges]
    found: list[list[int]] = [[] for _ in ranges]
    for index, holder in enumerate(holders):
        end = holder.pfn + holder.npages
        i = max(bisect.bisect_right(starts, holder.pfn) - 1, 0)
        while i < len(ranges) and starts[i] < end:
            if holder.pfn < starts[i] + ranges[i]["npages"]:
                found[i].append(index)
            i += 1
    return found


def _append_runs(ranges: list[dict[str, int]], pfns: np.ndarray, counts: np.ndarray) -> None:
    """Append runs of consecutive pages with equal refcount (pfns sorted, all counts nonzero)."""
    if not len(pfns):
        return
    breaks = np.flatnonzero((np.diff(pfns) != 1) | (np.diff(counts) != 0)) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(pfns)]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        _extend_or_append(ranges, int(pfns[start]), int(pfns[end - 1]) + 1, int(counts[start]))


def _extend_or_append(ranges: list[dict[str, int]], start: int, end: int, refcount: int) -> None:
    last = ranges[-1] if ranges else None
    if last and last["pfn"] + last["npages"] == start and last["refcount"] == refcount:
        last["npages"] += end - start
    else:
        ranges.append(
            {"pfn": start, "npages": end - start, "refcount": refcount, "pins": refcount // GUP_PIN_COUNTING_BIAS}
        )
