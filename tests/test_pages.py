"""Unit tests of the page registry (bias arithmetic, ranges, unbalanced puts, where records live,
reset) and of the image state that serving processes share with it."""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from conftest import create_image, sha256_of, wait_for

from pmemfs.errors import DeviceGone, NoSpace, PageBusy, UnbalancedPut
from pmemfs.infoblock import PAGE_SIZE
from pmemfs.memmap import memmap_span, open_registry, reset_records
from pmemfs.pages import (
    CHUNK_PAGES,
    GUP_PIN_COUNTING_BIAS,
    RECORD_DTYPE,
    Kind,
    PageRegistry,
    chunks_for,
    holders_by_range,
)
from pmemfs.region import Region
from pmemfs.shared import MAP_NORESERVE, SharedState
from pmemfs.snapshots import SnapshotSlots


@pytest.fixture
def registry() -> PageRegistry:
    shared = mmap.mmap(-1, 100_000 * RECORD_DTYPE.itemsize, flags=mmap.MAP_SHARED)
    return PageRegistry(np.frombuffer(shared, dtype=RECORD_DTYPE), epoch=7)


@contextlib.contextmanager
def open_region(path: str) -> Iterator[Region]:
    """The image as a daemon holds it; closed without marking it clean, as a daemon that dies."""
    region = Region.open(path)
    try:
        yield region
    finally:
        region.close(clean=False)


def test_get_put_pin_unpin_bias(registry: PageRegistry) -> None:
    registry.get_page(10)
    registry.pin_user_pages(10)
    assert registry.page_ref_count(10) == 1 + GUP_PIN_COUNTING_BIAS
    assert registry.page_maybe_dma_pinned(10)
    registry.unpin_user_pages(10)
    assert registry.page_ref_count(10) == 1 and not registry.page_maybe_dma_pinned(10)
    registry.put_page(10)
    assert registry.page_ref_count(10) == 0
    st = registry.statistics()
    assert (st["nr_foll_pin_acquired"], st["nr_foll_pin_released"], st["nr_get_page"], st["nr_put_page"]) == (
        1,
        1,
        1,
        1,
    )


def test_a_thousand_gets_are_not_a_pin(registry: PageRegistry) -> None:
    for _ in range(GUP_PIN_COUNTING_BIAS - 1):
        registry.get_page(3)
    assert not registry.page_maybe_dma_pinned(3)
    registry.get_page(3)
    assert registry.page_maybe_dma_pinned(3)  # the kernel's documented false positive


def test_range_operations_and_referenced_ranges(registry: PageRegistry) -> None:
    registry.pin_user_pages(100, 50)
    registry.get_page(120, 50)
    assert registry.referenced_ranges() == [
        {"pfn": 100, "npages": 20, "refcount": 1024, "pins": 1},
        {"pfn": 120, "npages": 30, "refcount": 1025, "pins": 1},
        {"pfn": 150, "npages": 20, "refcount": 1, "pins": 0},
    ]
    assert registry.first_busy_page(0, 1000) == 100
    assert registry.first_busy_page(170, 1000) is None
    registry.unpin_user_pages(100, 50)
    registry.put_page(120, 50)
    assert registry.referenced_ranges() == []
    assert registry.statistics()["nr_foll_pin_acquired"] == registry.statistics()["nr_foll_pin_released"] == 50


def test_ranges_across_chunks(registry: PageRegistry) -> None:
    registry.pin_user_pages(32000, 2000)  # spans two 32768-page chunks
    assert registry.referenced_ranges() == [{"pfn": 32000, "npages": 2000, "refcount": 1024, "pins": 1}]
    registry.unpin_user_pages(32000, 2000)


