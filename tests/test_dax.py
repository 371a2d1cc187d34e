"""The DAX path: dax0 mmap, how dax0 and pmem0 see each other, the zero-copy mapping, DAX-GUP, bulk zero."""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import DirectFile, Mount, mounted, pmemfs, wait_for

from pmemfs.dax import open_dax
from pmemfs.errors import PmemfsError

MiB = 1 << 20

pytestmark = pytest.mark.usefixtures("serving_mode")


def run_python(code: str) -> None:
    """Run code in a separate process, as another program mapping dax0 would."""
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=60)


def test_dax0_mmap_stores_survive_remount_and_read_back_through_pmem0(mount: Mount) -> None:
    pattern = bytes(range(256)) * 16 * 256  # 1 MiB
    run_python(
        f"""
        import mmap, os
        fd = os.open({mount.mountpoint!r} + "/dax0", os.O_RDWR)
        m = mmap.mmap(fd, 4 << 20, mmap.MAP_SHARED, offset=8 << 20)
        m[1 << 20 : 2 << 20] = bytes(range(256)) * 16 * 256
        m.flush()
        m.close()
        os.close(fd)
        """
    )
    pmemfs("umount", mount.mountpoint)
    with mounted(mount.image, mount.mountpoint):
        with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
            assert direct.pread(MiB, 9 * MiB) == pattern
            assert direct.pread(MiB, 8 * MiB) == bytes(MiB)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (make test installs it)")
