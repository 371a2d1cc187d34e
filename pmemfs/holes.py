"""Holes in files: punching them (fallocate(2) with FALLOC_FL_PUNCH_HOLE, which Python's os module
does not offer; the blocks go back to the filesystem and the range reads as zeros), and finding
the data between them (SEEK_DATA / SEEK_HOLE)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset + length) of ``fd``, keeping its size; raise OSError on failure."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The allocated (data) extents of ``fd`` within [start, end), as SEEK_DATA/SEEK_HOLE report them."""
    found = []
    offset = start
    while offset < end:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                break
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        found.append((data, min(hole, end)))
        offset = hole
    return found
