"""Poisoned sectors of the data area, as the kernel's badblocks list and pmem driver treat them.

A read that touches a bad sector fails with EIO and returns nothing; a write that covers bad
sectors whole stores and clears them (pmem_clear_poison), and one that fails to store leaves them
bad; a write that covers one only in part fails with EIO. Extents are 512-byte sectors relative
to the data area, merged, and persisted in the image header on every change, so they survive umount and kill -9.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator
from typing import Protocol

from .errors import InvalidRange, MediaError, NoSpace
from .infoblock import BADBLOCKS_MAX, SECTOR_SIZE
from .shared import Lock, SharedState

Extent = tuple[int, int]  # (first sector, sector count)


class BadBlockStore(Protocol):
    """Where the table lives (the image header). Every serving process has its own BadBlocks over one store."""

    def load(self) -> tuple[Extent, ...]: ...
    def save(self, extents: tuple[Extent, ...]) -> None: ...


class MemoryStore:
    """A store for one process (tests, offline tools)."""

    def __init__(self, extents: tuple[Extent, ...] = ()) -> None:
        self.extents = extents
        self.saved: list[tuple[Extent, ...]] = []

    def load(self) -> tuple[Extent, ...]:
        return self.extents

    def save(self, extents: tuple[Extent, ...]) -> None:
        self.extents = extents
        self.saved.append(extents)


class BadBlocks:
    """This process's copy of the table, kept current through the shared generation.

    Protocol: the table is read and rewritten only under ``Lock.BADBLOCKS``; a change bumps the
    shared generation before the lock is let go. The I/O path compares the generation with the one
    it last loaded (one memoryview read) and loads the table again, under the lock, when it moved.
    """

    def __init__(self, nsectors: int, store: BadBlockStore, shared: SharedState | None = None) -> None:
        shared = shared or SharedState(record_chunks=0)
        self.nsectors = nsectors
        self.store = store
        self._generation = shared.badblocks_generation
        self._generation_words, self._generation_index = self._generation.words, self._generation.index
        self._lock = shared.lock(Lock.BADBLOCKS)
        self._reload()

    def _reload(self) -> None:
        with self._lock:
            self._load()

    def _load(self) -> None:
        self._seen = self._generation.current()
        self.extents = _merged(self.store.load())
        self._starts = [start for start, _ in self.extents]

    @property
    def generation_cell(self) -> tuple[memoryview, int]:
        """The shared generation's words and index: a reader that saw the table empty at one value
        may skip ``changed_or_bad`` while the word still holds it (the compiled data path does)."""
        return self._generation_words, self._generation_index

    def changed_or_bad(self) -> bool:
        """The I/O path's test: True when some sector is bad (after picking up another process's change)."""
        if self._generation_words[self._generation_index] != self._seen:
            self._reload()
        return bool(self.extents)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[list[Extent]]:
        """Change the table as the only writer, starting from what every process last wrote."""
        with self._lock:
            self._load()
            extents = list(self.extents)
            yield extents
            merged = _merged(extents)
            if merged != self.extents:
                if len(merged) > BADBLOCKS_MAX:
                    raise NoSpace(f"the badblocks table is full ({BADBLOCKS_MAX} extents)")
                self.store.save(tuple(merged))
                self._generation.bump()
            self._load()

    @property
    def sector_count(self) -> int:
        self.changed_or_bad()
        return sum(count for _, count in self.extents)

    def _check(self, sector: int, count: int) -> None:
        if sector < 0 or count <= 0 or sector + count > self.nsectors:
            raise InvalidRange(f"sectors {sector}+{count} are outside the data area ({self.nsectors} sectors)")

    def add(self, sector: int, count: int) -> None:
        self._check(sector, count)
        with self._changing() as extents:
            extents.append((sector, count))

    def clear(self, sector: int, count: int) -> None:
        self._check(sector, count)
        end = sector + count
        with self._changing() as extents:
            kept: list[Extent] = []
            for start, n in extents:
                if start < sector:
                    kept.append((start, min(n, sector - start)))
                if start + n > end:
                    kept.append((max(start, end), start + n - max(start, end)))
            extents[:] = kept

    def clear_all(self) -> None:
        with self._changing() as extents:
            extents.clear()

    def overlapping(self, sector: int, count: int) -> list[Extent]:
        """The bad extents, clipped to [sector, sector + count)."""
        end = sector + count
        i = max(bisect.bisect_right(self._starts, sector) - 1, 0)
        found = []
        for start, n in self.extents[i:]:
            if start >= end:
                break
            lo, hi = max(start, sector), min(start + n, end)
            if lo < hi:
                found.append((lo, hi - lo))
        return found

    # The I/O path. Callers test ``changed_or_bad()`` first, so an empty table costs next to nothing.
    def check_read(self, offset: int, length: int) -> None:
        first, end = offset // SECTOR_SIZE, -(-(offset + length) // SECTOR_SIZE)
        bad = self.overlapping(first, end - first)
        if bad:
            raise MediaError(f"read of bytes {offset}+{length} hits bad sector {bad[0][0]}")

    def check_write(self, offset: int, length: int) -> bool:
        """Whether a write covers bad sectors (all whole: it will clear them once stored); EIO if it
        covers one only in part, which nothing can clear."""
        first, end = offset // SECTOR_SIZE, -(-(offset + length) // SECTOR_SIZE)
        bad = self.overlapping(first, end - first)
        whole_first, whole_end = -(-offset // SECTOR_SIZE), (offset + length) // SECTOR_SIZE
        for start, n in bad:
            if start < whole_first or start + n > whole_end:
                raise MediaError(
                    f"write of bytes {offset}+{length} covers bad sector {max(start, whole_end)} only in part"
                )
        return bool(bad)

    def clear_written(self, offset: int, length: int) -> None:
        """Clear the bad sectors under a write that has been stored (checked by check_write)."""
        first, end = offset // SECTOR_SIZE, -(-(offset + length) // SECTOR_SIZE)
        self.clear(first, end - first)

    def clear_whole_sectors(self, offset: int, length: int) -> None:
        """Forget the bad sectors that lie whole inside a byte range (it has just been zeroed)."""
        first, end = -(-offset // SECTOR_SIZE), (offset + length) // SECTOR_SIZE
        self.changed_or_bad()
        if end > first and self.overlapping(first, end - first):
            self.clear(first, end - first)

    def sysfs(self) -> bytes:
        self.changed_or_bad()  # another serving process may have changed the table
        return "".join(f"{start} {count}\n" for start, count in self.extents).encode()

    def store_sysfs(self, text: bytes) -> None:
        """Parse a write to ``.pmemfs/badblocks`` like /sys/block/pmemN/badblocks: "<sector> <count>"."""
        try:
            words = text.decode("ascii").split()
        except UnicodeDecodeError:
            raise InvalidRange("badblocks: write '<sector> <count>'") from None
        # Bounded before int(): a sector number has at most 20 digits (2^64), and int() of a
        # string past 4300 digits raises.
        if len(words) != 2 or not all(w.isdigit() and len(w) <= 20 for w in words):
            raise InvalidRange("badblocks: write '<sector> <count>' with two non-negative integers")
        sector, count = int(words[0]), int(words[1])
        if count > 2**31 - 1:
            raise InvalidRange(f"badblocks: count {count} is too large")
        self.add(sector, count)


def _merged(extents: list[Extent] | tuple[Extent, ...]) -> list[Extent]:
    merged: list[Extent] = []
    for start, count in sorted(extents):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            last_start, last_count = merged[-1]
            merged[-1] = (last_start, max(last_count, start + count - last_start))
        else:
            merged.append((start, count))
    return merged
