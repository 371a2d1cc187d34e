"""pmem0 through a real mount: dd, O_DIRECT rules, the end of the device, truncate, durability across remounts."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess

import pytest
from conftest import DirectFile, Mount, mounted, pmemfs

pytestmark = pytest.mark.usefixtures("serving_mode")


def dd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dd", "status=none", *args], capture_output=True, text=True, timeout=120)


def test_dd_direct_roundtrip_survives_remount(mount: Mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "random"
    source.write_bytes(os.urandom(48 << 20))
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert dd(f"if={source}", f"of={mount.pmem0}", "bs=1M", "seek=5", "oflag=direct", "conv=notrunc").returncode == 0

    def read_back() -> str:
        out = subprocess.run(
            ["dd", f"if={mount.pmem0}", "bs=1M", "skip=5", "count=48", "iflag=direct", "status=none"],
            capture_output=True, check=True,
        )  # fmt: skip
        return hashlib.sha256(out.stdout).hexdigest()

    assert read_back() == expected
    pmemfs("umount", mount.mountpoint)
    with mounted(mount.image, mount.mountpoint) as again:
        assert again.status()["previous_shutdown"] == "clean"
        assert read_back() == expected


def test_buffered_and_direct_views_agree(mount: Mount) -> None:
    data = os.urandom(1 << 20)
    with open(mount.pmem0, "r+b") as f:
        f.seek(3 << 20)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
        assert direct.pread(1 << 20, 3 << 20) == data
    assert mount.status()["counters"]["fsyncs"] >= 1


@pytest.mark.parametrize("offset, length", [(100, 4096), (4096, 100), (512 + 7, 512)])
def test_misaligned_direct_io_is_einval(mount: Mount, offset: int, length: int) -> None:
    with DirectFile(mount.pmem0) as direct:
        with pytest.raises(OSError) as read_err:
            direct.pread(length, offset)
        with pytest.raises(OSError) as write_err:
            direct.pwrite(b"x" * length, offset)
    assert read_err.value.errno == write_err.value.errno == errno.EINVAL


def test_sector_aligned_direct_io_works(mount: Mount) -> None:
    with DirectFile(mount.pmem0) as direct:
        assert direct.pwrite(b"s" * 512, 512 * 3) == 512
        assert direct.pread(512, 512 * 3) == b"s" * 512


def test_end_of_device(mount: Mount) -> None:
    size = os.stat(mount.pmem0).st_size
    assert size == mount.status()["size"]
    with DirectFile(mount.pmem0) as direct:
        assert direct.pread(4096, size) == b""
        assert direct.pwrite(b"e" * 8192, size - 4096) == 4096  # short write across the end
        assert direct.pread(8192, size - 4096) == b"e" * 4096
        with pytest.raises(OSError) as err:
            direct.pwrite(b"x" * 4096, size)
    assert err.value.errno == errno.ENOSPC
    assert os.stat(mount.pmem0).st_size == size


def test_truncate_is_refused_unless_same_size(mount: Mount) -> None:
    size = os.stat(mount.pmem0).st_size
    with open(mount.pmem0, "r+b") as f:
        os.ftruncate(f.fileno(), size)
        with pytest.raises(OSError) as err:
            os.ftruncate(f.fileno(), size // 2)
    assert err.value.errno == errno.EINVAL
    assert os.stat(mount.pmem0).st_size == size


def test_dd_without_notrunc_keeps_the_media(mount: Mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Like /dev/pmem0, opening with O_TRUNC does not throw the data away."""
    with DirectFile(mount.pmem0) as direct:
        direct.pwrite(b"k" * 4096, 1 << 20)
    source = tmp_path / "one"
    source.write_bytes(b"d" * 4096)
    assert dd(f"if={source}", f"of={mount.pmem0}", "bs=4096", "oflag=direct").returncode == 0
    with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
        assert direct.pread(4096, 0) == b"d" * 4096
        assert direct.pread(4096, 1 << 20) == b"k" * 4096
    assert os.stat(mount.pmem0).st_size == mount.status()["size"]


def test_status_counts_direct_io(mount: Mount) -> None:
    with DirectFile(mount.pmem0) as direct:
        direct.pwrite(b"c" * 8192, 0)
        direct.pread(8192, 0)
    counters = mount.status()["counters"]
    assert counters["direct_writes"] >= 1 and counters["direct_reads"] >= 1
    assert counters["write_bytes"] >= 8192
