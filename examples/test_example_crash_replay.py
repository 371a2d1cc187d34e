"""Does my code survive a crash here, for every here? A write log and a replay to every point.

The mount records every write that reaches the media and every flush (``log_writes=``, or
``pmemfs mount --log-writes``); ``pmemfs replay LOG COPY --each flush -- CHECK {}`` rebuilds the
media as it was at each point, in a copy, and runs CHECK there. A copy of ``pmem0`` as it was when
the log started is all it needs: for a fresh region, a file of zeros.

Two examples: ext4, whose journal keeps it consistent at every flush, and a toy program that sets
a record's "valid" flag before the record is on the media, which replay catches in the act.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

PMEMFS = [sys.executable, "-m", "pmemfs"]


def fresh_copy_of_pmem0(path, size: int) -> str:  # type: ignore[no-untyped-def]
    """What pmem0 held when the log started: a fresh region's media is all zeros."""
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.mark.skipif(  # reason: losetup and mount need root, and the test needs e2fsprogs
    os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not os.path.exists("/dev/loop-control"),
    reason="needs root, /dev/loop-control and e2fsprogs (mkfs.ext4, fsck.ext4)",
)
def test_ext4_is_consistent_at_every_flush(pmem_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = str(tmp_path / "ext4.log")
    region = pmem_factory(size="128M", map="mem", log_writes=log)
    start = fresh_copy_of_pmem0(tmp_path / "replay.raw", os.path.getsize(region.pmem0))
    device = run("losetup", "--find", "--show", "--direct-io=on", region.pmem0).strip()
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", device)
        region.mark("mkfs")  # replay checks from here: mkfs's own writes are not crash-safe, nor meant to be
        ext4 = tmp_path / "ext4"
        ext4.mkdir()
        run("mount", "-o", "noinit_itable", device, str(ext4))
        try:
            for n in range(24):
                path = ext4 / f"file{n}"
                with open(path, "wb") as f:
                    f.write(os.urandom(4096 * (1 + n % 5)))
                    f.flush()
                    os.fsync(f.fileno())  # a journal commit: a flush (or two) in the log
                if n % 8 == 7:
                    os.rename(path, ext4 / f"renamed{n}")
                    region.mark(f"step{n}")
        finally:
            run("umount", str(ext4))
    finally:
        run("losetup", "-d", device)
    region.unmount()  # ends the log; a crash would leave it as readable (region.crash())

    # At each flush from mkfs on: a scratch copy of the media (--copy), its journal replayed as a
    # mount would, then fsck.ext4 -fn. The journal first: ext4 is consistent at a flush only with its
    # journal (a checkpoint in progress mixes transactions in place), as after any real crash.
    result = subprocess.run(
        [*PMEMFS, "replay", log, start, "--each", "flush", "--from", "mkfs", "--copy", "--",
         "sh", "-c", 'e2fsck -E journal_only -y "$1" >/dev/null 2>&1; fsck.ext4 -fn "$1"', "sh", "{}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMMAND passed at all" in result.stdout
    checked = int(result.stdout.split("COMMAND passed at all ")[1].split()[0])
    assert checked >= 24  # a flush for every fsync at least
    # And at the last mark, once its journal is replayed, every file that was fsync'd is there, and the
    # renames that a later fsync's commit carried; the last rename, after the last fsync, may not be.
    run(*PMEMFS, "replay", log, fresh_copy_of_pmem0(start, os.path.getsize(start)), "--to", "step23")
    run("e2fsck", "-E", "journal_only", "-y", start)
    listing = run("debugfs", "-R", "ls -l /", start)
    assert all(name in listing for name in ("file22", "file23", "renamed7", "renamed15"))


# The toy's bug: it sets the flag before its record is on the media, with no flush between.
TOY = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
buffer = mmap.mmap(-1, 4096)
buffer[:] = b"valid".ljust(4096, b"\\0")
os.pwritev(fd, [buffer], 0)                 # the flag, first: wrong
buffer[:] = b"the record".ljust(4096, b"\\0")
os.pwritev(fd, [buffer], 4096)              # the record it vouches for
os.fsync(fd)
"""

# Recovery's invariant: a valid flag means the record is there.
CHECK = """
import sys
media = open(sys.argv[1], "rb").read(8192)
if media.startswith(b"valid") and not media[4096:].startswith(b"the record"):
    sys.exit("the flag is set but the record is missing")
"""


def test_a_flag_written_before_its_record_is_caught(pmem_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = str(tmp_path / "toy.log")
    region = pmem_factory(size="32M", map="mem", log_writes=log)
    size = os.path.getsize(region.pmem0)
    start = fresh_copy_of_pmem0(tmp_path / "replay.raw", size)
    run(sys.executable, "-c", TOY, region.pmem0)
    region.unmount()

    # At the flush the toy looks right: both writes are in by then.
    run(*PMEMFS, "replay", log, start, "--each", "flush", "--", sys.executable, "-c", CHECK, "{}")
    fresh_copy_of_pmem0(start, size)
    # At every write it does not: a crash right after the first one leaves the flag without its record.
    result = subprocess.run(
        [*PMEMFS, "replay", log, start, "--each", "write", "--", sys.executable, "-c", CHECK, "{}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "COMMAND failed at point 1 (entry 0" in result.stderr
    assert "entry 0: write sectors 0+8" in result.stdout and "the record is missing" in result.stdout
    with open(start, "rb") as copy:  # left at the state that failed, to look at
        media = copy.read(8192)
    assert media.startswith(b"valid") and media[4096:] == bytes(4096)
