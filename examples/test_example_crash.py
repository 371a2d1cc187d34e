"""A crash between writes: kill -9 of the device's daemon, then what survived.

pmemfs promises what a real /dev/pmem0 promises: a write that returned is on the media. So after the
daemon dies every acknowledged record is there, the one that was refused is not, and the device
counts an unclean shutdown (what the kernel's "dirty shutdown" counter does for NVDIMMs).
"""

from __future__ import annotations

import mmap
import os

import pytest

PAGE = 4096


def write_record(fd: int, index: int, payload: bytes) -> None:
    buffer = mmap.mmap(-1, PAGE)
    buffer[:] = payload.ljust(PAGE, b"\0")
    os.pwritev(fd, [buffer], index * PAGE)


def read_record(path: str, index: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = mmap.mmap(-1, PAGE)
        os.preadv(fd, [buffer], index * PAGE)
        return bytes(buffer).rstrip(b"\0")
    finally:
        os.close(fd)


@pytest.mark.pmem(size="64M")
def test_acknowledged_writes_survive_a_kill(pmem):  # type: ignore[no-untyped-def]
    fd = os.open(pmem.pmem0, os.O_RDWR | os.O_DIRECT)
    try:
        write_record(fd, 0, b"first")
        write_record(fd, 1, b"second")
        pmem.kill()  # every daemon process, SIGKILL: nothing is flushed, nothing is unmounted cleanly
        with pytest.raises(OSError):
            write_record(fd, 2, b"third")  # the device is gone: refused, never acknowledged
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the release of a file on a dead mount fails too

    pmem.remount()
    assert [read_record(pmem.pmem0, i) for i in range(3)] == [b"first", b"second", b""]
    status = pmem.status()
    assert status["unclean_shutdowns"] == 1 and status["previous_shutdown"] == "unclean"
    pmem.assert_balanced()  # the registry state the dead daemon left was reset at the remount
