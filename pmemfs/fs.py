"""pyfuse3 Operations for a pmemfs mount: translates FUSE requests into region and registry calls.

The only module that raises FUSEError. Handlers never await: every request is served to the
end by the task that received it, so one pyfuse3 worker task is enough and no lock is needed.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence

import pyfuse3

from .badblocks import BadBlocks
from .control import ControlFile
from .errors import PmemfsError
from .infoblock import PAGE_SIZE, SECTOR_SIZE
from .pages import FILES, PageRegistry
from .region import Region
from .sessions import PinSessions, Session
from .shared import COUNTER, IO_COUNTERS

log = logging.getLogger("pmemfs")

PMEM0_INODE = pyfuse3.ROOT_INODE + 1
DAX0_INODE = PMEM0_INODE + 1
CONTROL_DIR_INODE = DAX0_INODE + 1
PIN_INODE = CONTROL_DIR_INODE + 1
FIRST_CONTROL_FILE_INODE = PIN_INODE + 1
DATA_FILES = {PMEM0_INODE: "pmem0", DAX0_INODE: "dax0"}
FILE_CODES = {inode: FILES.index(name) for inode, name in DATA_FILES.items()}
CONTROL_DIR_NAME = b".pmemfs"
PIN_NAME = b"pin"
# Nothing in the tree ever changes shape or size, so the kernel may cache all of it.
ATTR_TIMEOUT_S = 3600.0
OPEN_CACHE_LIMIT = 4096


READS, WRITES, READ_BYTES, WRITE_BYTES, DIRECT_READS, DIRECT_WRITES, FSYNCS, ERRORS = (COUNTER[n] for n in IO_COUNTERS)


@dataclasses.dataclass
class OpenFile:
    """What a file handle stands for. Everything but the snapshot is encoded in the handle itself,
    because the kernel may send a handle's requests to any serving process."""

    inode: int
    direct: bool
    pid: int
    file_code: int
    session: Session | None = None
    snapshot: bytes | None = None

    @property
    def name(self) -> str:
        return DATA_FILES.get(self.inode, "")

    @classmethod
    def from_fh(cls, fh: int) -> OpenFile:
        inode, direct, pid = fh & 0xFF, bool(fh >> 8 & 1), fh >> 41
        session = Session(fh, pid) if inode == PIN_INODE else None
        return cls(inode, direct, pid, FILE_CODES.get(inode, 0), session)

    @staticmethod
    def snapshot_slot(fh: int) -> int | None:
        """The shared snapshot slot of a control handle, if it got one."""
        slot = fh >> 13 & 0x1FF
        return slot - 1 if slot else None


def make_fh(inode: int, direct: bool, column: int, slot: int | None, serial: int, pid: int) -> int:
    """inode (8 bits) | direct (1) | serving column (4) | snapshot slot + 1 (9) | serial (19) | pid (22,
    the kernel's pid_max limit). Bit 63 stays clear: handles are stored in signed 64-bit shared cells."""
    slot_bits = 0 if slot is None else slot + 1
    return inode | direct << 8 | column << 9 | slot_bits << 13 | (serial & 0x7FFFF) << 22 | pid << 41


