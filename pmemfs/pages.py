"""The page registry: get_page/put_page and pin_user_pages over page ranges, and the I/O transfer.

What a reference means lives here; where it is kept lives below: the refcount words in
records.py, who holds what in holders.py, the trace in trace.py, and the conditions that a new
reference must pass in device.py and gates.py. Every operation works on whole ranges with numpy.

**Taking a reference** is one path for all three ways in: ``get_page``/``pin_user_pages`` (the
kernel's calls), ``take`` (a reference a client holds, remembered in the holder table) and
``begin_transfer`` (a FUSE request's). The reference is stored first and the I/O gate read after:
an operation that closes the gate and then looks for references (a teardown, a zero) sees ours,
or we see the gate. Behind a closed gate a pin is refused if the device is dead (the reference
undone, ENXIO), and any reference into pages under a zero steps aside until the zero is done.

**A transfer's lifetime is owned by the serving loop.** A process serves one request at a time:
``begin_transfer`` references the pages a request moves, and the reference lasts until the reply
is out. A write's store is done when its handler returns, so the handler ends it; a read's reply
is copied out of the mapping after its handler returns, so the serving loop ends it just before
it reads the next request (``end_transfer``, the loop's ``before_read`` hook in serving.py).
Both run compiled (transfer.pyx: in CPython they were most of the registry's cost per request).
A second ``begin_transfer`` while one is in flight is a bug in that contract, and raises.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np

from .counters import COUNTER, IO_PATH_SLOTS, REGISTRY_COUNTERS, Counters
from .device import DeviceReference, OpensHold
from .errors import UnbalancedPut
from .gates import IoGate, ZeroGate
from .holders import Holder, HolderTable, Kind, holders_by_range
from .infoblock import PAGE_SHIFT
from .records import (
    CHUNK_PAGES,
    CHUNK_SHIFT,
    GUP_PIN_COUNTING_BIAS,
    IN_IMAGE,
    RECORD_DTYPE,
    RecordStore,
    append_runs,
    chunks_for,
)
from .shared import FILES, Lock, SharedState
from .trace import WHAT_GET, WHAT_PIN, WHAT_PUT, WHAT_UNPIN, Event, IoTraceSwitch, TraceRing
from .transfer import Transfers

__all__ = [
    "CHUNK_PAGES",
    "FILES",
    "GUP_PIN_COUNTING_BIAS",
    "RECORD_DTYPE",
    "Event",
    "Holder",
    "Kind",
    "PageRegistry",
    "chunks_for",
    "holders_by_range",
]

NR_PIN_ACQUIRED, NR_PIN_RELEASED, NR_GET_PAGE, NR_PUT_PAGE, NR_UNBALANCED, NR_REFUSED = (
    COUNTER[n] for n in REGISTRY_COUNTERS
)


class PageRegistry:
    """Refcounts for ``npfns`` data pages, shared by every serving process; this one writes column
    ``column`` of everything per-process (records, counters, holders, trace)."""

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
        """``records``: the record array (in the image's carve-out, or DRAM). ``back_chunk`` and
        ``spill``: see records.RecordStore."""
        self.shared = shared or SharedState(chunks_for(len(records)))
        self.records = records
        self.npfns = len(records)
        self.epoch = epoch
        self.store = RecordStore(
            records, epoch=epoch, backed=self.shared.array("backed"), backing_lock=self.shared.lock(Lock.BACKING),
            back_chunk=back_chunk, spill=spill,
        )  # fmt: skip
        self.counters = Counters(self.shared)
        self.io_gate = IoGate(self.shared)
        self.device = DeviceReference(self.shared, self.io_gate)
        self.zero_gate = ZeroGate(self.shared, self.io_gate)
        self.opens = OpensHold(self.shared, self.device, self.counters.open_data_files)
        self.holder_table = HolderTable(self.shared)
        self.ring = TraceRing(self.shared)
        self.io_trace = IoTraceSwitch(self.shared, self.io_gate)
        # The hot path reads these directly: a method call per check would cost as much as the check.
        self._gate_words, self._gate_word = self.io_gate.words, self.io_gate.word
        self.transfers = Transfers(
            self, backed=self.shared.array("backed"), words=self._gate_words, gate_word=self._gate_word,
            page_shift=PAGE_SHIFT, chunk_shift=CHUNK_SHIFT, pin_bias=GUP_PIN_COUNTING_BIAS, in_image=IN_IMAGE,
            counter_slots=(NR_PIN_ACQUIRED, NR_PIN_RELEASED, NR_GET_PAGE, NR_PUT_PAGE),
            io_slots=IO_PATH_SLOTS, max_file=len(FILES) - 1,
        )  # fmt: skip
        # Instance attributes, so that a handler's call goes straight to the compiled method.
        self.begin_transfer = self.transfers.begin
        self.end_transfer = self.transfers.end
        self.set_column(column)

    def set_column(self, column: int) -> None:
        """Become serving process ``column``."""
        self.column = column
        self.store.set_column(column)
        self.counter_row = self.counters.row(column)
        self.transfers.bind(self.store.own_in_image, self.counter_row)
        self.holder_table.set_column(column)
        self.ring.set_column(column)

    # The kernel's operations, on [pfn, pfn + npages).
    def get_page(self, pfn: int, npages: int = 1) -> None:
        self._reference(False, pfn, npages, 1)
        self.counter_row[NR_GET_PAGE] += npages

    def put_page(self, pfn: int, npages: int = 1) -> None:
        self._drop_reference(pfn, npages, 1)
        self.counter_row[NR_PUT_PAGE] += npages

    def pin_user_pages(self, pfn: int, npages: int = 1) -> None:
        self._reference(True, pfn, npages, GUP_PIN_COUNTING_BIAS)
        self.counter_row[NR_PIN_ACQUIRED] += npages

    def unpin_user_pages(self, pfn: int, npages: int = 1) -> None:
        self._drop_reference(pfn, npages, GUP_PIN_COUNTING_BIAS)
        self.counter_row[NR_PIN_RELEASED] += npages

    def count_refused(self) -> None:
        self.counter_row[NR_REFUSED] += 1

    def page_ref_count(self, pfn: int) -> int:
        return int(self.refcounts(pfn, 1)[0])

    def page_maybe_dma_pinned(self, pfn: int) -> bool:
        return self.page_ref_count(pfn) >= GUP_PIN_COUNTING_BIAS

    def refcounts(self, pfn: int, npages: int) -> np.ndarray:
        """The refcounts of [pfn, pfn + npages): the sums of every column, wherever the records live."""
        return self.store.values(pfn, npages)

    def _reference(self, pin: bool, pfn: int, npages: int, delta: int) -> None:
        """Store a reference, then pass the gate (see the module's doc)."""
        self.store.add(pfn, npages, delta)
        if self._gate_words[self._gate_word]:
            self._through_gate(pin, pfn, npages, delta)

    def _through_gate(self, pin: bool, pfn: int, npages: int, delta: int) -> None:
        """The slow path of a reference that is stored: refuse it, or wait for a zero, or go on."""
        if pin:
            self.device.refuse_if_dead(lambda: self._refused(pfn, npages, delta))
        self.zero_gate.wait_out(
            pfn, npages,
            step_aside=lambda: self.store.sub(pfn, npages, delta),
            step_back=lambda: self.store.add(pfn, npages, delta),
        )  # fmt: skip

    def _refused(self, pfn: int, npages: int, delta: int) -> None:
        self.store.sub(pfn, npages, delta)
        self.counter_row[NR_REFUSED] += 1

    def _drop_reference(self, pfn: int, npages: int, delta: int) -> None:
        if self.store.sub(pfn, npages, delta):
            return
        self.counter_row[NR_UNBALANCED] += 1
        bad = pfn + int(np.flatnonzero(self.refcounts(pfn, npages) < delta)[0])
        self.trace("refused", 0, "", pfn, npages, f"unbalanced: page {bad} has refcount {self.page_ref_count(bad)}")
        raise UnbalancedPut(f"unbalanced put of {delta} on page {bad} (refcount {self.page_ref_count(bad)})")

    # References a client holds: remembered in the holder table, so any serving process can list
    # and drop them, and unmount can name who holds what.
    def take(self, kind: Kind, pid: int, file: str, pfn: int, npages: int, *, session: int = 0) -> Holder:
        """Take a reference of ``kind`` for a client and remember it; drop it with :meth:`drop`."""
        slot = self.holder_table.free_slot()
        if kind is Kind.GET:
            self.get_page(pfn, npages)
        else:
            self.pin_user_pages(pfn, npages)
        return self.holder_table.add(slot, kind, pid, file, pfn, npages, session)

    def drop(self, holder: Holder) -> None:
        """Drop a reference taken by :meth:`take`, in whichever serving process took it."""
        if not self.holder_table.remove(holder.id):
            raise UnbalancedPut(f"no holder {holder.id}")
        if holder.kind is Kind.GET:
            self.put_page(holder.pfn, holder.npages)
        else:
            self.unpin_user_pages(holder.pfn, holder.npages)

    def holders(self, *, session: int | None = None) -> list[Holder]:
        """Every holder (with ``session``, that session's), and this process's transfer in flight."""
        found = self.holder_table.holders(session=session)
        transfer = self.transfers.transfer
        if session is None and transfer is not None:
            pin, pid, file, pfn, npages, since = transfer
            found.append(Holder(0, pid, FILES[file], pfn, npages, Kind.PIN if pin else Kind.GET, since))
        return sorted(found, key=lambda h: (h.pfn, h.id))

    def holders_of(self, pfn: int, npages: int = 1) -> list[Holder]:
        return [h for h in self.holders() if h.pfn < pfn + npages and pfn < h.pfn + h.npages]

    # The I/O path: begin_transfer and end_transfer are transfer.Transfers's (compiled), which
    # calls back into these for all but the common case.
    def _behind_closed_gate(self, pin: bool, pid: int, file: int, pfn: int, npages: int, delta: int) -> int:
        """A transfer's reference is stored and the gate was closed: pass it; return the time the
        transfer was traced at, or 0."""
        self._through_gate(pin, pfn, npages, delta)
        if not self.io_trace.on:
            return 0
        since = time.time_ns()
        self.ring.record(since, WHAT_PIN if pin else WHAT_GET, pid, file, pfn, npages)
        return since

    def _trace_end(self, pin: bool, pid: int, file: int, pfn: int, npages: int) -> None:
        if self.io_trace.on:
            self.ring.record(time.time_ns(), WHAT_UNPIN if pin else WHAT_PUT, pid, file, pfn, npages)

    def excluding_transfers(self, pfn: int, npages: int) -> contextlib.AbstractContextManager[None]:
        """Keep new references out of [pfn, pfn + npages) while a zero checks and clears it (gates.ZeroGate)."""
        return self.zero_gate.closed_over(pfn, npages)

    # The device reference and the opens hold (device.py), traced here.
    @property
    def alive(self) -> bool:
        return self.device.alive

    def kill(self, session: int = 0) -> None:
        self.device.kill(session)
        self.trace("teardown", 0, "", 0, 0, "device reference killed: new pins fail with ENXIO")

    def revive(self, killer: int | None = None) -> bool:
        """Make the device reference live again; with ``killer``, only if that session killed it."""
        was_alive = self.device.alive
        alive = self.device.revive(killer)
        if alive and not was_alive:
            self.trace("revive", 0, "", 0, 0, "device reference revived")
        return alive

    def hold_opens(self, session: int) -> None:
        self.opens.hold(session)
        self.trace("teardown", 0, "", 0, 0, "new opens of pmem0/dax0 held back")

    def release_opens(self, session: int | None = None) -> None:
        self.opens.release(session)

    def may_open(self) -> bool:
        if self.opens.may_open():
            return True
        self.count_refused()
        return False

    def trace_io(self, session: int, on: bool) -> None:
        self.io_trace.set(session, on)

    # Queries.
    def referenced_ranges(self) -> list[dict[str, int]]:
        """Runs of pages with the same nonzero refcount, reading only records that were ever backed."""
        ranges: list[dict[str, int]] = []
        for pfns, counts in self.store.scan():
            busy = counts != 0
            append_runs(ranges, pfns[busy], counts[busy])
        return ranges

    def first_busy_page(self, pfn: int, npages: int) -> int | None:
        """The first page of the range that someone references (``dax_layout_busy_page``), else None."""
        for pfns, counts in self.store.scan(pfn, pfn + npages):
            busy = np.flatnonzero(counts)
            if len(busy):
                return int(pfns[busy[0]])
        return None

    def statistics(self) -> dict[str, object]:
        ranges = self.referenced_ranges()
        totals = self.counters.totals()
        return {
            **{name: totals[name] for name in REGISTRY_COUNTERS},
            "referenced_pages": sum(r["npages"] for r in ranges),
            "pinned_pages": sum(r["npages"] for r in ranges if r["refcount"] >= GUP_PIN_COUNTING_BIAS),
            "holders": len(self.holders()),
            "device_alive": self.alive,
            "spilled_record_pages": self.store.spilled_pages(),
        }

    def coordination(self) -> dict[str, object]:
        """Each shared primitive's own statistics: what a stuck unmount or zero is waiting on."""
        return {
            "device_reference": self.device.statistics(),
            "opens_hold": self.opens.statistics(),
            "io_gate": self.io_gate.statistics(),
            "zero_gate": self.zero_gate.statistics(),
            "io_trace": self.io_trace.statistics(),
            "holder_table": self.holder_table.statistics(),
            "trace": self.ring.statistics(),
            "badblocks": self.shared.badblocks_generation.statistics(),
            **self.shared.statistics(),
        }

    # Trace.
    def trace(self, what: str, pid: int, file: str, pfn: int, npages: int, note: str = "") -> None:
        self.ring.trace(what, pid, file, pfn, npages, note)

    def events(self) -> list[Event]:
        return self.ring.events()
