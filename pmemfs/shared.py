"""The coordination layer: the memory every serving process shares, declared once, and its one lock.

Protocol (what every module that touches this memory relies on):

- **Made before the fork.** One MAP_SHARED anonymous mapping laid out by ``LAYOUT``, a memfd for
  locks and one for snapshot bytes. Every serving process forked later sees the same bytes; none
  of it outlives the daemon (what must survive is in the image: region.py, infoblock.py).
- **Columns.** Process ``c`` (0 is the parent, 1..``MAX_WORKERS`` the forked serving processes)
  is the only writer of column ``c`` of the counters, the trace rings, the holder table and the
  registry records' refcount words. Readers sum or merge the columns. A writer that dies leaves
  its column as it was; the daemon goes down with it (serving.py), so nothing reads it for long.
- **Single-byte and single-cell writers.** Each condition of the I/O gate owns one byte of one
  cell and is written alone, so that two processes changing different conditions never undo each
  other; such stores need no lock.
- **Read-modify-writes** of anything several processes change (the device reference and the
  opens hold, the I/O trace switch, which record chunks are backed, the snapshot slots, the
  badblocks table in the image header) happen under a :class:`CrossProcessLock`: a POSIX record
  lock on one byte of the lock memfd per :class:`Lock`. A holder that dies drops it with it, and
  a process can tell whether anyone holds one (the zero gate uses that to reopen after its
  holder died). The one other lock of the daemon is ``flock`` on the image (region.py), which
  keeps a second daemon away, not serving processes apart.
- **Ordering** between a transfer and an operation that must see it (teardown, zero) is store
  then ``membarrier`` on the rare side (membarrier.py, used by the primitives that need it).

The primitives built on this memory, each owning its cells: the device reference and the opens
hold (device.py), the I/O gate and the zero gate (gates.py), the holder table (holders.py), the
trace rings (trace.py), the snapshot slots (snapshots.py), the file-handle codec (handles.py),
the counters (counters.py), the write log's cells (logwrites.py) and :class:`Generation` here.
"""

from __future__ import annotations

import ctypes
import enum
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from .limits import COLUMNS, MAX_WORKERS  # noqa: F401  (the layout's one dimension)

# Python names it from 3.12 on; 0x4000 is Linux's value on x86-64 and arm64.
MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000)

COUNTER_SLOTS = 32
HOLDER_SLOTS = 1024  # per column
TRACE_EVENTS = 4096  # per column
TRACE_NOTE = 48
# Control-file snapshots at once, over all serving processes (the file handle's slot field holds slot + 1).
SNAPSHOT_SLOTS = 4095
# The write log's cells (logwrites.py): where the next entry goes, how many are committed, counters.
WRITELOG_WORDS = 8

