"""Media errors: poison a sector, expect EIO where a real /dev/pmem0 gives it, and clear it by a write.

``pmem.inject_error`` is what ``ndctl inject-error`` is on real hardware (and does not do on emulated
pmem): 512-byte blocks of the data area go bad and stay bad, across remounts, until a write covers them.
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest

SECTOR = 512
PAGE = 4096


def direct(path: str, flags: int = os.O_RDWR) -> int:
    return os.open(path, flags | os.O_DIRECT)


@pytest.mark.pmem(size="64M")
def test_a_poisoned_sector_reads_as_eio_until_rewritten(pmem):  # type: ignore[no-untyped-def]
    buffer = mmap.mmap(-1, PAGE)
    pmem.inject_error(block=16, count=1)  # bytes 8192..8703 of pmem0
    assert pmem.badblocks() == [(16, 1)]

    fd = direct(pmem.pmem0)
    try:
        with pytest.raises(OSError) as bad:
            os.preadv(fd, [buffer], 2 * PAGE)  # the page that holds the bad sector
        assert bad.value.errno == errno.EIO
        os.preadv(fd, [buffer], PAGE)  # its neighbour reads fine

        # A write that covers the whole bad sector stores the data and clears the poison, as on pmem.
        buffer[:] = b"\x5a" * PAGE
        os.pwritev(fd, [buffer], 2 * PAGE)
        assert pmem.badblocks() == []
        os.preadv(fd, [buffer], 2 * PAGE)
        assert bytes(buffer) == b"\x5a" * PAGE
    finally:
        os.close(fd)


@pytest.mark.pmem(size="64M")
def test_the_dax_view_refuses_a_mapping_over_poison(pmem):  # type: ignore[no-untyped-def]
    import pmemfs

    pmem.inject_error(block=0, count=8)  # the first page
    with pytest.raises(pmemfs.MediaError, match="poisoned"):
        pmem.dax(0, PAGE)
    assert pmem.clear_errors() == [(0, 8)]  # zeroes the blocks, which clears them
    with pmem.dax(0, PAGE) as dax:
        assert not dax.array.any()
