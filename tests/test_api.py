"""The public Python API against real mounts: open_region's life cycle and every method, a crash and a
remount, clean-up when the caller leaks, the CLI on a region the API mounted, and the trio flavour."""

from __future__ import annotations

import contextlib
import errno
import json
import os

import pytest
import trio
from conftest import DirectFile, pmemfs

import pmemfs as api
from pmemfs.client import daemon_processes, fuse_mount_entry, fuse_mounts_under

PAGE = 4096


def assert_gone(region: api.MountedRegion) -> None:
    assert not fuse_mount_entry(region.mountpoint)
    assert not daemon_processes(region.image, region.mountpoint)


def test_open_region_drives_poison_pins_zero_and_a_crash() -> None:
    with api.open_region(size="64M") as region:
        workdir = region.workdir
        status = region.status()
        assert (status["raw_size"], status["mode"], status["map"], status["mounts"]) == (64 << 20, "fsdax", "dev", 1)
        assert region.image == os.path.join(workdir, "pmem.img") and region.pmem0 == f"{region.mountpoint}/pmem0"
        with DirectFile(region.pmem0) as f:
            f.pwrite(b"A" * PAGE, 0)
        region.assert_balanced()

        with pytest.raises(api.PmemfsError) as refused, region.pin("pmem0", 0, PAGE, longterm=True):
            pass
        assert refused.value.errno == errno.EOPNOTSUPP
        with region.pin("dax0", 0, 2 * PAGE, longterm=True) as pin:
            assert (pin.file, pin.offset, pin.length, pin.kind) == ("dax0", 0, 2 * PAGE, "longterm")
            with pytest.raises(AssertionError, match=f"pid {os.getpid()} holds a longterm reference on dax0"):
                region.assert_no_pins(timeout_s=0.1)
        region.assert_no_pins(timeout_s=0)  # unpinned when the block was left, not when the kernel gets to it

        region.inject_error(block=8)
        assert region.badblocks() == [(8, 1)]
        with DirectFile(region.pmem0, os.O_RDONLY) as f, pytest.raises(OSError) as eio:
            f.pread(PAGE, PAGE)
        assert eio.value.errno == errno.EIO
        assert region.clear_errors() == [(8, 1)] and region.badblocks() == []

        region.zero(0, PAGE)
        with DirectFile(region.pmem0) as f:
            assert f.pread(PAGE, 0) == bytes(PAGE)
            f.pwrite(b"B" * PAGE, 0)
        assert any(" zero " in line for line in region.trace())

        killed = region.kill()
        workers = status["serving"]["workers"]
        assert status["pid"] in killed and len(killed) == (1 if workers == 1 else workers + 1)  # and every worker
        assert not region.mounted
        assert_gone(region)
        with pytest.raises(api.MountError, match="not mounted"):
            region.pid  # noqa: B018
        region.remount()
        assert region.status()["unclean_shutdowns"] == 1
        with DirectFile(region.pmem0, os.O_RDONLY) as f:
            assert f.pread(PAGE, 0) == b"B" * PAGE  # the write that returned survived the crash
        with region.dax(0, PAGE) as dax:
            assert bytes(dax.array[:4]) == b"BBBB"
        region.assert_balanced()
    assert_gone(region)
    assert not os.path.exists(workdir)  # the temporary directory, image and log went with it


