"""The compiled common case of a data read or write (datapath.pyx) against the general handlers it
stands in front of (fs.py's serve_read/serve_write): the same answers, media, references and counters
for any request, and the general handlers reached only where the common case ends."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pyfuse3
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pmemfs.badblocks import BadBlocks
from pmemfs.fs import DAX0_INODE, FIRST_CONTROL_FILE_INODE, PMEM0_INODE, PmemOperations
from pmemfs.infoblock import PAGE_SIZE
from pmemfs.memmap import open_registry
from pmemfs.region import Region
from pmemfs.sessions import PinSessions

SIZE = 16 << 20


class CountingOperations(PmemOperations):
    """The tree, counting what reaches the general handlers."""

    general = 0

    def serve_read(self, fh: int, off: int, size: int) -> memoryview | bytes:
        self.general += 1
        return super().serve_read(fh, off, size)

    def serve_write(self, fh: int, off: int, buf: Any) -> int:
        self.general += 1
        return super().serve_write(fh, off, buf)


@pytest.fixture
def tree(tmp_path) -> Iterator[CountingOperations]:  # type: ignore[no-untyped-def]
    image = str(tmp_path / "pmem.img")
    create = [sys.executable, "-m", "pmemfs", "create", image, "--size", str(SIZE)]
    subprocess.run(create, check=True, capture_output=True)
    region = Region.open(image)
    try:
        registry, _ = open_registry(region, previous_epoch=0, epoch=1, shared=region.shared)
        badblocks = BadBlocks(region.data_size // 512, region.badblock_store(), region.shared)
        ops = CountingOperations(region, registry, badblocks, PinSessions(registry, region, badblocks), [])
        # The first half of the data area has its blocks (written once through the general path).
        ops.serve_write(ops._new_fh(DAX0_INODE, False, 1), 0, bytes(region.data_size // 2))
        yield ops
    finally:
        region.close(clean=False)


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        result = call()
    except pyfuse3.FUSEError as err:
        return "errno", err.errno
    return "ok", bytes(result) if not isinstance(result, int) else result


def _state(ops: PmemOperations) -> tuple[list[int], list[int]]:
    return list(ops.registry.counter_row), ops.registry.refcounts(0, ops.registry.npfns).tolist()


def _media(ops: PmemOperations, lo: int, hi: int) -> bytes:
    """The data area's bytes [lo, hi), read from the image file (a read through the mapping would
    give a hole its blocks)."""
    return os.pread(ops.region.fd, hi - lo, ops.region.direct_access()[2] + lo)


def test_the_common_case_is_compiled_and_references_the_pages_as_the_registry_does(tree: CountingOperations) -> None:
    ops = tree
    fh = ops._new_fh(PMEM0_INODE, True, 4242)
    general = ops.general
    data = os.urandom(3 * PAGE_SIZE)
    assert ops.datapath.write(fh, 5 * PAGE_SIZE, data) == len(data)
    assert ops.registry.refcounts(5, 3).tolist() == [0, 0, 0]  # a write's reference ends with its store
    assert bytes(ops.datapath.read(fh, 5 * PAGE_SIZE, len(data))) == data
    # A read's reference lasts until the serving loop ends it, once the reply is out.
    assert ops.registry.transfers.transfer == (True, 4242, 1, 5, 3, 0)
    ops.registry.end_transfer()
    assert ops.registry.refcounts(5, 3).tolist() == [0, 0, 0]
    assert ops.general == general, "the common case went to the general handler"
    stats = ops.registry.statistics()
    assert stats["nr_foll_pin_acquired"] == stats["nr_foll_pin_released"] and stats["nr_unbalanced"] == 0


def test_every_other_case_goes_to_the_general_handler(tree: CountingOperations) -> None:
    ops = tree
    direct = ops._new_fh(PMEM0_INODE, True, 1)
    cases = {
        "misaligned": lambda: ops.datapath.read(direct, 100, 4096),
        "past the end": lambda: ops.datapath.read(direct, ops.data_size, 4096),
        "pages without blocks": lambda: ops.datapath.read(direct, ops.data_size - 4096, 4096),
        "a write across the end": lambda: ops.datapath.write(direct, ops.data_size - 512, bytes(1024)),
        "a control file": lambda: ops.datapath.read(ops._new_fh(FIRST_CONTROL_FILE_INODE, True, 1), 0, 10),
    }
    for name, call in cases.items():
        general = ops.general
        _outcome(call)
        ops.registry.end_transfer()
        assert ops.general == general + 1, name
    ops.badblocks.add(4, 1)  # bytes 2048-2559
    try:
        general = ops.general
        assert _outcome(lambda: ops.datapath.read(direct, 0, 4096)) == ("errno", errno.EIO)
        assert _outcome(lambda: ops.datapath.read(direct, 8192, 4096))[0] == "ok"  # the table is not empty
        assert ops.general == general + 2
    finally:
        ops.badblocks.clear(4, 1)
    ops.registry.trace_io(1, True)  # the I/O gate is closed while a trace session wants every transfer
    try:
        general = ops.general
        _outcome(lambda: ops.datapath.read(direct, 0, 4096))
        ops.registry.end_transfer()
        assert ops.general == general + 1
    finally:
        ops.registry.trace_io(1, False)


REQUEST = st.tuples(
    st.sampled_from(["read", "write"]),
    st.sampled_from([(PMEM0_INODE, True), (PMEM0_INODE, False), (DAX0_INODE, False)]),
    st.one_of(
        st.integers(0, SIZE // 512).map(lambda sector: sector * 512),
        st.integers(0, SIZE + PAGE_SIZE),
    ),
    st.one_of(st.integers(0, 4 * PAGE_SIZE // 512).map(lambda sectors: sectors * 512), st.integers(0, 3 * PAGE_SIZE)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=REQUEST, seed=st.binary(min_size=1, max_size=1))
def test_compiled_and_general_answer_every_request_alike(tree: CountingOperations, request, seed: bytes) -> None:  # type: ignore[no-untyped-def]
    ops = tree
    op, (inode, direct), off, size = request
    fh = ops._new_fh(inode, direct, 77)
    outcomes, states, media = [], [], []
    data = seed * size
    # The bytes around the request, put back before each path, so that both start alike and a store
    # anywhere else shows.
    lo, hi = max(0, min(off, ops.data_size) - PAGE_SIZE), min(ops.data_size, off + size + PAGE_SIZE)
    around = _media(ops, lo, hi)
    general = ops.general
    handlers = (ops.datapath.read, ops.serve_read) if op == "read" else (ops.datapath.write, ops.serve_write)
    for index, handler in enumerate(handlers):
        if index:
            event(f"{op}: {'general' if ops.general > general else 'compiled'}")
        os.pwrite(ops.region.fd, around, ops.region.direct_access()[2] + lo)
        before = _state(ops)
        if op == "read":
            outcomes.append(_outcome(lambda: handler(fh, off, size)))  # noqa: B023
        else:
            outcomes.append(_outcome(lambda: handler(fh, off, data)))  # noqa: B023
        ops.registry.end_transfer()
        after = _state(ops)
        states.append(([a - b for a, b in zip(after[0], before[0], strict=True)], after[1]))
        media.append(_media(ops, lo, hi))
    assert outcomes[0] == outcomes[1]
    assert media[0] == media[1], "the two paths left different bytes around the request"
    assert states[0] == states[1], "the two paths counted or referenced differently"