@pytest.mark.parametrize("npages", [1, 64])
def test_unbalanced_put_is_refused_and_counted(registry: PageRegistry, npages: int) -> None:
    registry.get_page(5, npages)
    with pytest.raises(UnbalancedPut):
        registry.unpin_user_pages(5, npages)
    with pytest.raises(UnbalancedPut):
        registry.put_page(4, npages + 1)  # page 4 has no reference
    assert registry.refcounts(4, npages + 1).tolist() == [0] + [1] * npages
    assert registry.statistics()["nr_unbalanced"] == 2
    assert any(e.what == "refused" for e in registry.events())


def test_another_process_column_counts_toward_the_total(registry: PageRegistry) -> None:
    other = PageRegistry(registry.records, epoch=7, column=1, shared=registry.shared)
    other.pin_user_pages(9)
    registry.unpin_user_pages(9)  # released by another serving process: allowed, the sum stays >= 0
    assert registry.page_ref_count(9) == 0
    assert (
        registry.records["refs"][9, 0] == -GUP_PIN_COUNTING_BIAS
        and registry.records["refs"][9, 1] == GUP_PIN_COUNTING_BIAS
    )


def test_transfers_are_compiled_and_leave_the_fast_path_where_the_sums_must_decide(registry: PageRegistry) -> None:
    import pmemfs.transfer

    assert pmemfs.transfer.__file__.endswith(".so")  # no pure-Python stand-in exists to fall back on
    # A range across two chunks of records that nobody backed yet: the registry backs them.
    first = CHUNK_PAGES - 3
    registry.begin_transfer(True, 7, 1, first * PAGE_SIZE, 6 * PAGE_SIZE)
    assert registry.transfers.transfer == (True, 7, 1, first, 6, 0)
    assert registry.refcounts(first, 6).tolist() == [GUP_PIN_COUNTING_BIAS] * 6
    registry.end_transfer()
    assert not registry.transfers.in_flight and registry.transfers.transfer is None
    assert registry.refcounts(first, 6).tolist() == [0] * 6
    # Page 9's reference was taken by another process and dropped by this one, so this process's
    # word is below what its transfer puts back: the sums decide, and allow it.
    other = PageRegistry(registry.records, epoch=7, column=1, shared=registry.shared)
    other.pin_user_pages(9)
    registry.unpin_user_pages(9)
    registry.begin_transfer(False, 7, 1, 8 * PAGE_SIZE + 100, 2 * PAGE_SIZE)  # pages 8..10
    assert registry.refcounts(8, 3).tolist() == [1, 1, 1]
    registry.end_transfer()
    assert registry.refcounts(8, 3).tolist() == [0, 0, 0]
    stats = registry.statistics()
    assert stats["nr_get_page"] == 3 and stats["nr_put_page"] == 3 and stats["nr_unbalanced"] == 0
    with pytest.raises(ValueError, match="outside the data area"):
        registry.begin_transfer(True, 7, 1, (registry.npfns - 1) * PAGE_SIZE, 2 * PAGE_SIZE)
    assert not registry.transfers.in_flight


def test_killed_device_refuses_new_pins(registry: PageRegistry) -> None:
    holder = registry.take(Kind.LONGTERM, 42, "dax0", 0, 8)
    registry.kill()
    with pytest.raises(DeviceGone):
        registry.pin_user_pages(100)
    registry.drop(holder)  # dropping what is held still works during teardown
    registry.revive()
    registry.pin_user_pages(100)
    assert registry.statistics()["nr_refused"] == 1
    assert registry.page_ref_count(100) == GUP_PIN_COUNTING_BIAS  # the refused pin left nothing


def test_only_the_last_killer_revives(registry: PageRegistry) -> None:
    registry.kill(session=1)
    registry.kill(session=2)  # a second teardown while the first is draining
    registry.revive(killer=1)  # the first session closes: not its kill any more
    assert not registry.alive
    registry.revive(killer=2)
    assert registry.alive


