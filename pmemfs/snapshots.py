"""Snapshot slots: what a control file or pin session showed, readable from every serving process.

A control file shows what it held at its open (a pin session, at its last read at offset 0), and
the kernel may send the following reads to any serving process. So the bytes go to a memfd heap
that every process inherits, and a slot (owner handle, heap offset, length) in the shared table
says where they are.

Protocol: a slot is claimed (owner -1) and its row swapped or read under ``Lock.SNAPSHOTS``: no
reader sees a row half old, half new, or reads space being punched. Heap space comes from a bump
allocator under the same lock and is never reused; what a row stops pointing at is punched out of
the memfd by whoever swapped it. The bytes themselves are written outside the lock, before the
row points at them. A process that dies holding a slot leaves it taken until the daemon ends
(the kernel releases its handles to a live process, which frees them).
"""

from __future__ import annotations

import os

import numpy as np

from .holes import punch_hole
from .shared import SNAPSHOT_SLOTS, Lock, SharedState

ALIGN = 4096
CLAIMED = -1


class SnapshotSlots:
    def __init__(self, shared: SharedState) -> None:
        rows = shared.array("snapshots")
        self._rows, self._heap_end = rows[:SNAPSHOT_SLOTS], rows[SNAPSHOT_SLOTS:]
        self._heap = shared.snapshot_heap
        self._lock = shared.lock(Lock.SNAPSHOTS)

    def claim(self) -> int | None:
        """A free slot for a control handle, or None when every slot is taken."""
        with self._lock:
            free = np.flatnonzero(self._rows["owner"] == 0)
            if not len(free):
                return None
            slot = int(free[0])
            self._rows[slot] = (CLAIMED, 0, 0)
            return slot

    def store(self, slot: int, owner: int, data: bytes) -> None:
        """Make ``data`` what every process reads for handle ``owner`` in ``slot``, replacing what was there."""
        size = -(-len(data) // ALIGN) * ALIGN
        with self._lock:
            offset = int(self._heap_end["offset"][0])
            self._heap_end["offset"] = offset + size
        if data:
            os.pwrite(self._heap, data, offset)
        # Of two stores at once, each punches what it replaced.
        with self._lock:
            _, old_offset, old_length = (int(v) for v in self._rows[slot].tolist())
            self._rows[slot] = (owner, offset, len(data))
            self._punch(old_offset, old_length)

    def load(self, slot: int, owner: int, start: int = 0, size: int | None = None) -> bytes | None:
        """Bytes [start, start + size) of the snapshot of handle ``owner`` (None: not its slot any more)."""
        with self._lock:
            stored_owner, offset, length = (int(v) for v in self._rows[slot].tolist())
            if stored_owner != owner:
                return None
            size = length - start if size is None else min(size, length - start)
            return os.pread(self._heap, size, offset + start) if size > 0 else b""

    def free(self, slot: int, owner: int) -> None:
        """Free ``slot`` if ``owner`` holds it (or it was claimed for an open that failed: owner -1)."""
        with self._lock:
            stored_owner, offset, length = (int(v) for v in self._rows[slot].tolist())
            if stored_owner not in (owner, CLAIMED):
                return
            self._rows[slot] = (0, 0, 0)
            self._punch(offset, length)

    def _punch(self, offset: int, length: int) -> None:
        if length:
            punch_hole(self._heap, offset, -(-length // ALIGN) * ALIGN)

    def statistics(self) -> dict[str, int]:
        return {
            "slots_in_use": int(np.count_nonzero(self._rows["owner"])),
            "slots": SNAPSHOT_SLOTS,
            "heap_end": int(self._heap_end["offset"][0]),
        }
