"""pyfuse3 Operations for a pmemfs mount: translates FUSE requests into region calls.

The only module that raises FUSEError. Handlers never await: every request is served to the
end by the task that received it, so one pyfuse3 worker task is enough and no lock is needed.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import time
from collections.abc import Sequence

import pyfuse3

from .control import ControlFile
from .errors import PmemfsError
from .infoblock import SECTOR_SIZE
from .region import Region

PMEM0_INODE = pyfuse3.ROOT_INODE + 1
CONTROL_DIR_INODE = PMEM0_INODE + 1
FIRST_CONTROL_FILE_INODE = CONTROL_DIR_INODE + 1
PMEM0_NAME = b"pmem0"
CONTROL_DIR_NAME = b".pmemfs"
# Nothing in the tree ever changes shape or size, so the kernel may cache all of it.
ATTR_TIMEOUT_S = 3600.0


@dataclasses.dataclass
class Counters:
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    direct_reads: int = 0
    direct_writes: int = 0
    fsyncs: int = 0
    errors: int = 0


@dataclasses.dataclass
class OpenFile:
    inode: int
    direct: bool
    pid: int
    snapshot: bytes = b""


class PmemOperations(pyfuse3.Operations):
    """The mount's tree: ``pmem0`` over the data area and the ``.pmemfs/`` control files."""

    supports_dot_lookup = True

    def __init__(self, region: Region, control_files: Sequence[ControlFile]) -> None:
        super().__init__()
        self.region = region
        self.data_size = region.data_size
        self.counters = Counters()
        self._control = {FIRST_CONTROL_FILE_INODE + i: f for i, f in enumerate(control_files)}
        self._control_by_name = {f.name.encode(): inode for inode, f in self._control.items()}
        self._open: dict[int, OpenFile] = {}
        self._next_fh = 1
        self._mount_ns = time.time_ns()

    def statistics(self) -> dict[str, int]:
        return {**dataclasses.asdict(self.counters), "open_files": len(self._open)}

    # Namespace
    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o755, 3
        elif inode == CONTROL_DIR_INODE:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o700, 2
        elif inode == PMEM0_INODE:
            attrs.st_mode, attrs.st_nlink = stat.S_IFREG | 0o600, 1
            attrs.st_size = self.data_size
            attrs.st_blocks = self.data_size // 512
        elif inode in self._control:
            # Size 0 and direct_io opens: readers read until EOF, whatever the snapshot's length.
            attrs.st_mode, attrs.st_nlink = stat.S_IFREG | 0o600, 1
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_ino = inode
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        attrs.st_blksize = 4096
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._mount_ns
        attrs.attr_timeout = attrs.entry_timeout = ATTR_TIMEOUT_S
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attributes(self._child(parent_inode, name))

    def _child(self, parent_inode: int, name: bytes) -> int:
        if name == b".":
            return parent_inode
        if parent_inode == pyfuse3.ROOT_INODE:
            children = {PMEM0_NAME: PMEM0_INODE, CONTROL_DIR_NAME: CONTROL_DIR_INODE, b"..": parent_inode}
        elif parent_inode == CONTROL_DIR_INODE:
            children = {**self._control_by_name, b"..": pyfuse3.ROOT_INODE}
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        try:
            return children[name]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        # Like a block device: the size is the device's, anything else (times, mode) is accepted and ignored.
        if fields.update_size and not (inode == PMEM0_INODE and attr.st_size == self.data_size):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._attributes(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode not in (pyfuse3.ROOT_INODE, CONTROL_DIR_INODE):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == pyfuse3.ROOT_INODE:
            entries = [(PMEM0_NAME, PMEM0_INODE), (CONTROL_DIR_NAME, CONTROL_DIR_INODE)]
        else:
            entries = list(self._control_by_name.items())
        for index, (name, inode) in enumerate(entries[start_id:], start=start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attributes(inode), index):
                break

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = self.data_size // 4096
        data.f_files = 2 + len(self._control)
        data.f_namemax = 255
        return data

    # Files
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        if inode == PMEM0_INODE:
            # O_TRUNC is ignored, as a block device ignores it, so `dd of=pmem0` keeps the media.
            direct = bool(flags & os.O_DIRECT)
            self._open[fh] = OpenFile(inode, direct, ctx.pid)
            # keep_cache=False: each buffered open sees what O_DIRECT writers stored meanwhile.
            return pyfuse3.FileInfo(fh=fh, direct_io=direct, keep_cache=False)
        if inode in self._control:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            self._open[fh] = OpenFile(inode, True, ctx.pid, self._control[inode].render())
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        raise pyfuse3.FUSEError(errno.EISDIR if inode in (pyfuse3.ROOT_INODE, CONTROL_DIR_INODE) else errno.ENOENT)

    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes:
        handle = self._open[fh]
        if handle.inode != PMEM0_INODE:
            return handle.snapshot[off : off + size]
        if handle.direct and (off % SECTOR_SIZE or size % SECTOR_SIZE):
            self.counters.errors += 1
            raise pyfuse3.FUSEError(errno.EINVAL)
        if off >= self.data_size:
            return b""
        size = min(size, self.data_size - off)
        counters = self.counters
        counters.reads += 1
        counters.read_bytes += size
        counters.direct_reads += handle.direct
        return self.region.read(off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._open[fh]
        if handle.inode != PMEM0_INODE:
            raise pyfuse3.FUSEError(errno.EBADF)
        size = len(buf)
        if handle.direct and (off % SECTOR_SIZE or size % SECTOR_SIZE):
            self.counters.errors += 1
            raise pyfuse3.FUSEError(errno.EINVAL)
        if off >= self.data_size:
            self.counters.errors += 1
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if off + size > self.data_size:
            # A write across the end is short, as on /dev/pmemN; the next one gets ENOSPC.
            size = self.data_size - off
            buf = memoryview(buf)[:size]  # type: ignore[assignment]
        try:
            self.region.write(off, buf)
        except PmemfsError as err:
            self.counters.errors += 1
            raise pyfuse3.FUSEError(err.errno) from None
        counters = self.counters
        counters.writes += 1
        counters.write_bytes += size
        counters.direct_writes += handle.direct
        return size

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.counters.fsyncs += 1
        try:
            self.region.flush()
        except OSError as err:
            self.counters.errors += 1
            raise pyfuse3.FUSEError(err.errno or errno.EIO) from None

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        self._open.pop(fh, None)
