"""The image on the host: create it sparse, open it under an exclusive lock, map it, load and store.

This is the only module that touches the backing file. It knows nothing of FUSE.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import mmap
import os
import stat
import time
import uuid as uuidlib

import numpy as np

from .errors import CorruptImage, ImageBusy, NoSpace, PmemfsError, UsageError
from .holes import data_extents, punch_hole
from .infoblock import (
    BADBLOCKS_MAX,
    FLAG_CLEAN,
    HEADER_BLOCK_SIZE,
    HEADER_OFFSET,
    INFOBLOCK_OFFSET,
    INFOBLOCK_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    RESERVED_HEAD,
    SECTOR_SIZE,
    Geometry,
    Header,
    HeaderBlock,
    InfoBlock,
)
from .ranges import runs
from .records import chunks_for
from .shared import Lock, SharedState

# A filesystem that cannot punch holes has the carve-out zeroed by reading it this much at a time.
ZERO_SCAN_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What an image says about itself, read without taking its lock."""

    path: str
    file_size: int
    header: Header
    infoblock: InfoBlock
    geometry: Geometry

    def as_dict(self) -> dict[str, object]:
        return {"image": self.path, **self.geometry.as_dict(), **self.header.as_dict()}


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_image(path: str, *, writable: bool = False, create: bool = False, exclusive: bool = False) -> int:
    """Open a file the user named as an image, or say in one line why it is not one.

    Never blocks and never changes what is there: a FIFO, a device or a directory is refused from
    its stat, before it is opened (opening some devices has effects of its own), and again from the
    open fd in case the path changed in between. ``create`` makes a missing file (``exclusive``: only
    a missing one); nothing here truncates.
    """
    verb = "create" if create else "open"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if not create:
            raise PmemfsError(f"cannot open {path}: {os.strerror(errno.ENOENT)}", errno=errno.ENOENT) from None
    except OSError as err:
        raise PmemfsError(f"cannot {verb} {path}: {err.strerror}", errno=err.errno) from None
    else:
        if exclusive:
            raise UsageError(f"{path} already exists: pass --force to overwrite it")
        _refuse_unless_regular(mode, path)
    flags = os.O_RDWR if writable else os.O_RDONLY
    if create:
        flags |= os.O_CREAT | (os.O_EXCL if exclusive else 0)
    # O_NONBLOCK: an open that would wait (a FIFO that raced in, a file under a lease) fails instead.
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} already exists: pass --force to overwrite it") from None
    except OSError as err:
        raise PmemfsError(f"cannot {verb} {path}: {err.strerror}", errno=err.errno) from None
    try:
        _refuse_unless_regular(os.fstat(fd).st_mode, path)
        # A regular file from here on: give it ordinary blocking I/O, as the memmap and pread expect.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except OSError as err:
        os.close(fd)
        raise PmemfsError(f"cannot {verb} {path}: {err.strerror}", errno=err.errno) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refuse_unless_regular(mode: int, path: str) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise PmemfsError(f"{path} is {kind}, not a pmemfs image")


def create_image(path: str, size: int, *, mode: str, map: str, align: int, force: bool) -> ImageInfo:
    """Write a new sparse image: header and info block only, every other byte a hole."""
    geometry = Geometry.compute(size, mode=mode, map=map, align=align)
    uuid = uuidlib.uuid4().bytes
    header = Header.for_geometry(geometry, uuid, time.time_ns())
    fd = open_image(path, writable=True, create=True, exclusive=not force)
    try:
        # Only once the lock is ours may the old contents go: a daemon serving this file holds it,
        # and a truncate before the lock would take every byte from under that daemon.
        lock_image(fd, path)
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        os.pwrite(fd, HeaderBlock.initial(header), HEADER_OFFSET)
        os.pwrite(fd, InfoBlock.for_geometry(geometry, uuid).pack(), INFOBLOCK_OFFSET)
        os.fsync(fd)
    except OSError as err:
        raise PmemfsError(f"cannot write {path}: {err.strerror}", errno=err.errno) from None
    finally:
        os.close(fd)
    return read_image_info(path)


def read_image_info(path: str) -> ImageInfo:
    """Decode and validate the header and info block; raise CorruptImage naming the bad field."""
    fd = open_image(path)
    try:
        return _read_info(fd, path)
    finally:
        os.close(fd)


