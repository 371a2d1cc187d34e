"""pyfuse3 Operations for a pmemfs mount: translates FUSE requests into region and registry calls.

The only module that raises FUSEError, and the error boundary of the daemon: pyfuse3 lets any
other exception out of its loop, which would end the serving process and with it the mount, so
every handler turns every exception into an errno (EIO for the unexpected, logged once with its
traceback) and the process goes on serving.

Handlers never await: every request is served to the end by the task that received it, so one
pyfuse3 worker task per process is enough, and a process serves one request at a time (which the
registry's transfer contract relies on, pages.py). A handler may still wait, briefly and bounded:
a transfer into pages being zeroed waits for the zero (gates.py), an open during an unmount's
check waits for it (device.py), and cross-process locks are held for a few stores (shared.py).

Open handles carry everything they stand for in the 64-bit handle (handles.py), because the
kernel may send a handle's requests to any serving process; a control file's content is a
snapshot in shared memory (snapshots.py). Counters are this process's row (counters.py).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import stat
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import pyfuse3

from . import handles
from .badblocks import BadBlocks
from .control import ControlFile
from .counters import COUNTER, HANDLE_COUNTERS
from .datapath import DataPath
from .errors import PmemfsError
from .infoblock import PAGE_SIZE, SECTOR_SIZE
from .logwrites import WriteLog
from .pages import PageRegistry
from .region import Region
from .sessions import PinSessions, Session
from .shared import FILES
from .snapshots import SnapshotSlots

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
# A control-file write is one command or one sysfs line: anything longer is not one.
CONTROL_WRITE_MAX = 4096
# What an unexpected exception becomes for the client: its errno where it says something true
# about the request (no space), else EIO.
PASSED_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

FSYNCS, ERRORS, INTERNAL_ERRORS = (COUNTER[n] for n in ("fsyncs", "errors", "internal_errors"))
DATA_OPENS, DATA_RELEASES = (COUNTER[n] for n in HANDLE_COUNTERS)
SECTOR_MASK = SECTOR_SIZE - 1
_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def _guarded(handler: _Handler) -> _Handler:
    """The error boundary for a handler (read and write have it inline, where it costs nothing)."""
    name = handler.__name__

    @functools.wraps(handler)
    async def guarded(self: PmemOperations, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as err:
            raise self._fuse_error(name, err) from None

    return guarded  # type: ignore[return-value]


@dataclasses.dataclass
class OpenFile:
    """What a file handle stands for, all encoded in the handle itself, because the kernel may send
    a handle's requests to any serving process (a control file's snapshot is in shared memory)."""

    inode: int
    direct: bool
    pid: int
    file_code: int
    session: Session | None = None

    @property
    def name(self) -> str:
        return DATA_FILES.get(self.inode, "")

    @classmethod
    def from_fh(cls, fh: int) -> OpenFile:
        fields = handles.decode(fh)
        session = Session(fh, fields.pid) if fields.inode == PIN_INODE else None
        return cls(fields.inode, fields.direct, fields.pid, FILE_CODES.get(fields.inode, 0), session)


class PmemOperations(pyfuse3.Operations):
    """The mount's tree: ``pmem0`` and ``dax0`` over the data area, and the ``.pmemfs/`` control files."""

    supports_dot_lookup = True

    def __init__(
        self,
        region: Region,
        registry: PageRegistry,
        badblocks: BadBlocks,
        sessions: PinSessions,
        control_files: Sequence[ControlFile],
        *,
        track_references: bool = True,
        write_log: WriteLog | None = None,
    ) -> None:
        super().__init__()
        self.region = region
        # Where a write's store and an fsync's flush go (write and flush, as the region has them):
        # chosen once here, so that a mount with no write log runs the very same calls as before
        # (measured: a bound method kept in an attribute costs ~10 ns more a call than this).
        self.media: Region | WriteLog = write_log or region
        self.registry = registry
        self.badblocks = badblocks
        self.sessions = sessions
        self.snapshots = SnapshotSlots(registry.shared)
        self.data_size = region.data_size
        self.track_references = track_references
        # Compiled (transfer.pyx), and kept here: the I/O path calls them once a request.
        transfers = registry.transfers
        self.begin_read, self.count_read, self.count_write = (
            transfers.begin_read,
            transfers.count_read,
            transfers.count_write,
        )
        # The common case of a data file's read and write, compiled; serve_read and serve_write are
        # the general handlers it hands every other case to.
        self.datapath = DataPath(
            transfers,
            region,
            badblocks,
            general_read=self.serve_read,
            general_write=self.serve_write,
            as_fuse_error=self._as_fuse_error,
            file_codes=FILE_CODES,
            handle_layout=(handles.INODE_MASK, handles.DIRECT_SHIFT, handles.PID_SHIFT, handles.PID_MASK),
            track_references=track_references,
            plain_media=write_log is None,
        )
        self.initialized = False
        self._control = {FIRST_CONTROL_FILE_INODE + i: f for i, f in enumerate(control_files)}
        self._control_by_name = {f.name.encode(): inode for inode, f in self._control.items()}
        self._control_by_name[PIN_NAME] = PIN_INODE
        # This process's view of open handles: decoded from the handle, plus control snapshots.
        self._open: dict[int, OpenFile] = {}
        self._serial = 0
        self._mount_ns = time.time_ns()
        # Where unexpected errors were logged with their traceback: each place once, then counted.
        self._logged: set[tuple[str, str, str]] = set()

    def init(self) -> None:
        # pyfuse3 calls this while it answers FUSE_INIT; serving processes fork only after it.
        self.initialized = True

    def _count(self, counter: int, n: int = 1) -> None:
        self.registry.counter_row[counter] += n

    def _fuse_error(self, handler: str, err: Exception) -> pyfuse3.FUSEError:
        """What a request that raised ``err`` answers; an unexpected error is logged, each place once."""
        self._count(ERRORS)
        if isinstance(err, PmemfsError):
            return pyfuse3.FUSEError(err.errno)
        self._count(INTERNAL_ERRORS)
        frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
        where = (handler, type(err).__name__, f"{frame.filename}:{frame.lineno}" if frame else "?")
        if where not in self._logged:
            self._logged.add(where)
            log.error("unexpected error in %s: the request gets an error, serving goes on", handler, exc_info=err)
        if isinstance(err, MemoryError):
            return pyfuse3.FUSEError(errno.ENOMEM)
        return pyfuse3.FUSEError(err.errno if isinstance(err, OSError) and err.errno in PASSED_ERRNOS else errno.EIO)

    def _as_fuse_error(self, handler: str, err: Exception) -> pyfuse3.FUSEError:
        return err if isinstance(err, pyfuse3.FUSEError) else self._fuse_error(handler, err)

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
        return handles.encode(inode, direct, self.registry.column, slot, self._serial, pid)

    def _new_control_fh(self, inode: int, pid: int, content: bytes) -> int:
        """A handle for a control file whose reads show ``content``, whichever process serves them."""
        slot = self.snapshots.claim()
        if slot is None:
            raise pyfuse3.FUSEError(errno.ENFILE)  # every snapshot slot is held by an open control file
        fh = self._new_fh(inode, True, pid, slot=slot)
        try:
            self.snapshots.store(slot, fh, content)
        except BaseException:
            self.snapshots.free(slot, -1)  # a slot claimed for an open that failed
            raise
        return fh

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

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    @_guarded
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

    @_guarded
    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        # Like a block device: the size is the device's, anything else (times, mode) is accepted and ignored.
        if fields.update_size and not (inode in DATA_FILES and attr.st_size == self.data_size):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._attributes(inode)

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._entries(inode)
        return inode

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = list(self._entries(fh).items())
        for index, (name, inode) in enumerate(entries[start_id:], start=start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attributes(inode), index):
                break

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = PAGE_SIZE
        data.f_blocks = self.data_size // PAGE_SIZE
        data.f_files = len(DATA_FILES) + len(self._control_by_name)
        data.f_namemax = 255
        return data

    # Files
    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode in DATA_FILES:
            # Counted before the unmount's hold is looked at (see PageRegistry.hold_opens).
            self._count(DATA_OPENS)
            if not self.registry.may_open():
                self._count(DATA_RELEASES)
                raise pyfuse3.FUSEError(errno.ENXIO)  # the device is going away, as a removed disk
            # O_TRUNC is ignored, as a block device ignores it, so `dd of=pmem0` keeps the media.
            direct = bool(flags & os.O_DIRECT) and inode == PMEM0_INODE
            # keep_cache=False: each buffered open sees what O_DIRECT writers stored meanwhile.
            return pyfuse3.FileInfo(fh=self._new_fh(inode, direct, ctx.pid), direct_io=direct, keep_cache=False)
        if inode == PIN_INODE:
            fh = self._new_control_fh(inode, ctx.pid, b"")
            self.sessions.open(self._handle(fh).session)  # type: ignore[arg-type]
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if inode in self._control:
            control = self._control[inode]
            if flags & os.O_ACCMODE != os.O_RDONLY and control.store is None:
                raise pyfuse3.FUSEError(errno.EACCES)
            fh = self._new_control_fh(inode, ctx.pid, control.render())
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        raise pyfuse3.FUSEError(errno.EISDIR if inode in (pyfuse3.ROOT_INODE, CONTROL_DIR_INODE) else errno.ENOENT)

    def _misaligned(self) -> NoReturn:
        """O_DIRECT in units other than sectors: EINVAL, as the block layer answers it."""
        self._count(ERRORS)
        raise pyfuse3.FUSEError(errno.EINVAL)

    def _snapshot(self, fh: int, handle: OpenFile, off: int, size: int) -> bytes:
        """A control file's content for a read. A control file shows what it held at open; a pin
        session lists its pins afresh at every read at offset 0. Later reads of either continue
        the same snapshot, whichever serving process rendered it."""
        slot = handles.snapshot_slot(fh)
        if slot is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.session is not None and off == 0:
            self.snapshots.store(slot, fh, self.sessions.listing(handle.session))
        snapshot = self.snapshots.load(slot, fh, off, size)
        if snapshot is None:
            raise pyfuse3.FUSEError(errno.EBADF)  # released meanwhile
        return snapshot

    # The data path: the compiled common case (datapath.pyx), which hands every other case to
    # serve_read and serve_write. Serving processes call it straight from their compiled request
    # loop (lane.pyx); pyfuse3 calls it through these coroutines (the parent before it forks, the
    # trio loop, a single serving process).
    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes:  # type: ignore[override]
        return self.datapath.read(fh, off, size)  # type: ignore[no-any-return]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.datapath.write(fh, off, buf)  # type: ignore[no-any-return]

    # The reply is any contiguous buffer, so a view of the mapping saves a copy.
    def serve_read(self, fh: int, off: int, size: int) -> memoryview | bytes:
        try:
            handle = self._open.get(fh) or self._handle(fh)
            if not handle.file_code:
                return self._snapshot(fh, handle, off, size)
            direct = handle.direct
            if direct and (off | size) & SECTOR_MASK:
                self._misaligned()
            data_size = self.data_size
            if off >= data_size or size == 0:
                return b""
            if off + size > data_size:
                size = data_size - off
            if self.badblocks.changed_or_bad():
                self.badblocks.check_read(off, size)
            if self.track_references:
                # The reply is copied out of the mapping after we return: the serving loop ends the
                # transfer once it is out (pages.py). Counted in the same call.
                self.begin_read(direct, handle.pid, handle.file_code, off, size)
            else:
                self.count_read(handle.file_code, size, direct)
            return self.region.read(off, size)
        except pyfuse3.FUSEError:
            raise
        except Exception as err:
            raise self._fuse_error("read", err) from None

    def serve_write(self, fh: int, off: int, buf: bytes | memoryview) -> int:
        """``buf`` may be a view of the serving loop's buffer: nothing may keep it past the call."""
        try:
            handle = self._open.get(fh) or self._handle(fh)
            if not handle.file_code:
                return self._control_write(handle, buf)
            size = len(buf)
            direct = handle.direct
            if direct and (off | size) & SECTOR_MASK:
                self._misaligned()
            if off >= self.data_size:
                self._count(ERRORS)
                raise pyfuse3.FUSEError(errno.ENOSPC)
            if off + size > self.data_size:
                # A write across the end is short, as on /dev/pmemN; the next one gets ENOSPC.
                size = self.data_size - off
                buf = memoryview(buf)[:size]  # type: ignore[assignment]
            # A write clears the poisoned sectors it covers only once its store has happened: one
            # that fails (ENXIO, EBUSY, ENOSPC) leaves the poison where it was. One that covers a
            # bad sector only in part fails before anything is stored.
            poisoned = self.badblocks.changed_or_bad() and self.badblocks.check_write(off, size)
            if self.track_references:
                self.registry.begin_transfer(direct, handle.pid, handle.file_code, off, size)
                try:
                    self.media.write(off, buf)
                finally:
                    self.registry.end_transfer()  # the store is done: nothing of the request points into the mapping
            else:
                self.media.write(off, buf)
            if poisoned:
                self.badblocks.clear_written(off, size)
            self.count_write(handle.file_code, size, direct)
            return size
        except pyfuse3.FUSEError:
            raise
        except Exception as err:
            raise self._fuse_error("write", err) from None

    def _control_write(self, handle: OpenFile, buf: bytes | memoryview) -> int:
        if len(buf) > CONTROL_WRITE_MAX:
            raise pyfuse3.FUSEError(errno.EINVAL)  # no command or sysfs line is that long
        buf = bytes(buf)
        if handle.session is not None:
            self.sessions.command(handle.session, buf.decode(errors="replace"))
        else:
            control = self._control.get(handle.inode)
            if control is None or control.store is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            control.store(buf)
        return len(buf)

    @_guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        self._count(FSYNCS)
        self.media.flush()

    @_guarded
    async def flush(self, fh: int) -> None:
        pass

    @_guarded
    async def release(self, fh: int) -> None:
        # The kernel sends a release once: what it undoes must be undone whatever else fails here,
        # or the handle stays counted open (no umount), its pins held and its slot taken for good.
        handle = self._open.pop(fh, None) or OpenFile.from_fh(fh)
        if handle.file_code:
            self._count(DATA_RELEASES)
        slot = handles.snapshot_slot(fh)
        try:
            if slot is not None:
                self.snapshots.free(slot, fh)
        finally:
            if handle.session is not None:
                self.sessions.close(handle.session)
