"""Badblocks: poison injection and clearing, through real clients, as /dev/pmemN behaves."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import DirectFile, Mount, mounted, pmemfs, process_alive, wait_for

from pmemfs.badblocks import BadBlocks, MemoryStore
from pmemfs.dax import open_dax
from pmemfs.errors import InvalidRange, MediaError, NoSpace
from pmemfs.infoblock import BADBLOCKS_MAX

# Unit tests of the table.

pytestmark = pytest.mark.usefixtures("serving_mode")


def table(*extents: tuple[int, int]) -> tuple[BadBlocks, list]:
    store = MemoryStore(extents)
    return BadBlocks(10_000, store), store.saved


def test_extents_merge_and_persist() -> None:
    bb, saved = table()
    bb.add(10, 2)
    bb.add(12, 3)
    bb.add(100, 1)
    assert bb.extents == [(10, 5), (100, 1)] and saved[-1] == ((10, 5), (100, 1))
    assert bb.sysfs() == b"10 5\n100 1\n"


def test_clear_splits_extents() -> None:
    bb, _ = table((10, 10))
    bb.clear(13, 2)
    assert bb.extents == [(10, 3), (15, 5)]


def test_reads_and_writes_over_poison() -> None:
    bb, _ = table((8, 2))  # bytes 4096..5120
    bb.check_read(0, 4096)
    with pytest.raises(MediaError):
        bb.check_read(4000, 200)
    with pytest.raises(MediaError):
        bb.check_write(4096 + 100, 512)  # covers sector 8 only in part
    assert not bb.check_write(0, 4096)
    assert bb.check_write(4096, 1024)
    assert bb.extents == [(8, 2)]  # nothing is cleared before the store has happened
    bb.clear_written(4096, 1024)
    assert bb.extents == []


def test_full_table_is_enospc_and_unchanged() -> None:
    bb, _ = table(*((i * 4, 1) for i in range(BADBLOCKS_MAX)))
    with pytest.raises(NoSpace):
        bb.add(9999, 1)
    assert len(bb.extents) == BADBLOCKS_MAX


@pytest.mark.parametrize(
    "text", [b"-1 1", b"1 -1", b"1", b"a b", b"5 0", b"99999999 1", b"1 99999999999999999999", b"\xff\xfe"]
)
def test_malformed_sysfs_writes_are_rejected(text: bytes) -> None:
    bb, saved = table((1, 1))
    with pytest.raises(InvalidRange):
        bb.store_sysfs(text)
    assert bb.extents == [(1, 1)] and saved == []


# Through a real mount.


def dd_direct(mount: Mount, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dd", f"if={mount.pmem0}", "of=/dev/null", "iflag=direct", "bs=4096", "status=none", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_inject_then_dd_fails_only_over_the_poison(mount: Mount) -> None:
    with DirectFile(mount.pmem0) as direct:
        direct.pwrite(os.urandom(1 << 20), 0)
    result = pmemfs("inject-error", mount.mountpoint, "--block", "80", "--count", "8")  # bytes 40960..45056
    assert json.loads(result.stdout) == {"badblocks": [{"block": 80, "count": 8}]}
    bad = dd_direct(mount, "skip=10", "count=1")
    assert bad.returncode != 0 and "Input/output error" in bad.stderr
    assert dd_direct(mount, "skip=0", "count=10").returncode == 0
    assert dd_direct(mount, "skip=11", "count=20").returncode == 0
    with open(mount.pmem0, "rb") as f:  # buffered reads too
        f.seek(40960)
        with pytest.raises(OSError) as err:
            f.read(512)
    assert err.value.errno == errno.EIO
    assert mount.status()["badblock_count"] == 8


def test_aligned_overwrite_clears_partial_overwrite_fails(mount: Mount) -> None:
    pmemfs("inject-error", mount.mountpoint, "--block", "16", "--count", "4")  # bytes 8192..10240
    # A buffered write of a few bytes reaches the daemon as is: it covers sector 16 only in part.
    with open(mount.pmem0, "r+b", buffering=0) as f:
        f.seek(8192 + 100)
        with pytest.raises(OSError) as err:
            f.write(b"partial")
        assert err.value.errno == errno.EIO
    with DirectFile(mount.pmem0) as direct:
        direct.pwrite(b"c" * 1024, 8192)  # sectors 16 and 17 whole
        assert json.loads(pmemfs("inject-error", mount.mountpoint, "--status").stdout)["badblocks"] == [
            {"block": 18, "count": 2}
        ]
        assert direct.pread(1024, 8192) == b"c" * 1024


def test_badblocks_survive_umount_and_kill_9(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mountpoint = str(tmp_path / "mnt")
    with mounted(image, mountpoint) as mount:
        pmemfs("inject-error", mountpoint, "--block", "1000", "--count", "3")
    assert "sectors 1000-1002" in pmemfs("info", image).stdout
    with mounted(image, mountpoint) as mount:
        assert mount.status()["badblock_count"] == 3
        with open(os.path.join(mountpoint, ".pmemfs", "badblocks"), "w") as f:
            f.write("5000 1")
        pid = mount.pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), what="the daemon to die")
        pmemfs("umount", mountpoint)
    with mounted(image, mountpoint) as mount:
        with open(os.path.join(mountpoint, ".pmemfs", "badblocks")) as f:
            assert f.read() == "1000 3\n5000 1\n"
        pmemfs("clear-errors", mountpoint)
        assert mount.status()["badblock_count"] == 0
        with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
            assert direct.pread(4096, 1000 * 512 // 4096 * 4096)  # readable again


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (make test installs it)")
def test_fio_continue_on_error_reports_exactly_the_injected_ranges(mount: Mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    injected = [(64, 8), (2048, 16)]  # 4k blocks 8 and 256-257
    for block, count in injected:
        pmemfs("inject-error", mount.mountpoint, "--block", str(block), "--count", str(count))
    result = subprocess.run(
        ["fio", "--name=scan", f"--filename={mount.pmem0}", "--rw=read", "--bs=4k", "--direct=1", "--size=4M",
         "--ioengine=psync", "--continue_on_error=read", "--output-format=json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    report = json.loads(result.stdout[result.stdout.index("{") :])
    job = report["jobs"][0]
    assert job["total_err"] == 3  # the 4k reads at blocks 8, 256 and 257
    assert job["first_error"] == errno.EIO
    assert job["read"]["total_ios"] == 1024 - 3 or job["read"]["io_bytes"] == (1024 - 3) * 4096


def test_dax0_fault_on_poison_is_sigbus(mount: Mount) -> None:
    pmemfs("inject-error", mount.mountpoint, "--block", "8", "--count", "1")  # page 1
    code = f"""
        import mmap, os
        fd = os.open({os.path.join(mount.mountpoint, "dax0")!r}, os.O_RDWR)
        m = mmap.mmap(fd, 3 * 4096, mmap.MAP_SHARED)
        assert m[0] == 0
        print("page 0 fine", flush=True)
        m[4096 + 10]
        print("no SIGBUS")
    """
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGBUS, (child.returncode, child.stdout, child.stderr)
    assert child.stdout == "page 0 fine\n"


def test_dax_api_reports_poison_before_mapping(mount: Mount) -> None:
    pmemfs("inject-error", mount.mountpoint, "--block", "24", "--count", "2")
    with pytest.raises(MediaError, match="12288\\+1024"):
        open_dax(mount.mountpoint, 0, 1 << 20)
    with open_dax(mount.mountpoint, 0, 1 << 20, allow_poison=True) as dax:
        assert dax.poisoned == [(12288, 1024)]
    with open_dax(mount.mountpoint, 1 << 20, 1 << 20) as dax:
        assert dax.poisoned == []


def test_zero_over_whole_sectors_clears_them(mount: Mount) -> None:
    pmemfs("inject-error", mount.mountpoint, "--block", "0", "--count", "24")
    pmemfs("zero", mount.mountpoint, "--offset", "1024", "--length", "8192")  # sectors 2..17 whole
    assert json.loads(pmemfs("inject-error", mount.mountpoint, "--status").stdout)["badblocks"] == [
        {"block": 0, "count": 2},
        {"block": 18, "count": 6},
    ]


@pytest.mark.parametrize("text", ["-1 4", "1 99999999999999999999", "garbage", "999999999999 1", "4"])
def test_malformed_writes_to_the_badblocks_file_are_einval(mount: Mount, text: str) -> None:
    pmemfs("inject-error", mount.mountpoint, "--block", "7")
    path = os.path.join(mount.mountpoint, ".pmemfs", "badblocks")
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as err:
            os.write(fd, text.encode())
        assert err.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    with open(path) as f:
        assert f.read() == "7 1\n"


def test_uninject_and_bad_arguments(mount: Mount) -> None:
    pmemfs("inject-error", mount.mountpoint, "--block", "100", "--count", "10")
    pmemfs("inject-error", mount.mountpoint, "--block", "104", "--count", "2", "--uninject")
    assert json.loads(pmemfs("inject-error", mount.mountpoint, "--status").stdout)["badblocks"] == [
        {"block": 100, "count": 4},
        {"block": 106, "count": 4},
    ]
    result = pmemfs("inject-error", mount.mountpoint, check=False)
    assert result.returncode == 2 and "--block" in result.stderr
    size = mount.status()["size"]
    result = pmemfs("inject-error", mount.mountpoint, "--block", str(size // 512), check=False)
    assert result.returncode == 1 and "invalid" in result.stderr