def _read_info(fd: int, path: str) -> ImageInfo:
    try:
        file_size = os.fstat(fd).st_size
        head = os.pread(fd, INFOBLOCK_OFFSET + INFOBLOCK_SIZE, 0)
    except OSError as err:
        raise PmemfsError(f"cannot read {path}: {err.strerror}", errno=err.errno) from None
    if file_size < RESERVED_HEAD:
        raise CorruptImage(f"{path}: the file has {file_size} bytes, too short to be a pmemfs image")
    try:
        header = HeaderBlock.decode(head[:HEADER_BLOCK_SIZE]).header
        infoblock = InfoBlock.unpack(head[INFOBLOCK_OFFSET:])
        if header.image_size != file_size:
            raise CorruptImage(f"header: image_size {header.image_size} but the file has {file_size} bytes")
        if header.uuid != infoblock.uuid:
            raise CorruptImage("header: uuid differs from the info block's uuid")
        recorded = (header.mode, header.map, header.align)
        if recorded != (infoblock.mode_name, infoblock.map_name, infoblock.align):
            raise CorruptImage(
                f"header: mode/map/align {recorded} differ from the info block's "
                f"{(infoblock.mode_name, infoblock.map_name, infoblock.align)}"
            )
        geometry = infoblock.geometry(file_size)
    except CorruptImage as err:
        raise CorruptImage(f"{path}: {err}") from None
    return ImageInfo(path, file_size, header, infoblock, geometry)