def test_fio_mmap_engine_verifies_on_dax0(mount: Mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        ["fio", "--name=dax", f"--filename={mount.mountpoint}/dax0", "--ioengine=mmap", "--rw=randwrite",
         "--bs=4k", "--size=64M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output=/dev/null"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_dax0_and_pmem0_see_each_other_as_documented(mount: Mount) -> None:
    dax0 = os.path.join(mount.mountpoint, "dax0")
    # pmem0 O_DIRECT writes are on the media: a dax0 mapping made afterwards sees them.
    with DirectFile(mount.pmem0) as direct:
        direct.pwrite(b"P" * 4096, 0)
    with open(dax0, "r+b") as f, mmap.mmap(f.fileno(), 2 * 4096) as m:
        assert m[:4096] == b"P" * 4096
        # dax0 stores live in dax0's page cache until msync: pmem0 sees them after it.
        m[4096:8192] = b"D" * 4096
        m.flush()
    with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
        assert direct.pread(4096, 4096) == b"D" * 4096


def test_dax0_accepts_what_pmdk_does_to_it(mount: Mount) -> None:
    """pmem_map_file and fio's libpmem engine: ftruncate to its own size, then posix_fallocate."""
    dax0 = os.path.join(mount.mountpoint, "dax0")
    size = os.stat(dax0).st_size
    fd = os.open(dax0, os.O_RDWR)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, 1 << 20)
        with pytest.raises(OSError) as err:
            os.ftruncate(fd, size - 4096)
        assert err.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert os.stat(dax0).st_size == size


def test_zero_copy_mapping_is_seen_by_pmem0_at_once(mount: Mount) -> None:
    with open_dax(mount.mountpoint, 4 * MiB, 4 * MiB) as dax:
        dax.array[:8192] = 0x5A
        with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
            assert direct.pread(8192, 4 * MiB) == b"\x5a" * 8192  # no flush, no copy
        # and the other way round
        with DirectFile(mount.pmem0) as direct:
            direct.pwrite(b"w" * 4096, 5 * MiB)
        assert bytes(dax.view[MiB : MiB + 4096]) == b"w" * 4096


def test_direct_io_into_the_dax_mapping_pins_its_pages_for_the_transfer(mount: Mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "source"
    data = os.urandom(2 * MiB)
    source.write_bytes(data)
    out = tmp_path / "out"
    out.write_bytes(bytes(2 * MiB))
    with open_dax(mount.mountpoint, 0, 8 * MiB) as dax:
        fd = os.open(source, os.O_RDONLY | os.O_DIRECT)
        try:
            assert dax.read_direct_into(fd, 0, MiB, 2 * MiB) == 2 * MiB
        finally:
            os.close(fd)
        assert bytes(dax.view[MiB : 3 * MiB]) == data
        fd = os.open(out, os.O_RDWR | os.O_DIRECT)
        try:
            assert dax.write_direct_from(fd, 0, MiB, 2 * MiB) == 2 * MiB
        finally:
            os.close(fd)
        buffered = os.open(source, os.O_RDONLY)
        try:
            with pytest.raises(PmemfsError, match="O_DIRECT"):
                dax.read_direct_into(buffered, 0, 0, 4096)
        finally:
            os.close(buffered)
    assert out.read_bytes() == data
    trace = pmemfs("trace", mount.mountpoint).stdout
    me = os.getpid()
    assert len(re.findall(rf" pin pid {me} dax0 pfn 256\+512 session pin", trace)) == 2
    assert len(re.findall(rf" unpin pid {me} dax0 pfn 256\+512 session pin", trace)) == 2
    assert mount.status()["registry"]["pinned_pages"] == 0


def test_longterm_pin_of_the_dax_mapping_holds_up_umount(mount: Mount) -> None:
    with open_dax(mount.mountpoint, 0, 4 * MiB) as dax:
        with dax.longterm_pin(0, 2 * MiB):
            assert mount.status()["registry"]["pinned_pages"] == 512
            result = pmemfs("umount", mount.mountpoint, "--timeout", "1", check=False)
            assert result.returncode == 1 and f"pid {os.getpid()} holds a longterm reference on dax0" in result.stderr
        assert mount.status()["registry"]["pinned_pages"] == 0


def test_zero_punches_whole_pages_and_zeroes_partial_ones(mount: Mount) -> None:
    with DirectFile(mount.pmem0) as direct:
        direct.pwrite(os.urandom(16 * MiB), 0)
    os.sync()
    allocated = os.stat(mount.image).st_blocks * 512
    pmemfs("zero", mount.mountpoint, "--offset", "512", "--length", str(12 * MiB))
    assert os.stat(mount.image).st_blocks * 512 <= allocated - 11 * MiB
    with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
        head = direct.pread(4096, 0)
        assert head[:512] != bytes(512) and head[512:] == bytes(3584)
        assert direct.pread(12 * MiB, 512)[: 12 * MiB - 512] == bytes(12 * MiB - 512)
        assert direct.pread(4096, 12 * MiB + 512)[:4096] != bytes(4096)


def test_zero_waits_for_a_pinned_range_and_names_the_holder(mount: Mount) -> None:
    with open_dax(mount.mountpoint, 0, 4 * MiB) as dax:
        with dax.longterm_pin(MiB, 4096):
            result = pmemfs("zero", mount.mountpoint, "--offset", "0", "--length", "2M", "--timeout", "1", check=False)
            assert result.returncode == 1
            assert "page 256 (offset 1048576) stayed busy" in result.stderr
            assert f"pid {os.getpid()} holds a longterm reference on dax0" in result.stderr
        dax.array[:4096] = 1
        pmemfs("zero", mount.mountpoint, "--offset", "0", "--length", "2M")
        assert not np.any(dax.array[: 2 * MiB])


def test_zero_past_the_end_is_einval(mount: Mount) -> None:
    size = mount.status()["size"]
    result = pmemfs("zero", mount.mountpoint, "--offset", str(size - 4096), "--length", "8192", check=False)
    assert result.returncode == 1 and "invalid" in result.stderr


def test_writes_racing_a_zero_of_their_pages_land_whole_before_or_after_it(mount: Mount) -> None:
    first, pages = 2048, 16  # 64 KiB at 8 MiB: a write under way in it nearly all the time
    stop = threading.Event()
    written = [0]

    def page_of(page: int) -> bytes:
        return bytes([1 + page % 251]) * 4096

    def writer(start: int) -> None:
        with DirectFile(mount.pmem0) as direct:
            page = start
            while not stop.is_set():
                direct.pwrite(page_of(first + page), (first + page) * 4096)
                written[0] += 1
                page = (page + 7) % pages

    writers = [threading.Thread(target=writer, args=(start,)) for start in range(4)]
    for thread in writers:
        thread.start()
    try:
        wait_for(lambda: written[0] > 200, what="writes to start")
        for _ in range(5):
            # Each zero gets through: writes into the range wait for it, those under way drain.
            pmemfs(
                "zero",
                mount.mountpoint,
                "--offset",
                str(first * 4096),
                "--length",
                str(pages * 4096),
                "--timeout",
                "10",
            )
    finally:
        stop.set()
        for thread in writers:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in writers), "a writer hung"
    with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
        data = direct.pread(pages * 4096, first * 4096)
    for page in range(pages):
        got = data[page * 4096 : (page + 1) * 4096]
        assert got in (bytes(4096), page_of(first + page)), f"page {first + page} is torn"
    registry = mount.status()["registry"]
    assert registry["referenced_pages"] == 0
    assert registry["nr_foll_pin_acquired"] == registry["nr_foll_pin_released"]