def test_pin_and_unpin_of_one_gib_are_single_operations(registry: PageRegistry) -> None:
    big = PageRegistry(
        np.frombuffer(mmap.mmap(-1, 262144 * RECORD_DTYPE.itemsize, flags=mmap.MAP_SHARED), dtype=RECORD_DTYPE), epoch=1
    )
    big.pin_user_pages(0, 262144)
    assert big.referenced_ranges() == [{"pfn": 0, "npages": 262144, "refcount": 1024, "pins": 1}]
    big.unpin_user_pages(0, 262144)
    assert big.referenced_ranges() == []


def test_map_dev_records_live_in_the_image_carve_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with open_region(create_image(tmp_path / "x.img", "64M")) as region:
        registry, stale = open_registry(region, previous_epoch=0, epoch=1)
        assert stale == []
        registry.pin_user_pages(3)
        start, _ = memmap_span(region)
        record = np.frombuffer(bytes(region.image[start + 3 * 64 : start + 4 * 64]), dtype=RECORD_DTYPE)[0]
        assert record["epoch"] == 1 and record["refs"].sum() == GUP_PIN_COUNTING_BIAS


def test_map_mem_records_stay_out_of_the_image(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with open_region(create_image(tmp_path / "x.img", "64M", "--map", "mem")) as region:
        before = bytes(region.image[: region.geometry.dataoff])
        registry, _ = open_registry(region, previous_epoch=0, epoch=1)
        registry.pin_user_pages(0, 100)
        assert bytes(region.image[: region.geometry.dataoff]) == before


def test_stale_references_of_a_dead_daemon_are_reported_and_reset_in_bulk(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = create_image(tmp_path / "x.img", "256M")
    with open_region(path) as region:  # the daemon "dies": nothing resets the records
        registry, _ = open_registry(region, previous_epoch=0, epoch=1)
        registry.pin_user_pages(10, 20)
        registry.get_page(40000, 3)

    with open_region(path) as region:
        start, end = memmap_span(region)
        # One page of records for each place referenced, not megabytes.
        second = start + 40000 * RECORD_DTYPE.itemsize // PAGE_SIZE * PAGE_SIZE
        assert region.extents(start, end) == [(start, start + PAGE_SIZE), (second, second + PAGE_SIZE)]
        before = sha256_of(path)
        registry, stale = open_registry(region, previous_epoch=1, epoch=2)
        assert stale == [
            {"pfn": 10, "npages": 20, "refcount": 1024, "pins": 1},
            {"pfn": 40000, "npages": 3, "refcount": 1, "pins": 0},
        ]
        assert sha256_of(path) == before  # reading what is stale writes nothing: the mount may still fail
        reset_records(region)
        assert region.extents(start, end) == []  # punched back to a hole
        assert registry.referenced_ranges() == []
        assert any(e.what == "reset" for e in registry.events())


def test_records_of_another_epoch_are_ignored(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = create_image(tmp_path / "x.img", "64M")
    with open_region(path) as region:
        registry, _ = open_registry(region, previous_epoch=0, epoch=5)
        registry.pin_user_pages(1)
    with open_region(path) as region:
        _, stale = open_registry(region, previous_epoch=6, epoch=7)
        assert stale == []


def test_serving_processes_share_what_is_allocated_and_what_was_punched(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A page one serving process wrote, another stores into through the mapping; a hole one of them
    punched, every other writes with pwrite again (which allocates it) and reads as zeros."""
    with open_region(create_image(tmp_path / "x.img", "64M")) as region:
        page = region.geometry.dataoff // PAGE_SIZE
        assert _in_child(lambda: region.write(0, b"a" * PAGE_SIZE))[0] == 0
        assert region._known[page] and region.read(0, PAGE_SIZE) == b"a" * PAGE_SIZE
        assert _in_child(lambda: region.punch_hole(region.geometry.dataoff, PAGE_SIZE))[0] == 0
        assert not region._known[page]
        assert region.read(0, PAGE_SIZE) == bytes(PAGE_SIZE)  # with pread: nothing is allocated by it
        assert region.extents(region.geometry.dataoff, region.geometry.dataoff + PAGE_SIZE) == []
        region.write(0, b"b" * PAGE_SIZE)
        assert region.extents(region.geometry.dataoff, region.geometry.dataoff + PAGE_SIZE)


def _in_child(work: Callable[[], object]) -> tuple[int, float]:
    """Run ``work`` in a forked process (another serving process, as far as locks go); return its
    exit status and how long it took."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            started = time.monotonic()
            work()
            os.write(write_end, str(time.monotonic() - started).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    took = os.read(read_end, 64)
    os.close(read_end)
    return os.waitstatus_to_exitcode(status), float(took or "nan")


def test_a_transfer_into_pages_being_zeroed_waits_for_the_zero(registry: PageRegistry) -> None:
    pfn = 100

    def transfer(page: int) -> Callable[[], None]:
        def run() -> None:
            registry.set_column(2)  # another serving process
            registry.begin_transfer(True, 42, 1, page * PAGE_SIZE, PAGE_SIZE)
            registry.end_transfer()

        return run

    results: list[tuple[int, float]] = []
    with registry.excluding_transfers(pfn, 8):
        status, took = _in_child(transfer(pfn + 20))
        assert status == 0 and took < 0.1  # outside the zero's range: no wait
        child = threading.Thread(target=lambda: results.append(_in_child(transfer(pfn + 3))))
        child.start()
        time.sleep(0.3)  # a window for the transfer to go through, which it must not
        assert not results, "a transfer went through a zero under way"
        assert not registry.refcounts(pfn, 8).any()  # the waiting transfer keeps out of the zero's way
    child.join(timeout=30)
    assert results and results[0][0] == 0 and results[0][1] >= 0.25
    assert not registry.refcounts(pfn, 30).any()


def test_one_zero_at_a_time_and_a_dead_zeroers_gate_reopens(registry: PageRegistry) -> None:
    def zero_and_die() -> None:
        with registry.excluding_transfers(10, 1):
            os._exit(0)  # killed half-way: the gate stays closed, the lock goes with the process

    release_read, release_write = os.pipe()

    def hold_a_zero() -> None:
        with registry.excluding_transfers(10, 1):
            os.read(release_read, 1)  # until the test has tried a second zero

    holder = threading.Thread(target=lambda: _in_child(hold_a_zero))
    holder.start()
    wait_for(lambda: registry.io_gate.closed, what="the other process's zero to start")
    with pytest.raises(PageBusy):
        with registry.excluding_transfers(500, 1):
            pass
    os.write(release_write, b"x")
    holder.join(timeout=30)
    assert _in_child(zero_and_die)[0] == 0
    status, took = _in_child(lambda: registry.begin_transfer(True, 42, 1, 10 * PAGE_SIZE, PAGE_SIZE))
    assert status == 0 and took < 1


def test_records_spill_to_dram_when_the_image_cannot_back_them() -> None:
    """A full filesystem must not fail a reference: the chunks it cannot back live in the spill."""
    npfns = 4 * CHUNK_PAGES
    records = np.frombuffer(mmap.mmap(-1, npfns * RECORD_DTYPE.itemsize, flags=mmap.MAP_SHARED), dtype=RECORD_DTYPE)
    spill = np.frombuffer(mmap.mmap(-1, npfns * RECORD_DTYPE.itemsize, flags=mmap.MAP_SHARED), dtype=RECORD_DTYPE)
    full = {1, 2}  # chunks whose records the "filesystem" has no room for

    def back_chunk(chunk: int) -> None:
        if chunk in full:
            raise NoSpace("full")

    registry = PageRegistry(records, epoch=3, back_chunk=back_chunk, spill=spill)
    # A range across image-backed and spilled chunks, a single page in a spilled one, a transfer.
    registry.pin_user_pages(CHUNK_PAGES - 2, 4)
    registry.get_page(2 * CHUNK_PAGES + 5)
    registry.begin_transfer(True, 7, 1, (2 * CHUNK_PAGES + 5) * PAGE_SIZE, PAGE_SIZE)
    assert list(registry.refcounts(CHUNK_PAGES - 2, 4)) == [1024] * 4
    assert registry.page_ref_count(2 * CHUNK_PAGES + 5) == 1025
    assert records["refs"][CHUNK_PAGES:].sum() == 0  # nothing went to the image's records of full chunks
    assert registry.referenced_ranges() == [
        {"pfn": CHUNK_PAGES - 2, "npages": 4, "refcount": 1024, "pins": 1},
        {"pfn": 2 * CHUNK_PAGES + 5, "npages": 1, "refcount": 1025, "pins": 1},
    ]
    assert registry.first_busy_page(CHUNK_PAGES, 3 * CHUNK_PAGES) == CHUNK_PAGES
    assert registry.statistics()["spilled_record_pages"] == 2 * CHUNK_PAGES
    registry.end_transfer()
    registry.put_page(2 * CHUNK_PAGES + 5)
    registry.unpin_user_pages(CHUNK_PAGES - 2, 4)
    assert registry.referenced_ranges() == [] and not spill["refs"].any() and not records["refs"].any()
    with pytest.raises(UnbalancedPut):
        registry.put_page(3 * CHUNK_PAGES)  # never backed: nothing to drop, and nothing was read


def test_queries_of_a_huge_device_take_bounded_memory() -> None:
    """A zero of a whole 1 TiB device asks for the first busy page of 2^28 pages: batches, not one array."""
    npfns = (1 << 40) // PAGE_SIZE
    records = np.frombuffer(
        mmap.mmap(-1, npfns * RECORD_DTYPE.itemsize, flags=mmap.MAP_SHARED | MAP_NORESERVE), dtype=RECORD_DTYPE
    )
    registry = PageRegistry(records, epoch=1, shared=SharedState(chunks_for(npfns)))
    scattered = range(0, npfns - 20, npfns // 1000)
    for pfn in scattered:
        registry.get_page(pfn)
    registry.pin_user_pages(npfns - 10, 10)
    tracemalloc.start()
    try:
        assert registry.first_busy_page(1, npfns - 1) == npfns // 1000
        assert len(registry.referenced_ranges()) == len(scattered) + 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak >> 20} MiB"


def test_holders_by_range_matches_a_scan_of_every_holder(registry: PageRegistry) -> None:
    rng = random.Random(5)
    for _ in range(200):
        registry.take(Kind.PIN, 1, "pmem0", rng.randrange(5000), rng.randrange(1, 300))
    ranges, holders = registry.referenced_ranges(), registry.holders()
    expected = [
        [i for i, h in enumerate(holders) if h.pfn < r["pfn"] + r["npages"] and r["pfn"] < h.pfn + h.npages]
        for r in ranges
    ]
    assert holders_by_range(ranges, holders) == expected


def test_zero_flushes_outside_the_window_in_which_transfers_wait(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A transfer into pages being zeroed waits for the zero: the window must hold the punch and the
    stores, never a flush of the whole image (seconds, with gigabytes dirty) nor the header's."""
    from pmemfs.badblocks import BadBlocks
    from pmemfs.sessions import PinSessions, Session

    with open_region(create_image(tmp_path / "x.img", "64M")) as region:
        registry, _ = open_registry(region, previous_epoch=0, epoch=1)
        badblocks = BadBlocks(region.data_size // 512, region.badblock_store(), region.shared)
        sessions = PinSessions(registry, region, badblocks)
        region.write(0, b"x" * 3 * PAGE_SIZE)
        badblocks.add(8, 8)  # sectors of the second page: the zero clears them, a header write
        gate_when: dict[str, list[int]] = {"flush": [], "header": []}
        flush, write_header = region.flush, region._write_header

        def watched_flush() -> None:
            gate_when["flush"].append(registry.io_gate.condition("gate_zeroing").is_set)
            flush()

        def watched_header(header):  # type: ignore[no-untyped-def]
            gate_when["header"].append(registry.io_gate.condition("gate_zeroing").is_set)
            write_header(header)

        region.flush, region._write_header = watched_flush, watched_header  # type: ignore[method-assign]
        sessions.zero(Session(1, os.getpid()), 100, 2 * PAGE_SIZE)
        assert gate_when == {"flush": [0], "header": [0]}
        assert region.read(0, 3 * PAGE_SIZE) == b"x" * 100 + bytes(2 * PAGE_SIZE) + b"x" * (PAGE_SIZE - 100)
        assert badblocks.extents == []


def test_snapshots_stored_and_read_at_once_are_read_whole_and_leak_nothing() -> None:
    """A pin session's listing is stored anew at every read at offset 0, by any serving process, while
    others read it: every read is one whole listing, and replaced listings give their memory back."""
    shared = SharedState()
    snapshots = SnapshotSlots(shared)
    slot = snapshots.claim()
    assert slot is not None
    versions = [bytes([65 + i]) * (3000 + 1000 * i) for i in range(4)]
    snapshots.store(slot, 99, versions[0])

    def rewrite() -> None:
        for n in range(3000):
            snapshots.store(slot, 99, versions[n % 4])

    results: list[tuple[int, float]] = []
    writers = [threading.Thread(target=lambda: results.append(_in_child(rewrite))) for _ in range(2)]
    for writer in writers:
        writer.start()
    torn = reads = 0
    while any(writer.is_alive() for writer in writers):
        reads += 1
        torn += snapshots.load(slot, 99) not in versions
    for writer in writers:
        writer.join()
    assert [status for status, _ in results] == [0, 0]
    assert reads > 100 and torn == 0
    assert snapshots.load(slot, 99, 1000, 10) == snapshots.load(slot, 99)[1000:1010]  # type: ignore[index]
    # One snapshot of at most 6 KiB is live: the heap holds its pages, not the 6000 replaced ones.
    assert os.fstat(shared.snapshot_heap).st_blocks * 512 <= 2 * 4096
    snapshots.free(slot, 99)
    assert os.fstat(shared.snapshot_heap).st_blocks == 0


def test_whether_a_filesystem_tells_holes_from_data_is_probed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Where Linux only emulates SEEK_HOLE (the whole file is data), a hole must never be learned as
    allocated: the probe says no there, and where it cannot probe at all."""
    from pmemfs.region import seek_reports_holes

    assert seek_reports_holes(str(tmp_path))
    assert not seek_reports_holes("/proc")  # no file can be made there: assume the worst


def test_a_read_learns_the_whole_data_extent_unless_a_zero_may_punch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """After a remount nothing is known: the first read of written data learns its whole extent
    (one SEEK_HOLE, which walks the page cache on tmpfs, instead of one per page), but only when no
    zero can punch meanwhile; while another process zeroes, only the pages the read references."""
    from pmemfs.shared import Lock

    path = create_image(tmp_path / "x.img", "64M")
    with open_region(path) as region:
        region.write(0, b"d" * (256 * PAGE_SIZE))
    with open_region(path) as region:
        first = region.geometry.dataoff // PAGE_SIZE
        assert not region._known[first : first + 256].any()
        held_r, held_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                region.shared.lock(Lock.ZEROING).acquire()  # a zero under way in another serving process
                os.write(held_w, b"x")
                os.read(go_r, 1)
            finally:
                os._exit(0)
        try:
            os.read(held_r, 1)
            assert region.read(PAGE_SIZE, PAGE_SIZE) == b"d" * PAGE_SIZE
        finally:
            os.write(go_w, b"x")
            os.waitpid(pid, 0)
        assert region._known[first : first + 256].tolist() == [0, 1] + [0] * 254
        assert region.read(0, PAGE_SIZE) == b"d" * PAGE_SIZE
        assert region._known[first : first + 256].all()
