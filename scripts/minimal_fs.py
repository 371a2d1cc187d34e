#!/usr/bin/env python3
"""The Python floor for scripts/bench.py: the least a pyfuse3 + trio daemon can do to serve one file.

It serves BACKING's bytes as MOUNTPOINT/data, of BACKING's size, over a MAP_SHARED mapping: read
returns a memoryview slice of the mapping, write copies into it, O_DIRECT opens are served
``direct_io``; ``pyfuse3.main()`` with its default settings. Nothing else (no registry, no
badblocks, no counters), so what pmemfs adds on top of it is the difference. Unmounts on SIGTERM
and SIGINT, and ends when unmounted from outside.

    scripts/minimal_fs.py BACKING MOUNTPOINT
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import signal
import stat

import pyfuse3
import trio

NAME = b"data"
FILE_INODE = pyfuse3.ROOT_INODE + 1


class MinimalFs(pyfuse3.Operations):
    def __init__(self, mapping: mmap.mmap) -> None:
        super().__init__()
        self.view = memoryview(mapping)
        self.size = len(mapping)

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_uid, entry.st_gid = os.getuid(), os.getgid()
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode, entry.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            entry.st_mode, entry.st_nlink, entry.st_size = stat.S_IFREG | 0o644, 1, self.size
        return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attributes(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=bool(flags & os.O_DIRECT), keep_cache=False)

    # pyfuse3 sends any buffer: a slice of the mapping saves a copy into a bytes object.
    async def read(self, fh: int, off: int, size: int) -> memoryview:  # type: ignore[override]
        return self.view[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        length = min(len(buf), max(self.size - off, 0))
        if buf and not length:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.view[off : off + length] = buf if length == len(buf) else memoryview(buf)[:length]
        return length


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(terminate_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()  # unmounted from outside: stop waiting for signals


async def terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing", help="the file to serve (its size is the served file's size)")
    parser.add_argument("mountpoint")
    args = parser.parse_args()
    with open(args.backing, "r+b") as backing:
        mapping = mmap.mmap(backing.fileno(), 0, flags=mmap.MAP_SHARED)
    pyfuse3.init(MinimalFs(mapping), args.mountpoint, {"fsname=minimalfs"})
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
