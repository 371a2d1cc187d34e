"""State that every serving process sees: one anonymous shared mapping and two memfds, made before the fork.

Requests land in any serving process, so whatever must be exact across them lives here. Most of it
needs no lock: each process writes only its own row of counters and its own trace ring and holder
slots (column = its index), and readers sum or merge. The few cells that several processes change
with a read-modify-write (device reference, held opens, which records are backed, the snapshot
slots and heap) change under a POSIX record lock on one memfd, byte ``*_LOCK`` of it: a
holder that dies drops its lock with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator

import numpy as np

from .holes import punch_hole

# Python names it from 3.12 on; 0x4000 is Linux's value on x86-64 and arm64.
MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000)
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
IO_COUNTERS = (
    "reads",
    "writes",
    "read_bytes",
    "write_bytes",
    "direct_reads",
    "direct_writes",
    "fsyncs",
    "errors",
    "internal_errors",
)
# Opens and releases of pmem0/dax0, counted where they land: the difference is what is open now.
HANDLE_COUNTERS = ("data_opens", "data_releases")
COUNTERS = REGISTRY_COUNTERS + IO_COUNTERS + HANDLE_COUNTERS
COUNTER = {name: i for i, name in enumerate(COUNTERS)}
COUNTER_SLOTS = 24
assert len(COUNTERS) <= COUNTER_SLOTS

# Cells of `flags`.
DEVICE_ALIVE = 0  # 1 while new pins are allowed (the dev_pagemap reference is live)
DEVICE_KILLER = 1  # the session that killed the device reference, revived when it closes
BADBLOCKS_GENERATION = 2  # bumped by every change of the badblocks table
# Nonzero (the id of the session that asked) while an unmount holds new opens of pmem0/dax0 back
# to find out whether any is open: opens wait until it goes on (then ENXIO) or backs off.
OPENS_HELD = 3
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
BACKING_LOCK = 3  # held while a chunk of page records goes from unbacked to backed (image or spill)
SNAPSHOT_LOCK = 4  # held while a snapshot slot is claimed or heap space is handed out

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
# serving process that gets the next read of it: a slot (owner handle, offset, length) in a table
# every process sees, and the bytes in a memfd that grows as needed, so a snapshot of any size is
# read whole whichever process answers. Freed space is punched out of the memfd.
SNAPSHOT_SLOTS = 4095  # at once, over all serving processes (a file handle has 12 bits for slot + 1)
SNAPSHOT_ALIGN = 4096

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
            ("snapshot_heads", (SNAPSHOT_SLOTS + 1) * 3 * 8),
        ]
        # Untouched pages cost nothing: reserve no swap for them (a 1 TiB image has 4 MiB of `backed`).
        self._mapping = mmap.mmap(-1, sum(size for _, size in sizes), flags=mmap.MAP_SHARED | MAP_NORESERVE)
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
        # [slot] = (owner handle, heap offset, length); owner 0 = free, -1 = claimed, not written yet.
        # The last row holds the heap's end.
        heads = np.frombuffer(views["snapshot_heads"], dtype=np.int64).reshape(-1, 3)
        self.snapshot_heads, self._heap_end = heads[:SNAPSHOT_SLOTS], heads[SNAPSHOT_SLOTS]
        self._snapshot_heap = os.memfd_create("pmemfs-snapshots", os.MFD_CLOEXEC)
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
        """Hold lock ``which``, waiting for it: only for a few stores, or one small write (backing a
        chunk of records, storing a snapshot row), never around a flush or a wait."""
        fcntl.lockf(self._locks, fcntl.LOCK_EX, 1, which)
        try:
            yield
        finally:
            self.unlock(which)

    def counter_totals(self) -> dict[str, int]:
        totals = self.counters.sum(axis=0)
        return {name: int(totals[i]) for i, name in enumerate(COUNTERS)}

    def open_data_files(self) -> int:
        """pmem0/dax0 handles open now, over all serving processes (a mapping holds one until unmapped)."""
        totals = self.counter_totals()
        return totals["data_opens"] - totals["data_releases"]

    # Snapshots.
    def claim_snapshot_slot(self) -> int | None:
        """A free slot for a control handle, or None when every slot is taken."""
        with self.locked(SNAPSHOT_LOCK):
            free = np.flatnonzero(self.snapshot_heads[:, 0] == 0)
            if not len(free):
                return None
            slot = int(free[0])
            self.snapshot_heads[slot] = (-1, 0, 0)
            return slot

    def store_snapshot(self, slot: int, owner: int, data: bytes) -> None:
        """Make ``data`` what every process reads for handle ``owner`` in ``slot``, replacing what was there."""
        size = -(-len(data) // SNAPSHOT_ALIGN) * SNAPSHOT_ALIGN
        with self.locked(SNAPSHOT_LOCK):
            # A bump allocator over a sparse file: offsets are never reused, space is punched back.
            offset = int(self._heap_end[0])
            self._heap_end[0] = offset + size
        if data:
            os.pwrite(self._snapshot_heap, data, offset)
        # The row changes under the lock that readers take: none sees a row half old, half new, or
        # reads space being punched; of two stores at once, each punches what it replaced.
        with self.locked(SNAPSHOT_LOCK):
            _, old_offset, old_length = (int(v) for v in self.snapshot_heads[slot])
            self.snapshot_heads[slot] = (owner, offset, len(data))
            self._punch(old_offset, old_length)

    def load_snapshot(self, slot: int, owner: int, start: int = 0, size: int | None = None) -> bytes | None:
        """Bytes [start, start + size) of the snapshot of handle ``owner`` (None: not its slot any more)."""
        with self.locked(SNAPSHOT_LOCK):
            stored_owner, offset, length = (int(v) for v in self.snapshot_heads[slot])
            if stored_owner != owner:
                return None
            size = length - start if size is None else min(size, length - start)
            return os.pread(self._snapshot_heap, size, offset + start) if size > 0 else b""

    def free_snapshot(self, slot: int, owner: int) -> None:
        with self.locked(SNAPSHOT_LOCK):
            stored_owner, offset, length = (int(v) for v in self.snapshot_heads[slot])
            if stored_owner not in (owner, -1):
                return
            self.snapshot_heads[slot] = (0, 0, 0)
            self._punch(offset, length)

    def _punch(self, offset: int, length: int) -> None:
        if length:
            size = -(-length // SNAPSHOT_ALIGN) * SNAPSHOT_ALIGN
            punch_hole(self._snapshot_heap, offset, size)
