"""A direct-I/O code path under test, and the check it wants at its end: every pin it took was released.

The code under test is a tiny append-only record log that writes 4 KiB records with O_DIRECT, as a
storage engine's write-ahead log would on /dev/pmem0. pmemfs pins the pages of every O_DIRECT transfer
(pin_user_pages) and counts them; a transfer that never completes, or a registration never dropped,
shows as a page still pinned.
"""

from __future__ import annotations

import mmap
import os

import pytest

RECORD = 4096


class RecordLog:
    """The code under test: fixed-size records, appended and read back with O_DIRECT."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self.buffer = mmap.mmap(-1, RECORD)  # O_DIRECT wants an aligned buffer: mmap's is page-aligned
        self.count = 0

    def append(self, payload: bytes) -> int:
        self.buffer[:] = payload.ljust(RECORD, b"\0")
        os.pwritev(self.fd, [self.buffer], self.count * RECORD)
        self.count += 1
        return self.count - 1

    def read(self, index: int) -> bytes:
        os.preadv(self.fd, [self.buffer], index * RECORD)
        return bytes(self.buffer).rstrip(b"\0")

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.pmem(size="64M")
def test_records_round_trip_and_every_pin_is_released(pmem):  # type: ignore[no-untyped-def]
    log = RecordLog(pmem.pmem0)
    try:
        for i in range(64):
            log.append(f"record {i}".encode())
        assert [log.read(i) for i in (0, 31, 63)] == [b"record 0", b"record 31", b"record 63"]
    finally:
        log.close()
    # No page referenced now, and as many pins released as acquired since the mount: one a page for
    # each of the 67 transfers. (--pmem-check-pins runs this after every test that used the fixture.)
    pmem.assert_balanced()
    registry = pmem.status()["registry"]
    assert registry["nr_foll_pin_acquired"] == registry["nr_foll_pin_released"] == 64 + 3


@pytest.mark.pmem(size="64M", mode="devdax")
def test_a_registration_held_past_the_end_is_caught(pmem):  # type: ignore[no-untyped-def]
    # A long-term pin (an RDMA registration) on the device-dax view, still held when the test checks.
    with pmem.pin("dax0", 0, 2 * RECORD, longterm=True):
        with pytest.raises(AssertionError, match="holds a longterm reference on dax0"):
            pmem.assert_no_pins(timeout_s=0.1)
    pmem.assert_balanced()
