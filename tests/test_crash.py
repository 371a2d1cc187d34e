"""Crash testing on real mounts: ``pmemfs crash`` (a power cut), the write log a mount records
(``--log-writes``, ``pmemfs mark``), and what replay rebuilds from it."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys

import pytest
from conftest import PAGE, DirectFile, create_image, mounted, pmemfs, sha256_of

import pmemfs as api
from pmemfs import writelog
from pmemfs.writelog import LogReader


def test_a_power_cut_keeps_what_was_acknowledged_or_flushed_and_nothing_else(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with api.open_region(size="32M", map="mem", workers=1, directory=tmp_path / "region") as region:
        dax_fd = os.open(region.dax0, os.O_RDWR)
        mapping = mmap.mmap(dax_fd, 3 * PAGE, mmap.MAP_SHARED)
        mapping[0:5] = b"saved"
        mapping.flush(0, PAGE)  # msync: the store reaches the daemon and the media
        mapping[PAGE : PAGE + 4] = b"lost"  # in dax0's page cache only
        with DirectFile(region.pmem0) as f:
            f.pwrite(b"acked".ljust(PAGE, b"\0"), 2 * PAGE)  # returned: on the media
        region.crash()
        assert not region.mounted
        mapping.close()  # its dirty page has nowhere to go any more
        try:
            os.close(dax_fd)
        except OSError:
            pass  # the release of a file on a dead mount fails too
        region.remount()
        with DirectFile(region.pmem0, os.O_RDONLY) as f:
            media = f.pread(3 * PAGE, 0)
        assert media[:5] == b"saved" and media[PAGE : 2 * PAGE] == bytes(PAGE) and media[2 * PAGE :][:5] == b"acked"
        status = region.status()
        assert status["previous_shutdown"] == "unclean" and status["unclean_shutdowns"] == 1


def read_all(path: str, size: int) -> bytes:
    with DirectFile(path, os.O_RDONLY) as f:
        return f.pread(size, 0)


def test_everything_that_reaches_the_media_is_logged_and_replays(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pmem0 O_DIRECT and buffered writes, a dax0 writeback, fsync and msync, zero, clearing poison,
    marks: the log has each, in the order they completed, and replays to what the media holds."""
    image = create_image(tmp_path / "pmem.img", "32M", "--map", "mem")
    log_path = str(tmp_path / "w.log")
    with mounted(image, str(tmp_path / "mnt"), "--log-writes", log_path, "--workers", "1") as mount:
        with DirectFile(mount.pmem0) as f:
            f.pwrite(b"d" * PAGE, 0)
        fd = os.open(mount.pmem0, os.O_RDWR)
        os.pwrite(fd, b"buffered", 5000)  # not sector aligned: logged as its sector after the store
        os.fsync(fd)
        os.close(fd)
        dax_fd = os.open(os.path.join(mount.mountpoint, "dax0"), os.O_RDWR)
        mapping = mmap.mmap(dax_fd, 4 * PAGE, mmap.MAP_SHARED)
        mapping[3 * PAGE : 4 * PAGE] = b"m" * PAGE
        mapping.flush()  # a writeback, then a flush
        mapping.close()
        os.close(dax_fd)
        pmemfs("mark", mount.mountpoint, "stored")
        pmemfs("zero", mount.mountpoint, "--offset", "0", "--length", "2048")
        pmemfs("inject-error", mount.mountpoint, "--block", "16", "--count", "2")
        pmemfs("clear-errors", mount.mountpoint)
        status = mount.status()["write_log"]
        assert status["path"] == log_path and status["marks"] == 1 and not status["full"]
        media = read_all(mount.pmem0, 8 * PAGE)
    with LogReader(log_path) as reader:
        described = [entry.describe() for entry in reader.entries]
        assert reader.closed_clean and described[-1] == f"mark {writelog.END_MARK}"
        assert described[:2] == ["write sectors 0+8", "write sectors 9+1"]  # bytes 5000-5007 lie in sector 9
        assert "mark stored" in described and "discard sectors 0+4" in described and "discard sectors 16+2" in described
        # A zero (pmemfs zero, clear-errors) is durable when it returns: its flush follows it in the log.
        for discard in ("discard sectors 0+4", "discard sectors 16+2"):
            assert described[described.index(discard) + 1] == "flush", described
        assert described.count("flush") >= 2 and "write sectors 24+8" in described
    result = pmemfs("replay", log_path, str(tmp_path / "replayed.img"), "--to", writelog.END_MARK)
    assert "replayed entries" in result.stdout
    with mounted(str(tmp_path / "replayed.img"), str(tmp_path / "mnt2")) as replayed:
        assert read_all(replayed.pmem0, 8 * PAGE) == media


WRITER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
for n in range(200):
    buf[:] = bytes([int(sys.argv[2]) + n % 7]) * 4096
    os.pwritev(fd, [buf], (n * 3 % 32) * 4096)