def test_a_leaked_file_is_named_and_the_region_unmounted_all_the_same(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(api.MountError) as leaked:
        with api.open_region(size="32M", mode="devdax", workers=1, directory=tmp_path) as region:
            with DirectFile(region.pmem0) as f:
                f.pwrite(b"C" * PAGE, PAGE)
            fd = os.open(region.pmem0, os.O_RDONLY)
    with contextlib.suppress(OSError):
        os.close(fd)  # its daemon is gone: the release gets ENOTCONN
    assert f"pid {os.getpid()} (" in str(leaked.value) and "has pmem0 open" in str(leaked.value)
    assert "killed the daemon" in str(leaked.value)
    assert_gone(region)
    assert os.path.exists(region.image) and os.path.exists(region.log)  # a directory of the caller's is kept

    # An existing image is served as it is: its size, mode and data, whatever the arguments say.
    mountpoint = tmp_path / "elsewhere"
    with pytest.raises(ValueError, match="the body's error"):
        with api.open_region(region.image, size="1G", mountpoint=mountpoint, workers=1) as again:
            status = again.status()
            assert (status["raw_size"], status["mode"], status["unclean_shutdowns"]) == (32 << 20, "devdax", 1)
            assert again.mountpoint == str(mountpoint)
            with DirectFile(again.pmem0, os.O_RDONLY) as f:
                assert f.pread(PAGE, PAGE) == b"C" * PAGE
            fd = os.open(again.pmem0, os.O_RDONLY)
            raise ValueError("the body's error")  # wins over the unmount's complaint about fd
    with contextlib.suppress(OSError):
        os.close(fd)
    assert_gone(again)


def test_bad_arguments_are_usage_errors_and_leave_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for arguments, says in [
        ({"size": "1M"}, "under the minimum"),
        ({"size": "lots"}, "bad size"),
        ({"mode": "sector"}, "unknown mode"),
        ({"workers": 99}, "workers must be between"),
        ({"serve": "trio", "workers": 2}, "trio loop serves from one process"),
    ]:
        with pytest.raises(api.UsageError, match=says), api.open_region(directory=tmp_path / "r", **arguments):
            pass
        assert not fuse_mounts_under(str(tmp_path)) and not os.path.exists(tmp_path / "r" / "pmem.img")


def test_the_cli_drives_a_region_the_api_mounted() -> None:
    with api.open_region(size="32M", workers=1) as region:
        mnt = region.mountpoint
        out = pmemfs("pin", mnt, "--file", "dax0", "--offset", "0", "--length", "8192", "--longterm", "--", "true")
        assert out.stdout.startswith("pinned dax0 offset 0 length 8192 (longterm, pin ")
        assert json.loads(pmemfs("inject-error", mnt, "--block", "3", "--count", "2").stdout) == {
            "badblocks": [{"block": 3, "count": 2}]
        }
        assert region.badblocks() == [(3, 2)]
        assert pmemfs("clear-errors", mnt).stdout.strip() == "cleared 2 bad block(s) in 1 range(s)"
        zeroed = pmemfs("zero", mnt, "--offset", "0", "--length", "4096").stdout
        assert zeroed.strip() == "zeroed 4096 bytes at offset 0"
        assert pmemfs("pages", mnt).stdout.strip() == "no page is referenced"
        trace = pmemfs("trace", mnt).stdout
        assert "pin pid" in trace and "unpin pid" in trace and " zero " in trace
        assert f"daemon pid {region.pid}" in pmemfs("status", mnt).stdout
        region.assert_balanced()
        assert region.unmount() == f"unmounted {mnt}" and not region.mounted
        region.remount()
        assert region.status()["unclean_shutdowns"] == 0 and region.status()["mounts"] == 2
        pmemfs("umount", mnt)  # behind the handle's back: leaving the block has nothing left to do
    assert_gone(region)


async def test_open_region_async_in_a_trio_task(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with api.open_region_async(size="32M", workers=1, directory=tmp_path) as region:
        await region.inject_error(1)
        assert await region.badblocks() == [(1, 1)]
        async with region.pin("dax0", 0, PAGE, longterm=True) as pin:
            assert pin.kind == "longterm" and (await region.status())["registry"]["pinned_pages"] == 1
        await region.assert_balanced()
        assert await region.kill() and not region.mounted
        await region.remount()
        assert (await region.status())["unclean_shutdowns"] == 1
    assert_gone(region.sync)

    # A task cancelled while the region is mounting: the mount completes, the body never runs, and
    # the region is unmounted on the way out.
    entered = False
    with trio.move_on_after(0.01):
        async with api.open_region_async(size="32M", workers=1, directory=tmp_path / "cancelled"):
            entered = True
    assert not entered
    assert not fuse_mounts_under(str(tmp_path))