class PmemOperations(pyfuse3.Operations):
    """The mount's tree: ``pmem0`` and ``dax0`` over the data area, and the ``.pmemfs/`` control files."""

    supports_dot_lookup = True

    def __init__(
        self,
        region: Region,
        registry: PageRegistry,
        badblocks: BadBlocks,
        control_files: Sequence[ControlFile],
        *,
        track_references: bool = True,
    ) -> None:
        super().__init__()
        self.region = region
        self.registry = registry
        self.badblocks = badblocks
        self.sessions = PinSessions(registry, region, badblocks)
        self.data_size = region.data_size
        self.track_references = track_references
        self.initialized = False
        self._control = {FIRST_CONTROL_FILE_INODE + i: f for i, f in enumerate(control_files)}
        self._control_by_name = {f.name.encode(): inode for inode, f in self._control.items()}
        self._control_by_name[PIN_NAME] = PIN_INODE
        # This process's view of open handles: decoded from the handle, plus control snapshots.
        self._open: dict[int, OpenFile] = {}
        self._serial = 0
        self._mount_ns = time.time_ns()
        # References of a read whose reply still points into the mapping: dropped once it is sent.
        self._in_flight = registry.in_flight

    def init(self) -> None:
        # pyfuse3 calls this while it answers FUSE_INIT; serving processes fork only after it.
        self.initialized = True

    def add_control_files(self, control_files: Sequence[ControlFile]) -> None:
        first = FIRST_CONTROL_FILE_INODE + len(self._control)
        for inode, control_file in enumerate(control_files, start=first):
            self._control[inode] = control_file
            self._control_by_name[control_file.name.encode()] = inode

    def statistics(self) -> dict[str, int]:
        totals = self.registry.shared.counter_totals()
        return {name: totals[name] for name in IO_COUNTERS}

    def _count(self, counter: int, n: int = 1) -> None:
        self.registry.counter_row[counter] += n

    def _handle(self, fh: int) -> OpenFile:
        handle = self._open.get(fh)
        if handle is None:
            if len(self._open) >= OPEN_CACHE_LIMIT:
                # Releases may go to another serving process: keep this cache bounded.
                self._open.clear()
            handle = self._open[fh] = OpenFile.from_fh(fh)
        return handle

    def _new_fh(self, inode: int, direct: bool, pid: int, *, slot: int | None = None) -> int:
        self._serial += 1
        return make_fh(inode, direct, self.registry.column, slot, self._serial, pid)

    def _new_control_fh(self, inode: int, pid: int) -> int:
        shared = self.registry.shared
        slot = shared.take_snapshot_slot(self.registry.column)
        fh = self._new_fh(inode, True, pid, slot=slot)
        if slot is not None:
            shared.store_snapshot(slot, fh, b"")  # taken from now on, not at its first read
        return fh

    def _keep_snapshot(self, fh: int, handle: OpenFile, data: bytes) -> None:
        """Remember what a control read showed, here and for the other serving processes."""
        handle.snapshot = data
        slot = OpenFile.snapshot_slot(fh)
        if slot is not None:
            self.registry.shared.store_snapshot(slot, fh, data)

    # Namespace
    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o755, 3
        elif inode == CONTROL_DIR_INODE:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o700, 2
        elif inode in DATA_FILES:
            attrs.st_mode, attrs.st_nlink = stat.S_IFREG | 0o600, 1
            attrs.st_size = self.data_size
            attrs.st_blocks = self.data_size // 512
        elif inode in self._control or inode == PIN_INODE:
            # Size 0 and direct_io opens: readers read until EOF, whatever the snapshot's length.
            attrs.st_mode, attrs.st_nlink = stat.S_IFREG | 0o600, 1
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_ino = inode
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        attrs.st_blksize = PAGE_SIZE
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._mount_ns
        attrs.attr_timeout = attrs.entry_timeout = ATTR_TIMEOUT_S
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attributes(self._child(parent_inode, name))

    def _entries(self, inode: int) -> dict[bytes, int]:
        if inode == pyfuse3.ROOT_INODE:
            return {**{n.encode(): i for i, n in DATA_FILES.items()}, CONTROL_DIR_NAME: CONTROL_DIR_INODE}
        if inode == CONTROL_DIR_INODE:
            return self._control_by_name
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _child(self, parent_inode: int, name: bytes) -> int:
        if name == b".":
            return parent_inode
        if name == b"..":
            return pyfuse3.ROOT_INODE
        try:
            return self._entries(parent_inode)[name]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        # Like a block device: the size is the device's, anything else (times, mode) is accepted and ignored.
        if fields.update_size and not (inode in DATA_FILES and attr.st_size == self.data_size):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._attributes(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._entries(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = list(self._entries(fh).items())
        for index, (name, inode) in enumerate(entries[start_id:], start=start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attributes(inode), index):
                break

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = PAGE_SIZE
        data.f_blocks = self.data_size // PAGE_SIZE
        data.f_files = len(DATA_FILES) + len(self._control_by_name)
        data.f_namemax = 255
        return data

    # Files
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.registry.end_transfers()
        if inode in DATA_FILES:
            # O_TRUNC is ignored, as a block device ignores it, so `dd of=pmem0` keeps the media.
            direct = bool(flags & os.O_DIRECT) and inode == PMEM0_INODE
            # keep_cache=False: each buffered open sees what O_DIRECT writers stored meanwhile.
            return pyfuse3.FileInfo(fh=self._new_fh(inode, direct, ctx.pid), direct_io=direct, keep_cache=False)
        if inode == PIN_INODE:
            fh = self._new_control_fh(inode, ctx.pid)
            self.sessions.open(self._handle(fh).session)  # type: ignore[arg-type]
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if inode in self._control:
            control = self._control[inode]
            if flags & os.O_ACCMODE != os.O_RDONLY and control.store is None:
                raise pyfuse3.FUSEError(errno.EACCES)
            fh = self._new_control_fh(inode, ctx.pid)
            self._keep_snapshot(fh, self._handle(fh), self._render(control.render))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        raise pyfuse3.FUSEError(errno.EISDIR if inode in (pyfuse3.ROOT_INODE, CONTROL_DIR_INODE) else errno.ENOENT)

    def _check_transfer(self, handle: OpenFile, off: int, size: int) -> None:
        if handle.direct and (off % SECTOR_SIZE or size % SECTOR_SIZE):
            self._count(ERRORS)
            raise pyfuse3.FUSEError(errno.EINVAL)

    def _snapshot(self, fh: int, handle: OpenFile, off: int) -> bytes:
        """A control file's content for a read. A control file shows what it held at open; a pin
        session lists its pins afresh at every read at offset 0. Later reads of either continue
        the same snapshot, whichever serving process rendered it."""
        if handle.session is not None and off == 0:
            self._keep_snapshot(fh, handle, self._render(lambda: self.sessions.listing(handle.session)))  # type: ignore[arg-type]
        slot = OpenFile.snapshot_slot(fh)
        if slot is not None:
            shared = self.registry.shared.load_snapshot(slot, fh)
            if shared is not None:
                return shared
        if handle.snapshot is None or handle.session is not None:
            # No shared slot: render anew (a session's listing only changes by its own commands).
            if handle.session is not None:
                handle.snapshot = self._render(lambda: self.sessions.listing(handle.session))  # type: ignore[arg-type]
            else:
                handle.snapshot = self._render(self._control[handle.inode].render)
        return handle.snapshot

    @staticmethod
    def _render(render: Callable[[], bytes]) -> bytes:
        """A control file's content, or EIO: a failing render must not take a serving process down
        (pyfuse3 lets anything but FUSEError out of its loop)."""
        try:
            return render()
        except Exception:
            log.exception("rendering a control file failed")
            raise pyfuse3.FUSEError(errno.EIO) from None

    # pyfuse3 replies with any contiguous buffer, so a view of the mapping saves a copy.
    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes:  # type: ignore[override]
        if self._in_flight:
            self.registry.end_transfers()
        handle = self._open.get(fh) or self._handle(fh)
        if not handle.file_code:
            return self._snapshot(fh, handle, off)[off : off + size]
        self._check_transfer(handle, off, size)
        if off >= self.data_size or size == 0:
            return b""
        size = min(size, self.data_size - off)
        try:
            if self.badblocks.changed_or_bad():
                self.badblocks.check_read(off, size)
            if self.track_references:
                # The reply is copied out of the mapping after we return: the reference lasts until
                # the serving loop is about to read the next request (end_transfers).
                self.registry.begin_transfer(handle.direct, handle.pid, handle.file_code, off, size)
        except PmemfsError as err:
            self._count(ERRORS)
            raise pyfuse3.FUSEError(err.errno) from None
        ctr = self.registry.counter_row
        ctr[READS] += 1
        ctr[READ_BYTES] += size
        if handle.direct:
            ctr[DIRECT_READS] += 1
        return self.region.read(off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self._in_flight:
            self.registry.end_transfers()
        handle = self._open.get(fh) or self._handle(fh)
        if not handle.file_code:
            return self._control_write(handle, buf)
        size = len(buf)
        self._check_transfer(handle, off, size)
        if off >= self.data_size:
            self._count(ERRORS)
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if off + size > self.data_size:
            # A write across the end is short, as on /dev/pmemN; the next one gets ENOSPC.
            size = self.data_size - off
            buf = memoryview(buf)[:size]  # type: ignore[assignment]
        try:
            if self.badblocks.changed_or_bad():
                self.badblocks.clear_for_write(off, size)
            if self.track_references:
                self.registry.begin_transfer(handle.direct, handle.pid, handle.file_code, off, size)
                try:
                    self.region.write(off, buf)
                finally:
                    self.registry.end_transfers()
            else:
                self.region.write(off, buf)
        except PmemfsError as err:
            self._count(ERRORS)
            raise pyfuse3.FUSEError(err.errno) from None
        ctr = self.registry.counter_row
        ctr[WRITES] += 1
        ctr[WRITE_BYTES] += size
        if handle.direct:
            ctr[DIRECT_WRITES] += 1
        return size

    def _control_write(self, handle: OpenFile, buf: bytes) -> int:
        try:
            if handle.session is not None:
                self.sessions.command(handle.session, buf.decode(errors="replace"))
            else:
                control = self._control.get(handle.inode)
                if control is None or control.store is None:
                    raise pyfuse3.FUSEError(errno.EBADF)
                control.store(buf)
        except PmemfsError as err:
            raise pyfuse3.FUSEError(err.errno) from None
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._count(FSYNCS)
        try:
            self.region.flush()
        except OSError as err:
            self._count(ERRORS)
            raise pyfuse3.FUSEError(err.errno or errno.EIO) from None

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        self.registry.end_transfers()
        handle = self._open.pop(fh, None) or OpenFile.from_fh(fh)
        slot = OpenFile.snapshot_slot(fh)
        if slot is not None:
            self.registry.shared.free_snapshot(slot, fh)
        if handle.session is not None:
            self.sessions.close(handle.session)
