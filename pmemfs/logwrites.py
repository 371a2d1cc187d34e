"""The daemon's write log (``pmemfs mount --log-writes LOGFILE``): every store that reaches the media,
every flush, every mark, in completion order, in dm-log-writes' format (writelog.py).

What is logged, as the kernel's target logs a device's bios:
- a write to ``pmem0`` or a ``dax0`` writeback: a data entry holding the whole 512-byte sectors it
  touched as they are once it is stored (a write that is not sector-aligned, a buffered one, is
  widened with what the media holds around it);
- a zero (``pmemfs zero``, ``clear-errors``): DISCARD entries for its whole sectors, a data entry for
  a partial sector at either end. replay-log turns a DISCARD into BLKDISCARD on the device it
  replays to, or, where that fails (a file), into written zeros, but only up to 128 MiB at once
  (its max_zero_size; a larger one it skips), so a DISCARD entry is never larger than that. Zeros
  as data would make the log as large as the range zeroed;
- an fsync/fdatasync (msync of ``dax0`` reaches the daemon as one): a FLUSH entry, once the flush
  has returned. No entry ever has FUA: the daemon does not see a client's FUA (the loop driver
  sends it as a write and a flush), and every completed store is on the media anyway;
- ``pmemfs mark NAME``: a MARK entry; a clean unmount ends the log with ``dm-log-writes-end``, as
  the kernel's target does when it is removed.

Protocol (the log is shared by every serving process; cells in shared.py's ``writelog`` area):
- The log file is created by the daemon before the fork; every serving process writes it with
  pwrite at explicit offsets (its file position is never used).
- A logged store holds ``Lock.WRITELOG`` from before the store until its entry is committed:
  (1) check that the entry fits, else stop the log and fail the store with ENOSPC before anything
  is stored; (2) write the entry and its data at ``NEXT_BLOCK`` (not yet counted); (3) store into
  the media; (4) commit: advance ``NEXT_BLOCK``, count the entry, rewrite ``nr_entries`` in the
  super. So the log's order is the order in which stores completed, a store that fails leaves no
  entry (its bytes past ``NEXT_BLOCK`` are overwritten by the next one), and ``nr_entries`` is
  current at every moment: a daemon killed at any point (``pmemfs crash``) leaves a log that
  readers read up to the last committed entry. A store in flight at the kill may be on the media
  without its entry: it was never acknowledged, as a write in flight at a power cut.
  This is the one lock held around a store (as the kernel's target has one thread writing the
  log), and only while a log is asked for; it is never held around a flush or a wait.
- The last block under the size limit is kept for the mark that says where the log stopped:
  when an entry does not fit, the log writes ``pmemfs-log-full`` there, flags the super, and from
  then on every write and zero fails with ENOSPC (never a silent gap); flushes go on unlogged, as
  nothing can change the media any more.
- A process that dies holding the lock drops it (POSIX record lock); what it wrote past
  ``NEXT_BLOCK`` is not counted. The daemon goes down with it (serving.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from .errors import NoSpace, PmemfsError
from .region import Region
from .shared import Lock, SharedState
from .writelog import (
    CLOSED_CLEAN,
    DEFAULT_MAX_BYTES,
    DISCARD,
    END_MARK,
    FLUSH,
    FULL_MARK,
    MARK,
    PMEMFS_FLAGS_OFFSET,
    SECTOR_SIZE,
    STOPPED_FULL,
    SUPER_NR_ENTRIES_OFFSET,
    Recorded,
    check_mark_name,
    pack_entry,
    pack_super,
)

log = logging.getLogger("pmemfs")

# The cells, as int64 words of the shared ``writelog`` area.
NEXT_BLOCK, ENTRIES, WRITES, ZEROS, FLUSHES, MARKS, FULL = range(7)
# replay-log writes zeros for a DISCARD it cannot discard only up to this many bytes at once.
DISCARD_MAX_SECTORS = (128 << 20) // SECTOR_SIZE
IOV_BATCH = 512


class WriteLog:
    """The write log of one mount, shared by its serving processes (see the protocol above)."""

    def __init__(self, path: str, fd: int, region: Region, shared: SharedState, max_bytes: int) -> None:
        self.path = path
        self.fd = fd
        self.region = region
        self.max_bytes = max_bytes
        self.capacity_blocks = max_bytes // SECTOR_SIZE
        self._words = shared.array("writelog").data.cast("B").cast("q")
        self._lock = shared.lock(Lock.WRITELOG)

    @classmethod
    def create(cls, path: str, region: Region, shared: SharedState, max_bytes: int = DEFAULT_MAX_BYTES) -> WriteLog:
        """Create LOGFILE (never over an existing file: it may be the log of an earlier crash)."""
        if max_bytes < 4 * SECTOR_SIZE:
            raise PmemfsError(f"write log size limit {max_bytes} is too small: at least {4 * SECTOR_SIZE} bytes")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise PmemfsError(
                f"write log {path} already exists: pmemfs never writes over a log (remove it or name another)"
            ) from None
        except OSError as err:
            raise PmemfsError(f"cannot create write log {path}: {err.strerror}", errno=err.errno) from None
        geometry, header = region.geometry, region.header
        recorded = Recorded(
            geometry.data_size, geometry.size, geometry.align, geometry.mode, geometry.map, header.uuid, max_bytes
        )
        try:
            os.pwrite(fd, pack_super(0, recorded), 0)
        except OSError as err:
            os.close(fd)
            os.unlink(path)
            raise PmemfsError(f"cannot write write log {path}: {err.strerror}", errno=err.errno) from None
        write_log = cls(path, fd, region, shared, max_bytes)
        write_log._words[NEXT_BLOCK] = 1
        return write_log

    # The logged operations: what the tree and the sessions call instead of the region's.
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Store ``data`` at ``offset`` of the data area, and log it."""
        size = len(data)
        if not size:
            return
        first, end = offset // SECTOR_SIZE, -(-(offset + size) // SECTOR_SIZE)
        with self._lock:
            self._reserve(1 + end - first, f"the write at byte {offset} ({size} bytes)")
            # The whole sectors it lands in are logged: what the media holds around it (read before the
            # store, which the lock keeps from changing), then the data itself, both without a copy.
            head, tail = offset - first * SECTOR_SIZE, end * SECTOR_SIZE - offset - size
            staged = self._stage([(
                pack_entry(first, end - first, 0),
                self.region.read(first * SECTOR_SIZE, head) if head else b"",
                data,
                self.region.read(offset + size, tail) if tail else b"",
            )])  # fmt: skip
            self.region.write(offset, data)
            self._commit(staged, 1, WRITES)

    def zero(self, offset: int, length: int, *, flush: bool = True) -> None:
        """Zero [offset, +length) of the data area and log it; then flush (logged too), unless the
        caller flushes later (Region.zero's contract)."""
        first_whole, end_whole = -(-offset // SECTOR_SIZE), (offset + length) // SECTOR_SIZE
        first, end = offset // SECTOR_SIZE, -(-(offset + length) // SECTOR_SIZE)
        with self._lock:
            partial = [s for s in sorted({first, end - 1}) if not first_whole <= s < end_whole]
            whole = [
                (s, min(DISCARD_MAX_SECTORS, end_whole - s)) for s in range(first_whole, end_whole, DISCARD_MAX_SECTORS)
            ]
            self._reserve(2 * len(partial) + len(whole), f"the zero of {offset}+{length}")
            pieces: list[tuple[bytes | bytearray | memoryview, ...]] = []
            for sector in partial:
                # What the partial sector holds once the zero is done.
                content = self._sectors(sector, sector + 1)
                lo, hi = max(offset, sector * SECTOR_SIZE), min(offset + length, (sector + 1) * SECTOR_SIZE)
                content[lo - sector * SECTOR_SIZE : hi - sector * SECTOR_SIZE] = bytes(hi - lo)
                pieces.append((pack_entry(sector, 1, 0), content))
            pieces += [(pack_entry(sector, count, DISCARD), b"") for sector, count in whole]
            staged = self._stage(pieces)
            self.region.zero(offset, length, flush=False)
            self._commit(staged, len(pieces), ZEROS)
        if flush:
            self.flush()

    def flush(self) -> None:
        """Flush the media, then log the flush (it covers every store logged before it)."""
        self.region.flush()
        with self._lock:
            if self._words[FULL] or not self._fits(1):
                self._stop("a flush")
                return  # the media is flushed: nothing can change it any more, so nothing is lost
            self._commit(self._stage([(pack_entry(0, 0, FLUSH), b"")]), 1, FLUSHES)

    def mark(self, name: str) -> None:
        """Add the mark ``name`` (``pmemfs mark``, xfstests' ``_log_writes_mark``)."""
        text = check_mark_name(name)
        with self._lock:
            self._reserve(1, f"the mark {name!r}")
            self._commit(self._stage([(pack_entry(0, 0, MARK, text), b"")]), 1, MARKS)

    # The protocol's steps; every one of them under the lock.
    def _fits(self, blocks: int) -> bool:
        # The last block is kept for the mark that says where the log stopped.
        return self._words[NEXT_BLOCK] + blocks + 1 <= self.capacity_blocks

    def _reserve(self, blocks: int, what: str) -> None:
        if self._words[FULL]:
            raise NoSpace(f"the write log {self.path} is full: {what} was refused (the log ends with {FULL_MARK!r})")
        if not self._fits(blocks):
            self._stop(what)
            raise NoSpace(
                f"the write log {self.path} is full ({self.max_bytes} bytes): {what} was refused, and the log "
                f"ends there with the mark {FULL_MARK!r}"
            )

    def _sectors(self, first: int, end: int) -> bytearray:
        return bytearray(self.region.read(first * SECTOR_SIZE, (end - first) * SECTOR_SIZE))

    def _stage(self, pieces: Sequence[tuple[bytes | bytearray | memoryview, ...]]) -> int:
        """Write entries and their data at NEXT_BLOCK, uncounted; return the block after them. A log
        whose filesystem cannot take them stops (ENOSPC for the store, which has not happened)."""
        at = self._words[NEXT_BLOCK]
        buffers = [buffer for piece in pieces for buffer in piece if len(buffer)]
        lengths = list(map(len, buffers))
        length = sum(lengths)
        written, reason = 0, ""
        # A zero of a huge range has thousands of DISCARD entries: pwritev takes at most IOV_MAX buffers.
        for group in range(0, len(buffers), IOV_BATCH):
            try:
                done = os.pwritev(self.fd, buffers[group : group + IOV_BATCH], at * SECTOR_SIZE + written)
            except OSError as err:
                reason = str(err.strerror)
                break
            written += done
            if done != sum(lengths[group : group + IOV_BATCH]):
                reason = f"{written} of {length} bytes written"
                break
        if written != length:
            self._stop("an entry", f"the log's filesystem refused it: {reason}")
            raise NoSpace(f"the write log {self.path} cannot grow ({reason}): the log stopped there")
        return at + length // SECTOR_SIZE

    def _commit(self, end: int, entries: int, counter: int) -> None:
        """Count the staged entries, which end at block ``end``: from here on readers replay them."""
        self._words[NEXT_BLOCK] = end
        self._words[ENTRIES] += entries
        self._words[counter] += entries
        self._write_nr_entries()

    def _write_nr_entries(self) -> None:
        os.pwrite(self.fd, self._words[ENTRIES].to_bytes(8, "little"), SUPER_NR_ENTRIES_OFFSET)

    def _stop(self, what: str, reason: str = "") -> None:
        """Stop the log for good: the mark in the block kept for it, the flag in the super."""
        if self._words[FULL]:
            return
        self._words[FULL] = 1
        log.warning(
            "write log %s is full after %d entries: %s was refused%s; every write fails with ENOSPC from now on",
            self.path, self._words[ENTRIES], what, f" ({reason})" if reason else "",
        )  # fmt: skip
        at = self._words[NEXT_BLOCK]
        try:
            os.pwrite(self.fd, pack_entry(0, 0, MARK, FULL_MARK.encode()), at * SECTOR_SIZE)
            self._commit(at + 1, 1, MARKS)
        except OSError:
            pass  # the filesystem under the log is full too: the super's flag says it all the same
        self._set_flag(STOPPED_FULL)

    def _set_flag(self, flag: int) -> None:
        flags = int.from_bytes(os.pread(self.fd, 4, PMEMFS_FLAGS_OFFSET), "little")
        os.pwrite(self.fd, (flags | flag).to_bytes(4, "little"), PMEMFS_FLAGS_OFFSET)

    def close(self, *, clean: bool) -> None:
        """A clean unmount ends the log with the kernel's end mark and flags it closed; a crash
        leaves it as the last commit left it."""
        try:
            if clean:
                with self._lock:
                    if not self._words[FULL] and self._fits(1):
                        self._commit(self._stage([(pack_entry(0, 0, MARK, END_MARK.encode()), b"")]), 1, MARKS)
                    self._set_flag(CLOSED_CLEAN)
                os.fsync(self.fd)
        finally:
            os.close(self.fd)

    def statistics(self) -> dict[str, object]:
        words = self._words
        return {
            "path": self.path,
            "entries": words[ENTRIES],
            "bytes": words[NEXT_BLOCK] * SECTOR_SIZE,
            "max_bytes": self.max_bytes,
            "writes": words[WRITES],
            "zero_entries": words[ZEROS],
            "flushes": words[FLUSHES],
            "marks": words[MARKS],
            "full": bool(words[FULL]),
        }