"""


def test_a_crash_ends_the_log_at_the_last_completed_write(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two serving processes append to one log while two clients write the same pages; after the
    power cut the log replays to exactly what the media holds, and the next mount says it was unclean."""
    image = create_image(tmp_path / "pmem.img", "32M", "--map", "mem")
    mountpoint, log_path = str(tmp_path / "mnt"), str(tmp_path / "w.log")
    with mounted(image, mountpoint, "--log-writes", log_path, "--workers", "2") as mount:
        pmemfs("mark", mountpoint, "start")
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, mount.pmem0, str(t)]) for t in (10, 100)]
        assert [w.wait(60) for w in writers] == [0, 0]
        result = pmemfs("crash", mountpoint)
        assert "crashed" in result.stdout and log_path in result.stdout
        assert not os.path.exists(os.path.join(mountpoint, "pmem0"))
    with LogReader(log_path) as reader:
        assert reader.closed_clean is False and sum(1 for e in reader.entries if e.is_write) == 400
    said = pmemfs("mount", image, mountpoint, "--workers", "1").stdout
    try:
        assert "not shut down cleanly before (unclean shutdowns: 1)" in said
        media = read_all(os.path.join(mountpoint, "pmem0"), 32 * PAGE)
    finally:
        pmemfs("umount", mountpoint)
    pmemfs("replay", log_path, str(tmp_path / "replayed.img"), "--entry", str(len(reader.entries) - 1))
    with open(tmp_path / "replayed.img", "rb") as f:
        dataoff = 2 << 20  # map=mem
        assert os.pread(f.fileno(), 32 * PAGE, dataoff) == media


def test_a_full_log_fails_writes_with_enospc_and_says_where_it_stopped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = create_image(tmp_path / "pmem.img", "32M", "--map", "mem")
    log_path = str(tmp_path / "w.log")
    mountpoint = str(tmp_path / "mnt")
    with mounted(image, mountpoint, "--log-writes", log_path, "--log-writes-max", "64K") as mount:
        written = 0
        with DirectFile(mount.pmem0) as f:
            with pytest.raises(OSError) as refused:
                while True:
                    f.pwrite(bytes([written + 1]) * PAGE, written * PAGE)
                    written += 1
            assert refused.value.errno == errno.ENOSPC
        assert written == (64 * 2 - 2) // 9  # 9 blocks a 4 KiB write; one block kept for the mark
        assert read_all(mount.pmem0, (written + 1) * PAGE)[written * PAGE :] == bytes(PAGE)  # not stored
        assert mount.status()["write_log"]["full"]
        result = pmemfs("mark", mountpoint, "late", check=False)
        assert result.returncode == 1 and "full" in result.stderr
    with LogReader(log_path) as reader:
        assert reader.stopped_full and reader.entries[-1].mark == writelog.FULL_MARK
        assert len(reader.entries) == written + 1


def test_bad_input_around_the_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = create_image(tmp_path / "pmem.img", "32M", "--map", "mem")
    mountpoint = str(tmp_path / "mnt")
    os.makedirs(mountpoint)
    with mounted(image, mountpoint):
        result = pmemfs("mark", mountpoint, "x", check=False)
        assert result.returncode == 1 and "no write log" in result.stderr
    existing = tmp_path / "existing.log"
    existing.write_bytes(b"an earlier crash's log")
    before = sha256_of(image)
    result = pmemfs("mount", image, mountpoint, "--log-writes", str(existing), check=False)
    assert result.returncode == 1 and "already exists" in result.stderr
    assert sha256_of(image) == before and existing.read_bytes() == b"an earlier crash's log"
    log_path = str(tmp_path / "w.log")
    with api.open_region(image, log_writes=log_path, directory=tmp_path / "api", workers=1) as region:
        with pytest.raises(api.PmemfsError, match="write log"):
            region.dax()  # its stores would never reach the daemon, nor the log
        result = pmemfs("mark", region.mountpoint, "two words", check=False)
        assert result.returncode == 1 and "not a mark name" in result.stderr
        region.mark("ok")
    with LogReader(log_path) as reader:
        assert [e.mark for e in reader.marks()] == ["ok", writelog.END_MARK]


CHECK_PMEM0 = """
import os, sys
assert sys.argv[1] == os.environ["PMEMFS_REPLAY_PMEM0"]
with open(sys.argv[1], "rb") as pmem0:
    print(pmem0.read(5).decode(errors="replace"))
"""


def test_replay_each_mark_on_a_mounted_copy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--mount: COMMAND gets the pmem0 of a mounted scratch copy at each point; IMAGE is never mounted."""
    image = create_image(tmp_path / "pmem.img", "32M", "--map", "mem")
    start = str(tmp_path / "start.img")
    subprocess.run(["cp", "--sparse=always", image, start], check=True)
    log_path = str(tmp_path / "w.log")
    with mounted(image, str(tmp_path / "mnt"), "--log-writes", log_path) as mount:
        with DirectFile(mount.pmem0) as f:
            f.pwrite(b"first".ljust(PAGE, b"\0"), 0)
            pmemfs("mark", mount.mountpoint, "one")
            f.pwrite(b"later".ljust(PAGE, b"\0"), 0)
    result = pmemfs(
        "replay", log_path, start, "--each", "mark", "--mount", "--", sys.executable, "-c", CHECK_PMEM0, "{}"
    )
    assert "COMMAND passed at all 2 points" in result.stdout  # "one", and the end mark
    assert not [p for p in os.listdir(tmp_path) if p.startswith("pmemfs-replay-")]


async def test_crash_and_mark_from_trio(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log_path = str(tmp_path / "w.log")
    async with api.open_region_async(
        size="32M", map="mem", workers=1, directory=tmp_path / "r", log_writes=log_path
    ) as region:
        await region.mark("before")
        assert len(await region.crash()) >= 1 and not region.mounted
        await region.remount()
        assert (await region.status())["unclean_shutdowns"] == 1
    with LogReader(log_path) as reader:
        assert [e.mark for e in reader.marks()] == ["before"] and reader.closed_clean is False