def lock_image(fd: int, path: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        who = f"process {holder}" if holder else "another process"
        raise ImageBusy(f"{path} is in use by {who} (another pmemfs daemon?): unmount it first") from None
    except OSError as err:  # ENOLCK, say, on a network filesystem
        raise PmemfsError(f"cannot lock {path}: {err.strerror}", errno=err.errno) from None


def _lock_holder(fd: int) -> int | None:
    """The pid /proc/locks names for a FLOCK on this file, if any: only a better message, so any doubt is None."""
    try:
        st = os.fstat(fd)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if "FLOCK" in fields and key in fields and "->" not in fields:
                    return int(fields[4])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_header_block(fd: int) -> HeaderBlock:
    return HeaderBlock.decode(os.pread(fd, HEADER_BLOCK_SIZE, HEADER_OFFSET))


def _check_mountable(info: ImageInfo) -> None:
    """What `info` may show but a mount must refuse: the table must fit a version-2 header (the first
    update writes one) and lie inside the data area (pmemfs never writes another)."""
    badblocks = info.header.badblocks
    if len(badblocks) > BADBLOCKS_MAX:
        raise CorruptImage(
            f"{info.path}: header: its {len(badblocks)} badblock extents do not fit the version-2 header "
            f"({BADBLOCKS_MAX}); mount it with the pmemfs that wrote it and clear some first"
        )
    sectors = info.geometry.data_size // SECTOR_SIZE
    for sector, count in badblocks:
        if count <= 0 or sector + count > sectors:
            raise CorruptImage(
                f"{info.path}: header: badblocks extent {sector}+{count} is outside the data area "
                f"({sectors} sectors): pmemfs check --repair drops it"
            )


def single_page_folios(fd: int, mapping: mmap.mmap) -> None:
    """Keep the image's page cache in single pages, for the mapping and for pread.

    With readahead, the kernel caches a file in large folios (ext4 does since Linux 6.16): a store
    into one page of a folio then dirties all of it, and writeback allocates every block under it.
    A 4 KiB store could allocate 2 MiB (measured: 4 KiB stores at a 2 MiB stride grew an ext4 image
    509x what they wrote), and on a full disk the store into a page we had written first would be
    a SIGBUS, for want of blocks for the rest of its folio. So no readahead: MADV_RANDOM on the
    mapping, POSIX_FADV_RANDOM on the file. Cold reads get their pages through WILLNEED instead
    (Region._read_unknown).
    """
    mapping.madvise(mmap.MADV_RANDOM)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def seek_reports_holes(directory: str) -> bool:
    """Whether the filesystem under ``directory`` tells holes from data. Linux answers SEEK_DATA and
    SEEK_HOLE on any filesystem, but where it cannot tell (ext2, vfat, NFSv3, 9p) it calls the whole
    file data: a hole learned as data there would be stored into through the mapping. Probed with an
    unnamed temporary file; False when it cannot be."""
    try:
        fd = os.open(directory or ".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        os.ftruncate(fd, PAGE_SIZE * 16)
        return os.lseek(fd, 0, os.SEEK_HOLE) == 0
    except OSError:
        return False
    finally:
        os.close(fd)


class Region:
    """An open image: locked, mapped once with numpy memmap, with the data area as a byte view."""

    def __init__(self, path: str, fd: int, info: ImageInfo, shared: SharedState | None = None) -> None:
        self.path = path
        self.fd = fd
        self.info = info
        self.geometry = info.geometry
        self.header = info.header
        with open(fd, "r+b", closefd=False) as image_file:
            self.image = np.memmap(image_file, dtype=np.uint8, mode="r+", shape=(info.file_size,))
        single_page_folios(fd, self.image._mmap)  # type: ignore[attr-defined]
        dataoff = self.geometry.dataoff
        # Plain ndarray views: indexing an np.memmap goes through Python-level __getitem__.
        self.data = self.image[dataoff : dataoff + self.geometry.data_size].view(np.ndarray)
        self._data_bytes = self.data.data
        self.data_size = self.geometry.data_size
        self._dataoff = dataoff
        self.previous_shutdown_clean = info.header.clean
        # Which pages of the image are known to have their blocks (see "Allocation" below): in the
        # serving processes' shared state, so what one of them wrote the others store into through
        # the mapping. Its memory is taken as pages are read or written (a read fault on shared
        # memory takes a page too): 256 MiB for the whole of a 1 TiB image.
        self.shared = shared or SharedState(chunks_for(info.geometry.npfns), -(-info.file_size // PAGE_SIZE))
        self._known = self.shared.array("known")
        self._known_bytes = self._known.data  # a memoryview item costs a fifth of numpy's
        self._holes_visible = seek_reports_holes(os.path.dirname(path))

    def direct_access(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The data area, the image's per-page "known" bytes and the data area's offset in the image,
        for the compiled data path (datapath.pyx): it reads and stores through the mapping only
        pages whose byte is set, as ``read`` and ``write`` do (see "Allocation" below)."""
        return self.data, self._known, self._dataoff

    @classmethod
    def open(cls, path: str) -> Region:
        """Open, lock and map the image, with the shared state its serving processes will share."""
        fd = open_image(path, writable=True)
        try:
            lock_image(fd, path)
            info = _read_info(fd, path)
            _check_mountable(info)
            try:
                return cls(os.path.abspath(path), fd, info)
            except (OSError, ValueError) as err:
                raise PmemfsError(f"cannot map {path}: {err}") from None
        except BaseException:
            os.close(fd)
            raise

    # Header bookkeeping. Written with pwrite, not through the mapping, so each update is one
    # explicit store that fdatasync makes durable before mount goes on.
    def mark_dirty(self) -> None:
        self._write_header(self.header.mounted(time.time_ns()))

    def mark_clean(self) -> None:
        self.flush()
        # Re-read first: serving processes may have changed the badblocks table since we forked.
        header = self.read_header()
        self._write_header(header.replace(flags=header.flags | FLAG_CLEAN))

    def read_header(self) -> Header:
        return _read_header_block(self.fd).header

    def set_badblocks(self, extents: tuple[tuple[int, int], ...]) -> None:
        self._write_header(self.read_header().replace(badblocks=extents))

    def badblock_store(self) -> ImageBadBlockStore:
        return ImageBadBlockStore(self)

    def restore_header(self, header: Header) -> None:
        """Write back a header read earlier (a mount that failed after marking the image in use)."""
        self._write_header(header)

    def _write_header(self, header: Header) -> None:
        # Which copy to overwrite depends on what is on the media now, not on what this process read
        # at open: a serving process may have written the header since.
        offset, copy = _read_header_block(self.fd).update(header)
        os.pwrite(self.fd, copy, HEADER_OFFSET + offset)
        os.fdatasync(self.fd)
        self.header = header

    # Allocation. The first store into a page goes through pwrite (see _write_unknown), so that a
    # full backing filesystem is an ENOSPC for the writer instead of a SIGBUS in the daemon, and a
    # 4 KiB write allocates 4 KiB. ``_known`` says which pages have their blocks: written, or seen
    # as data (SEEK_DATA). A data page's byte is set only by a transfer that holds a reference on
    # it, by a read that holds the zero's lock (no zero can run), or by the zero that holds its
    # range; the carve-out's, under Lock.BACKING for a chunk
    # nobody references yet. It is cleared before a punch, which no reference ever overlaps: zero
    # keeps transfers out of its range, the carve-out is reset when nothing serves. A transfer takes
    # its reference and then looks at the zero's gate, the zero closes the gate, runs membarrier and
    # then looks for references (pages.py): so on x86's ordering a transfer that goes on sees the
    # bytes the zero cleared, and a byte is never 1 for a hole.
    def read(self, offset: int, length: int) -> memoryview | bytes:
        """The bytes at [offset, +length) of the data area (the caller has clipped it to the end):
        a zero-copy view of the mapping where the pages are allocated, else a copy."""
        start = self._dataoff + offset
        first, last = start >> PAGE_SHIFT, (start + length - 1) >> PAGE_SHIFT
        if first == last:
            if self._known_bytes[first]:
                return self._data_bytes[offset : offset + length]
        elif self._known[first : last + 1].all():
            return self._data_bytes[offset : offset + length]
        return self._read_unknown(offset, length)

    def _read_unknown(self, offset: int, length: int) -> memoryview | bytes:
        """A read of pages not known to be allocated: ask the filesystem. A hole must not be read
        through the mapping: on tmpfs a read fault on a hole of a shared mapping allocates a page
        (and fails when tmpfs is full). Holes are read with pread, which allocates nothing."""
        start = self._dataoff + offset
        end = start + length
        try:
            data_at = os.lseek(self.fd, start, os.SEEK_DATA)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            data_at = end  # nothing but hole up to the end of the file
        if data_at >= end:
            return bytes(length)
        if data_at == start and self._holes_visible and self._learn_data_from(start, end):
            # Data nobody stored into in this mount is likely not in the page cache (an earlier
            # mount wrote it): read it in at once, not a page fault at a time (no readahead here).
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_WILLNEED)
            return self._data_bytes[offset : offset + length]
        return os.pread(self.fd, length, start)

    def _learn_data_from(self, start: int, end: int) -> bool:
        """Whether [start, end), which begins with data, is data to its end; if so, learn it, and
        the rest of its data extent when no zero can punch meanwhile.

        SEEK_HOLE may cost a walk to the extent's end (tmpfs walks its page cache: milliseconds on a
        large file), so what it tells is worth keeping beyond the request: one such read after a
        mount learns the whole extent, where learning the request alone made every random 4 KiB
        read of an unlearnt image pay that walk (0.5k IOPS on tmpfs). Beyond the request this
        transfer holds no reference, so the learning happens under the zero's lock: no zero can
        clear and punch those pages between the seek and the stores (a zero under way: learn the
        request alone, which the transfer's reference protects)."""
        zero_lock = self.shared.lock(Lock.ZEROING)
        exclusive = not zero_lock.held_here and zero_lock.try_acquire()
        try:
            hole = os.lseek(self.fd, start, os.SEEK_HOLE)
            if hole < end:
                return False
            self._learn(start, hole if exclusive else end)
            return True
        finally:
            if exclusive:
                zero_lock.release()

    def _learn(self, start: int, end: int) -> None:
        """Mark the pages wholly inside [start, end) of the image as having their blocks. Only whole
        pages: with blocks smaller than a page (a 1 KiB-block ext4) the rest may still be a hole."""
        first, last = -(-start // PAGE_SIZE), end // PAGE_SIZE
        if first < last:
            self._known[first:last] = 1

    def write(self, offset: int, data: bytes | memoryview) -> None:
        start = self._dataoff + offset
        first, last = start >> PAGE_SHIFT, (start + len(data) - 1) >> PAGE_SHIFT
        if first == last:
            if not self._known_bytes[first]:
                return self._write_unknown(start, data)
        elif not self._known[first : last + 1].all():
            return self._write_unknown(start, data)
        self._data_bytes[offset : offset + len(data)] = data

    def _write_unknown(self, start: int, data: bytes | memoryview) -> None:
        """Store into pages not known to be allocated: with pwrite, not through the mapping.

        Into a hole of a full filesystem a store through the mapping is a SIGBUS in the daemon; a
        pwrite is ENOSPC for the writer. And the filesystem allocates the blocks as it does for any
        write: ext4's delayed allocation gives pages written in random order contiguous extents at
        writeback, where allocating each page ahead (fallocate) made one extent a page (measured:
        262144 random 4 KiB writes left 9 extents against 262144, whose fdatasync took 68 s, and a
        first write took 8 us against 24). Once written, a page has its block, or the filesystem's
        reservation for it: later stores into it, from any serving process, go through the mapping.
        """
        try:
            written = os.pwrite(self.fd, data, start)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"{self.path}: the backing filesystem is full") from None
            raise PmemfsError(f"{self.path}: cannot write: {err.strerror}", errno=err.errno) from None
        if written < len(data):
            raise NoSpace(f"{self.path}: the backing filesystem is full ({written} of {len(data)} bytes written)")
        self._learn(start, start + len(data))

    def back_with_zeros(self, image_offset: int, length: int) -> None:
        """Give [image_offset, +length) its blocks by writing zeros there, before stores through the
        mapping: only for a range that holds nothing (the carve-out, reset at every mount)."""
        self._write_unknown(image_offset, bytes(length))

    def punch_hole(self, image_offset: int, length: int) -> None:
        """Give whole pages back to the backing filesystem; they read as zeros afterwards."""
        # Forgotten first: a punch that fails half-way may have freed some of the blocks, and a page
        # not known to be allocated is only ever written with pwrite (0 is always safe).
        self._known[image_offset // PAGE_SIZE : (image_offset + length) // PAGE_SIZE] = 0
        try:
            punch_hole(self.fd, image_offset, length)
        except OSError as err:
            raise PmemfsError(f"{self.path}: cannot punch a hole: {err.strerror}", errno=err.errno) from None

    def write_zeros(self, image_offset: int, length: int) -> None:
        """Zero [image_offset, +length) where it is not zero already, for a filesystem that cannot punch
        holes (writing zeros everywhere would allocate what was never used)."""
        for piece in range(image_offset, image_offset + length, ZERO_SCAN_BYTES):
            end = min(piece + ZERO_SCAN_BYTES, image_offset + length)
            pages = self.image[piece:end].view(np.ndarray).reshape(-1, PAGE_SIZE)
            for lo, hi in runs(np.flatnonzero(pages.any(axis=1))):
                os.pwrite(self.fd, bytes((hi - lo) * PAGE_SIZE), piece + lo * PAGE_SIZE)

    def extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """The allocated (data) extents of the image within [start, end), from SEEK_DATA/SEEK_HOLE."""
        return data_extents(self.fd, start, end)

    def zero(self, offset: int, length: int, *, flush: bool = True) -> None:
        """Zero [offset, +length) of the data area in one operation (and one flush, unless the caller
        flushes later, outside a window in which transfers wait).

        Whole pages go back to holes in the image (``clear_pmem()`` done once for the range, not
        page by page); the partial pages at either end are zeroed in place.
        """
        start, end = self.geometry.dataoff + offset, self.geometry.dataoff + offset + length
        first_page, last_page = -(-start // PAGE_SIZE) * PAGE_SIZE, end // PAGE_SIZE * PAGE_SIZE
        if first_page >= last_page:
            self._zero_in_place(start, end)
        else:
            self._zero_in_place(start, first_page)
            self._zero_in_place(last_page, end)
            self.punch_hole(first_page, last_page - first_page)
        if flush:
            self.flush()

    def _zero_in_place(self, start: int, end: int) -> None:
        if end <= start:
            return
        try:
            if os.lseek(self.fd, start, os.SEEK_DATA) >= end:
                return  # a hole already reads as zeros: storing zeros would only allocate it
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            return
        self.write(start - self.geometry.dataoff, bytes(end - start))

    def flush(self) -> None:
        # The mapping is MAP_SHARED, so every store is already in the image's page cache:
        # fdatasync writes exactly what msync(MS_SYNC) over the whole mapping would.
        os.fdatasync(self.fd)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self, *, clean: bool) -> None:
        try:
            if clean:
                self.mark_clean()
        finally:
            # Dropping the views unmaps the image once the last reply that borrowed one is gone.
            del self._data_bytes, self.data, self.image
            # The mapping holds a dup of our fd, and with it the lock: release the lock explicitly.
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


class ImageBadBlockStore:
    """The badblocks table in the image header (badblocks.py takes the lock around it)."""

    def __init__(self, region: Region) -> None:
        self.region = region

    def load(self) -> tuple[tuple[int, int], ...]:
        return self.region.read_header().badblocks

    def save(self, extents: tuple[tuple[int, int], ...]) -> None:
        self.region.set_badblocks(extents)
