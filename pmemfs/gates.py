"""The I/O gate and the zero gate: what a transfer checks after it has taken its page reference.

**The I/O gate** is one shared word that every transfer reads once: 0 means nothing to check,
the common case. Three conditions each own one byte of it (declared in shared.CELLS_DTYPE): the
device reference is dead (device.py), every transfer is traced (trace.py), a zero is under way
(below). Each byte is written alone by whoever changes its condition, under that condition's own
rules, so no two writers can undo each other.

**The zero gate** keeps new transfers out of the pages a bulk zero is clearing, as direct I/O
waits on the lock that a hole punch holds. The zero takes ``Lock.ZEROING`` (one zero at a time:
another gets EBUSY), stores its range, sets its byte of the I/O gate, runs membarrier, and only
then looks for references. A transfer stores its reference and then reads the gate. So either
the zero sees the reference (and refuses with EBUSY: its client retries) or the transfer sees the
gate and steps aside until the zero is done: never neither. A transfer waits ``ZEROING_WAIT_S``
at most (EBUSY then); if the zero's process died with the gate closed, the first transfer that
finds ``Lock.ZEROING`` free reopens it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from . import membarrier
from .errors import PageBusy
from .shared import Lock, SharedState, cell_byte, cell_word

ZEROING_WAIT_S = 10.0
ZEROING_POLL_S = 0.0002


class GateCondition:
    """One byte of the I/O gate, owned by one condition."""

    def __init__(self, shared: SharedState, name: str) -> None:
        self.name = name
        self._bytes = shared.bytes
        self._byte = cell_byte(name)

    def set(self, on: bool) -> None:
        self._bytes[self._byte] = int(on)

    @property
    def is_set(self) -> bool:
        return bool(self._bytes[self._byte])


class IoGate:
    """The word a transfer reads after taking its reference: nonzero while any condition holds."""

    CONDITIONS = ("gate_device_dead", "gate_tracing_io", "gate_zeroing")

    def __init__(self, shared: SharedState) -> None:
        # The hot path reads ``words[word]`` itself: a method call would cost as much as the check.
        self.words = shared.words
        self.word = cell_word("io_gate")
        self.conditions = {name: GateCondition(shared, name) for name in self.CONDITIONS}

    def condition(self, name: str) -> GateCondition:
        return self.conditions[name]

    @property
    def closed(self) -> bool:
        return bool(self.words[self.word])

    def statistics(self) -> dict[str, bool]:
        return {name.removeprefix("gate_"): c.is_set for name, c in self.conditions.items()}


class ZeroGate:
    def __init__(self, shared: SharedState, io_gate: IoGate) -> None:
        self._words = shared.words
        self._first = cell_word("zeroing_first")
        self._end = cell_word("zeroing_end")
        self._closed = io_gate.condition("gate_zeroing")
        self._lock = shared.lock(Lock.ZEROING)

    @contextlib.contextmanager
    def closed_over(self, pfn: int, npages: int) -> Iterator[None]:
        """Keep new transfers out of [pfn, pfn + npages) while the body checks and clears it. The
        body must not wait for references to go (its client retries): transfers wait for it."""
        if not self._lock.try_acquire():
            raise PageBusy("another zero is under way")
        try:
            self._words[self._first] = pfn
            self._words[self._end] = pfn + npages
            self._closed.set(True)
            membarrier.barrier()  # our gate, or their reference: the body sees one of them
            yield
        finally:
            self._closed.set(False)
            self._lock.release()

    def blocks(self, pfn: int, npages: int) -> bool:
        words = self._words
        return self._closed.is_set and pfn < words[self._end] and words[self._first] < pfn + npages

    def wait_out(
        self, pfn: int, npages: int, step_aside: Callable[[], object], step_back: Callable[[], object]
    ) -> None:
        """For a transfer that holds its reference on [pfn, pfn + npages) and found the gate closed
        over it: drop the reference (``step_aside``) while the zero runs, take it again
        (``step_back``) once the gate is open. PageBusy after ``ZEROING_WAIT_S``, the reference dropped."""
        deadline = time.monotonic() + ZEROING_WAIT_S
        while self.blocks(pfn, npages):
            step_aside()  # out of the zero's way while it runs (it would see us and give up)
            if not self._reopen_if_abandoned():
                if time.monotonic() > deadline:
                    raise PageBusy(f"pages {pfn}+{npages} stayed under a zero for {ZEROING_WAIT_S:g} s")
                time.sleep(ZEROING_POLL_S)
            step_back()

    def _reopen_if_abandoned(self) -> bool:
        """Reopen the gate if nobody holds the zero's lock: its process died with the gate closed."""
        if not self._lock.try_acquire():
            return False
        try:
            self._closed.set(False)
        finally:
            self._lock.release()
        return True

    def statistics(self) -> dict[str, object]:
        return {
            "closed": self._closed.is_set,
            "first_pfn": self._words[self._first],
            "end_pfn": self._words[self._end],
            "holder_pid": self._lock.holder_pid(),
        }
