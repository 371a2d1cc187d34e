"""State that every serving process sees: one anonymous shared mapping, made before the fork.

Requests land in any serving process, so whatever must be exact across them lives here. Nothing
needs a lock: each process writes only its own row of counters and its own trace ring and holder
slots (column = its index), readers sum or merge, and the few shared cells are flags or
generations whose only question is "did it change".
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator

import numpy as np

NCOLUMNS = 14  # serving processes that can write at once (column 0 is the parent)
# The registry's counters, named as /proc/vmstat names them where it has them, then the I/O path's.
REGISTRY_COUNTERS = (
    "nr_foll_pin_acquired",
    "nr_foll_pin_released",
    "nr_get_page",
    "nr_put_page",
    "nr_unbalanced",
    "nr_refused",
)
IO_COUNTERS = ("reads", "writes", "read_bytes", "write_bytes", "direct_reads", "direct_writes", "fsyncs", "errors")
COUNTERS = REGISTRY_COUNTERS + IO_COUNTERS
COUNTER = {name: i for i, name in enumerate(COUNTERS)}
COUNTER_SLOTS = 16

# Cells of `flags`.
DEVICE_ALIVE = 0  # 1 while new pins are allowed (the dev_pagemap reference is live)
DEVICE_KILLER = 1  # the session that killed the device reference, revived when it closes
BADBLOCKS_GENERATION = 2  # bumped by every change of the badblocks table
HOLES_GENERATION = 3  # bumped by every hole punched into the data area
TRACE_IO = 4  # nonzero (the id of the session that asked) while every I/O transfer is traced
# 0 while the I/O path has nothing to check (device alive, no I/O trace): one read per transfer
# instead of two. Each condition owns one byte of it, written alone, so that two processes
# changing different conditions at once cannot undo each other (no read-modify-write).
IO_GATE = 5
GATE_DEVICE_DEAD = IO_GATE * 8
GATE_TRACING_IO = IO_GATE * 8 + 1
GATE_ZEROING = IO_GATE * 8 + 2
# The pages [first, end) that the zero under way keeps transfers out of, while GATE_ZEROING is set.
ZEROING_FIRST = 6
ZEROING_END = 7
FLAG_CELLS = 8

# Cross-process locks: byte offsets of the lock file.
ZEROING_LOCK = 0  # held by the serving process whose zero is under way
FLAGS_LOCK = 1  # held while a session changes the device reference or the I/O trace (check, then write)
HOLES_LOCK = 2  # held while the holes generation is bumped (read-modify-write)

HOLDER_SLOTS = 1024  # per column
HOLDER_DTYPE = np.dtype(
    [
        ("in_use", "u1"),
        ("kind", "u1"),
        ("file", "u1"),
        ("pad", "u1"),
        ("pid", "<i4"),
        ("session", "<u8"),
        ("id", "<u8"),
        ("pfn", "<u8"),
        ("npages", "<u8"),
        ("since_ns", "<u8"),
    ]
)
# What a control file or pin session showed at its open (or its last read at offset 0), for the
# serving process that gets the next read of it. Slots are taken by column, freed by anyone.
SNAPSHOT_SLOTS = 32  # per column; only the pages a snapshot fills are ever touched
SNAPSHOT_BYTES = 1 << 20

TRACE_EVENTS = 4096  # per column
TRACE_NOTE = 48
TRACE_DTYPE = np.dtype(
    [
        ("time_ns", "<u8"),
        ("seq", "<u8"),
        ("pid", "<i4"),
        ("what", "u1"),
        ("file", "u1"),
        ("pad", "u2"),
        ("pfn", "<u8"),
        ("npages", "<u8"),
        ("note", f"S{TRACE_NOTE}"),
    ]
)


class SharedState:
    """Numpy views over one MAP_SHARED anonymous mapping; fork after making it, and every child shares it."""

    def __init__(self, chunks: int = 1 << 16) -> None:
        sizes = [
            ("backed", -(-chunks // 8) * 8),
            ("counters", NCOLUMNS * COUNTER_SLOTS * 8),
            ("flags", FLAG_CELLS * 8),
            ("trace_heads", NCOLUMNS * 8),
            ("holders", NCOLUMNS * HOLDER_SLOTS * HOLDER_DTYPE.itemsize),
            ("trace", NCOLUMNS * TRACE_EVENTS * TRACE_DTYPE.itemsize),
            ("snapshot_heads", NCOLUMNS * SNAPSHOT_SLOTS * 2 * 8),
            ("snapshots", NCOLUMNS * SNAPSHOT_SLOTS * SNAPSHOT_BYTES),
        ]
        self._mapping = mmap.mmap(-1, sum(size for _, size in sizes), flags=mmap.MAP_SHARED)
        offset = 0
        views = {}
        for name, size in sizes:
            views[name] = memoryview(self._mapping)[offset : offset + size]
            offset += size
        # Which chunks of page records some process has backed (allocated in the image, stamped).
        self.backed = np.frombuffer(views["backed"], dtype=np.uint8)[:chunks]
        self.counters = np.frombuffer(views["counters"], dtype=np.int64).reshape(NCOLUMNS, COUNTER_SLOTS)
        self.flags = np.frombuffer(views["flags"], dtype=np.int64)
        self.trace_heads = np.frombuffer(views["trace_heads"], dtype=np.int64)
        self.holders = np.frombuffer(views["holders"], dtype=HOLDER_DTYPE).reshape(NCOLUMNS, HOLDER_SLOTS)
        self.trace = np.frombuffer(views["trace"], dtype=TRACE_DTYPE).reshape(NCOLUMNS, TRACE_EVENTS)
        # Byte views for the hot paths: a memoryview item costs a tenth of a numpy scalar.
        self.trace_bytes = views["trace"]
        # [slot] = (owner handle, length); 0 = free
        self.snapshot_heads = np.frombuffer(views["snapshot_heads"], dtype=np.int64).reshape(-1, 2)
        self.snapshots = views["snapshots"]
        self.flags[DEVICE_ALIVE] = 1
        # POSIX record locks on a file every serving process inherits: a holder that dies drops them.
        self._locks = os.memfd_create("pmemfs-locks", os.MFD_CLOEXEC)

    def counter_row(self, column: int) -> memoryview:
        return self.counters[column].data.cast("B").cast("q")

    def flag_cells(self) -> memoryview:
        return self.flags.data.cast("B").cast("q")

    def flag_bytes(self) -> memoryview:
        return self.flags.data.cast("B")

    def try_lock(self, which: int) -> bool:
        """Take lock ``which`` if no other process holds it; never waits."""
        try:
            fcntl.lockf(self._locks, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, which)
        except OSError:
            return False
        return True

    def unlock(self, which: int) -> None:
        fcntl.lockf(self._locks, fcntl.LOCK_UN, 1, which)

    @contextlib.contextmanager
    def locked(self, which: int) -> Iterator[None]:
        """Hold lock ``which``, waiting for it: only for a few stores, never around I/O."""
        fcntl.lockf(self._locks, fcntl.LOCK_EX, 1, which)
        try:
            yield
        finally:
            self.unlock(which)

    def counter_totals(self) -> dict[str, int]:
        totals = self.counters.sum(axis=0)
        return {name: int(totals[i]) for i, name in enumerate(COUNTERS)}

    # Snapshots.
    def take_snapshot_slot(self, column: int) -> int | None:
        first = column * SNAPSHOT_SLOTS
        free = np.flatnonzero(self.snapshot_heads[first : first + SNAPSHOT_SLOTS, 0] == 0)
        return first + int(free[0]) if len(free) else None

    def store_snapshot(self, slot: int, owner: int, data: bytes) -> None:
        if len(data) > SNAPSHOT_BYTES:
            marker = b"\n[truncated: the snapshot is larger than 1 MiB]\n"
            data = data[: SNAPSHOT_BYTES - len(marker)] + marker
        self.snapshots[slot * SNAPSHOT_BYTES : slot * SNAPSHOT_BYTES + len(data)] = data
        self.snapshot_heads[slot] = (owner, len(data))

    def load_snapshot(self, slot: int, owner: int) -> bytes | None:
        stored_owner, length = (int(v) for v in self.snapshot_heads[slot])
        if stored_owner != owner:
            return None
        return bytes(self.snapshots[slot * SNAPSHOT_BYTES : slot * SNAPSHOT_BYTES + length])

    def free_snapshot(self, slot: int, owner: int) -> None:
        if self.snapshot_heads[slot, 0] == owner:
            self.snapshot_heads[slot] = (0, 0)