# The cells: one row of named int64 words. The I/O gate is one word that the I/O path reads at
# once (0: nothing to check) and that three conditions write a byte each: the overlap is declared
# here, and nowhere else.
CELLS_DTYPE = np.dtype(
    {
        "names": [
            "device_alive",  # 1 while new pins are allowed (the dev_pagemap reference is live)
            "device_killer",  # the session that killed the device reference (only it revives)
            "badblocks_generation",  # bumped by every change of the badblocks table
            "opens_held",  # the session of an unmount holding new opens of pmem0/dax0 back, or 0
            "trace_io",  # the session that asked for every I/O transfer to be traced, or 0
            "io_gate",  # nonzero while any of the three conditions below holds
            "gate_device_dead",
            "gate_tracing_io",
            "gate_zeroing",
            "zeroing_first",  # the pages [first, end) that the zero under way keeps transfers out of
            "zeroing_end",
        ],
        "formats": ["<i8"] * 6 + ["u1"] * 3 + ["<i8"] * 2,
        "offsets": [0, 8, 16, 24, 32, 40, 40, 41, 42, 48, 56],
        "itemsize": 64,
    }
)
# What the holder table and the trace rings store for a file: its index here.
FILES = ("", "pmem0", "dax0")
HOLDER_DTYPE = np.dtype(
    [
        ("in_use", "u1"),  # written last when a slot is filled: readers skip a slot until it is whole
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
# A snapshot slot: (owner handle, heap offset, length); owner 0 = free, -1 = claimed, not written yet.
SNAPSHOT_DTYPE = np.dtype([("owner", "<i8"), ("offset", "<i8"), ("length", "<i8")])


@dataclass(frozen=True)
class Area:
    """One named array of the shared mapping."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def layout(record_chunks: int, image_pages: int) -> tuple[Area, ...]:
    """The shared mapping, in order: ``record_chunks`` chunks of page records (records.py) and
    ``image_pages`` pages of image size the device has."""
    return (
        Area("cells", CELLS_DTYPE, ()),
        Area("counters", np.dtype("<i8"), (COLUMNS, COUNTER_SLOTS)),
        Area("trace_heads", np.dtype("<i8"), (COLUMNS,)),
        Area("holders", HOLDER_DTYPE, (COLUMNS, HOLDER_SLOTS)),
        Area("trace", TRACE_DTYPE, (COLUMNS, TRACE_EVENTS)),
        # The last row holds the snapshot heap's end.
        Area("snapshots", SNAPSHOT_DTYPE, (SNAPSHOT_SLOTS + 1,)),
        # Which chunks of page records some process has backed (records.py): unbacked, image, spill.
        Area("backed", np.dtype("u1"), (record_chunks,)),
        # Which pages of the image are known to have their blocks (region.py, "Allocation").
        Area("known", np.dtype("u1"), (image_pages,)),
        # The write log's cells, changed only under Lock.WRITELOG (logwrites.py).
        Area("writelog", np.dtype("<i8"), (WRITELOG_WORDS,)),
    )


class Lock(enum.IntEnum):
    """Every cross-process lock: the byte of the lock memfd it takes."""

    ZEROING = 0  # held by the serving process whose zero is under way, for as long as it runs
    FLAGS = 1  # the device reference, the opens hold and the I/O trace switch: check, then write
    BACKING = 2  # a chunk of page records goes from unbacked to backed (image or spill)
    SNAPSHOTS = 3  # a snapshot slot is claimed, or heap space handed out, or a row swapped
    BADBLOCKS = 4  # the badblocks table in the image header is read or rewritten
    WRITELOG = 5  # a logged store and its log entry: reserve, store, commit (logwrites.py)


class CrossProcessLock:
    """A POSIX record lock on one byte of a file that every serving process inherits.

    Hold it only for a few stores or one small write, never around a flush or a wait. Not
    reentrant within a process (POSIX locks belong to the process: an inner unlock would drop the
    outer hold), which ``held_here`` asserts.
    """

    def __init__(self, fd: int, which: Lock) -> None:
        self._fd = fd
        self.which = which
        # The pid that holds it, as far as this process knows: a child forked while its parent
        # held the lock does not hold it (POSIX locks are not inherited), though it has this object.
        self._held_by = 0
        self.acquisitions = 0
        self.contended = 0

    @property
    def held_here(self) -> bool:
        return self._held_by == os.getpid()

    def acquire(self) -> None:
        assert not self.held_here, f"lock {self.which.name} taken twice by one process"
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.which)
        except OSError:
            self.contended += 1
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self.which)
        self._held_by = os.getpid()
        self.acquisitions += 1

    def try_acquire(self) -> bool:
        """Take it if no other process holds it; never waits."""
        assert not self.held_here, f"lock {self.which.name} taken twice by one process"
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.which)
        except OSError:
            return False
        self._held_by = os.getpid()
        self.acquisitions += 1
        return True

    def release(self) -> None:
        self._held_by = 0
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self.which)

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def holder_pid(self) -> int | None:
        """The process that holds it now, or None (F_GETLK: what another process would wait for)."""
        if self.held_here:
            return os.getpid()
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, int(self.which), 1, 0)
        answer = fcntl.fcntl(self._fd, fcntl.F_GETLK, query)
        kind, _, _, _, pid = struct.unpack(_FLOCK, answer)
        return None if kind == fcntl.F_UNLCK else pid

    def statistics(self) -> dict[str, object]:
        """This process's view: how often it took the lock and had to wait, and who holds it."""
        return {"acquisitions": self.acquisitions, "contended": self.contended, "holder_pid": self.holder_pid()}


# struct flock on Linux x86-64 and arm64: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = "hhqqi" + "x" * (ctypes.sizeof(ctypes.c_long) - 4)


class Generation:
    """A counter that every change of some shared thing bumps (under that thing's lock), so that
    a process can tell cheaply whether what it read before is still current."""

    def __init__(self, words: memoryview, index: int) -> None:
        # A per-request check reads ``words[index]`` itself: a method call costs more than the check.
        self.words = words
        self.index = index

    def current(self) -> int:
        return self.words[self.index]

    def bump(self) -> None:
        """Call under the lock that guards the thing: a read-modify-write."""
        self.words[self.index] += 1

    def changed(self, seen: int) -> bool:
        return self.words[self.index] != seen

    def statistics(self) -> dict[str, int]:
        return {"generation": self.current()}


class SharedState:
    """The shared mapping as named numpy arrays (see ``layout``), and the locks; fork after making it."""

    def __init__(self, record_chunks: int = 1 << 16, image_pages: int = 0) -> None:
        self.areas = layout(record_chunks, image_pages)
        # Untouched pages cost nothing: reserve no swap for them (a 1 TiB image has 4 MiB of `backed`).
        size = sum(-(-area.nbytes // 8) * 8 for area in self.areas)
        self._mapping = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | MAP_NORESERVE)
        self._arrays: dict[str, np.ndarray] = {}
        offset = 0
        for area in self.areas:
            view = memoryview(self._mapping)[offset : offset + area.nbytes]
            self._arrays[area.name] = np.frombuffer(view, dtype=area.dtype).reshape(area.shape)
            offset += -(-area.nbytes // 8) * 8
        self.cells = self._arrays["cells"]
        self.cells["device_alive"] = 1
        # Cells as plain int64 words and bytes, for the hot paths: a memoryview item costs a tenth
        # of a numpy scalar. Which word or byte a cell is comes from CELLS_DTYPE (``cell_word``).
        raw = self.cells.reshape(1).view(np.uint8).data
        self.words = raw.cast("q")
        self.bytes = raw
        self.lock_fd = os.memfd_create("pmemfs-locks", os.MFD_CLOEXEC)
        self.snapshot_heap = os.memfd_create("pmemfs-snapshots", os.MFD_CLOEXEC)
        self.locks = {which: CrossProcessLock(self.lock_fd, which) for which in Lock}
        self.badblocks_generation = Generation(self.words, cell_word("badblocks_generation"))

    def array(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def lock(self, which: Lock) -> CrossProcessLock:
        return self.locks[which]

    def statistics(self) -> dict[str, object]:
        return {"locks": {which.name.lower(): lock.statistics() for which, lock in self.locks.items()}}


def cell_word(name: str) -> int:
    """The index of cell ``name`` among the cells' int64 words."""
    offset = CELLS_DTYPE.fields[name][1]  # type: ignore[index]
    assert offset % 8 == 0 and CELLS_DTYPE.fields[name][0].itemsize == 8  # type: ignore[index]
    return int(offset // 8)


def cell_byte(name: str) -> int:
    """The byte offset of one-byte cell ``name``."""
    dtype, offset = CELLS_DTYPE.fields[name][:2]  # type: ignore[index]
    assert dtype.itemsize == 1
    return int(offset)
