"""The write log without a mount: its format against dm-log-writes' published definition, field by
field; the reader's refusals; the writer's protocol (completion order, no gap, a full log, several
processes); and replay (to a point, at every point, reordered crash states, bad input)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import create_image, pmemfs
from test_shared import in_children

from pmemfs import logwrites, writelog
from pmemfs.errors import NoSpace, PmemfsError
from pmemfs.region import Region
from pmemfs.replay import Checker, EachPoint, Target, entry_at, find_mark, opened, reorder_states, replay_to
from pmemfs.writelog import LogFormatError, LogReader

S = 512


# dm-log-writes' structures as drivers/md/dm-log-writes.c declares them (xfstests' log-writes.h
# has the same): C layouts, little-endian, so that sizes and offsets are the compiler's, not ours.
class LogWriteSuper(ctypes.LittleEndianStructure):
    _fields_ = [("magic", ctypes.c_uint64), ("version", ctypes.c_uint64), ("nr_entries", ctypes.c_uint64),
                ("sectorsize", ctypes.c_uint32)]  # fmt: skip


class LogWriteEntry(ctypes.LittleEndianStructure):
    _fields_ = [("sector", ctypes.c_uint64), ("nr_sectors", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("data_len", ctypes.c_uint64)]  # fmt: skip


WRITE_LOG_MAGIC, WRITE_LOG_VERSION = 0x6A736677736872, 1
LOG_FLUSH_FLAG, LOG_FUA_FLAG, LOG_DISCARD_FLAG, LOG_MARK_FLAG, LOG_METADATA_FLAG = (
    1 << 0,
    1 << 1,
    1 << 2,
    1 << 3,
    1 << 4,
)


def test_super_block_is_the_kernels_field_by_field() -> None:
    block = writelog.pack_super(7)
    assert len(block) == S  # the super has block 0 to itself
    super_ = LogWriteSuper.from_buffer_copy(block)
    assert (super_.magic, super_.version, super_.nr_entries, super_.sectorsize) == (WRITE_LOG_MAGIC, 1, 7, 512)
    assert LogWriteSuper.magic.offset == 0 and LogWriteSuper.version.offset == 8
    assert LogWriteSuper.nr_entries.offset == 16 == writelog.SUPER_NR_ENTRIES_OFFSET
    assert LogWriteSuper.sectorsize.offset == 24
    # What replay-log reads (sizeof, with the C struct's tail padding) is zero beyond the fields.
    assert block[28 : ctypes.sizeof(LogWriteSuper)] == bytes(ctypes.sizeof(LogWriteSuper) - 28)
    assert block[: writelog.PMEMFS_OFFSET] == block[:28] + bytes(writelog.PMEMFS_OFFSET - 28)
    assert block[writelog.PMEMFS_OFFSET :] == bytes(S - writelog.PMEMFS_OFFSET)  # no record given


def test_entries_are_the_kernels_field_by_field() -> None:
    assert ctypes.sizeof(LogWriteEntry) == writelog.ENTRY.size == 32
    assert [getattr(LogWriteEntry, f).offset for f in ("sector", "nr_sectors", "flags", "data_len")] == [0, 8, 16, 24]
    assert (writelog.FLUSH, writelog.FUA, writelog.DISCARD, writelog.MARK, writelog.METADATA) == (
        LOG_FLUSH_FLAG, LOG_FUA_FLAG, LOG_DISCARD_FLAG, LOG_MARK_FLAG, LOG_METADATA_FLAG,
    )  # fmt: skip
    write = writelog.pack_entry(123, 8, 0)
    entry = LogWriteEntry.from_buffer_copy(write)
    assert (entry.sector, entry.nr_sectors, entry.flags, entry.data_len) == (123, 8, 0, 0)
    assert len(write) == S and write[32:] == bytes(S - 32)  # replay-log: byte 32 of a non-mark must be 0
    mark = writelog.pack_entry(0, 0, writelog.MARK, b"mkfs")
    entry = LogWriteEntry.from_buffer_copy(mark)
    assert (entry.sector, entry.nr_sectors, entry.flags, entry.data_len) == (0, 0, LOG_MARK_FLAG, 4)
    assert mark[32:36] == b"mkfs" and mark[36:] == bytes(S - 36)  # the text right after the struct, no NUL
    assert writelog.MARK_MAX == S - 32 - 1  # the kernel's kstrndup(data, maxsize - 1)
    with pytest.raises(ValueError):
        writelog.pack_entry(0, 0, writelog.MARK, b"x" * (S - 32))


@contextlib.contextmanager
def logged_region(tmp_path, max_bytes: int = 1 << 20, size: str = "16M") -> Iterator[tuple[Region, str]]:  # type: ignore[no-untyped-def]
    """A region (as a daemon holds it) writing a log, closed cleanly on the way out."""
    image = create_image(tmp_path / "pmem.img", size, "--map", "mem")
    with open(image, "rb") as f, open(tmp_path / "start.img", "wb") as copy:
        copy.write(f.read())  # the start state, for replay
    region = Region.open(image)
    log_path = str(tmp_path / "w.log")
    write_log = logwrites.WriteLog.create(log_path, region, region.shared, max_bytes)
    try:
        yield region, write_log  # type: ignore[misc]
    finally:
        write_log.close(clean=True)
        region.close(clean=True)


def test_writes_flushes_marks_and_zeros_are_logged_in_the_format(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with logged_region(tmp_path) as (region, log):
        log.write(4096, b"a" * 4096)  # aligned: logged as it came
        log.flush()
        log.mark("one")
        log.write(1000, b"bc")  # not aligned: widened to its sector, as the media holds it after
        log.zero(512 * 3 + 100, 512 * 2, flush=False)  # a partial sector, a whole one, a partial one
        stats = log.statistics()
    assert stats["entries"] == 7 and stats["writes"] == 2 and stats["flushes"] == 1 and stats["marks"] == 1
    with LogReader(log.path) as reader:
        assert reader.sectorsize == 512 and reader.closed_clean and not reader.stopped_full
        assert reader.recorded is not None and reader.recorded.data_size == region.data_size
        described = [e.describe() for e in reader.entries]
        assert described == [
            "write sectors 8+8", "flush", "mark one", "write sectors 1+1",
            "write sectors 3+1", "write sectors 5+1", "discard sectors 4+1", f"mark {writelog.END_MARK}",
        ]  # fmt: skip
        widened = reader.read_data(reader.entries[3])
        assert widened[1000 - 512 : 1002 - 512] == b"bc" and widened.count(0) == 510
    # What the kernel's readers see: the super counts them all, each entry block is zero padded.
    raw = pathlib.Path(log.path).read_bytes()
    assert struct.unpack_from("<QQQI", raw) == (WRITE_LOG_MAGIC, 1, 8, 512)


def test_a_zero_flushes_as_the_region_zero_does_and_the_flush_is_logged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A zero is durable once done (pmemfs zero, clear-errors): the log shows the flush after it, so that
    a replay to each flush sees it land."""
    with logged_region(tmp_path) as (_, log):
        log.zero(0, 4096)
    with LogReader(log.path) as reader:
        assert [e.describe() for e in reader.entries] == ["discard sectors 0+8", "flush", f"mark {writelog.END_MARK}"]


def test_the_super_counts_every_commit_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A daemon killed at any moment leaves a log whose readers read every completed write."""
    with logged_region(tmp_path) as (_, log):
        for n in range(1, 4):
            log.write(0, b"x" * 512)
            with LogReader(log.path) as reader:
                assert len(reader.entries) == n and reader.closed_clean is False


def test_a_failed_store_is_not_logged(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with logged_region(tmp_path) as (region, log):
        log.write(0, b"1" * 512)

        def refused(offset: int, data: bytes) -> None:
            raise NoSpace("the backing filesystem is full")

        monkeypatch.setattr(region, "write", refused)
        with pytest.raises(NoSpace):
            log.write(512, b"2" * 512)
        monkeypatch.undo()
        log.write(1024, b"3" * 512)
    with LogReader(log.path) as reader:
        assert [e.sector for e in reader.entries if e.is_write] == [0, 2]
        assert reader.read_data(reader.entries[1]) == b"3" * 512  # the failed one's bytes were overwritten


def test_a_full_log_refuses_the_write_before_storing_it_and_says_where_it_stopped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with logged_region(tmp_path, max_bytes=8 * S) as (region, log):
        log.write(0, b"a" * S)  # blocks 1-2
        log.write(S, b"b" * S)  # blocks 3-4
        with pytest.raises(NoSpace, match="full"):
            log.write(2 * S, b"c" * 2 * S)  # would need blocks 5-7, and block 7 is kept for the mark
        assert bytes(region.read(2 * S, S)) == bytes(S)  # not stored
        with pytest.raises(NoSpace):
            log.write(4 * S, b"d" * S)  # nothing more: no silent gap
        with pytest.raises(NoSpace):
            log.mark("late")
        log.flush()  # the media can still be flushed; it cannot change any more
        assert log.statistics()["full"]
    with LogReader(log.path) as reader:
        assert reader.stopped_full
        assert [e.describe() for e in reader.entries][-1] == f"mark {writelog.FULL_MARK}"
        assert len(reader.entries) == 3


def test_appends_from_several_processes_are_serialized(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Serving processes share the log: every entry whole, counted once, in the order the stores
    completed, so that the log replays to what the media holds although they wrote the same pages."""
    with logged_region(tmp_path, max_bytes=4 << 20) as (region, log):

        def writer(tag: int) -> None:
            for n in range(100):
                log.write((tag * 37 + n) % 16 * 4096, bytes([tag + 1]) * 4096)

        assert in_children(*(lambda t=t: writer(t) for t in range(3))) == [0, 0, 0]  # type: ignore[misc]
        final = bytes(region.read(0, 16 * 4096))
    with opened(log.path, str(tmp_path / "start.img")) as (reader, target):
        assert sum(1 for e in reader.entries if e.is_write) == 300
        replay_to(reader, target, len(reader.entries) - 1)
        assert data_area(target)[: 16 * 4096] == final


def data_area(target: Target) -> bytes:
    return os.pread(target.fd, target.data_size, target.dataoff)


def test_replay_to_a_mark_an_entry_a_flush(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with logged_region(tmp_path) as (_, log):
        log.write(0, b"1" * 4096)
        log.flush()
        log.mark("after-one")
        log.write(0, b"2" * 4096)
        log.zero(0, 1024, flush=False)
        log.flush()
    with opened(log.path, str(tmp_path / "start.img")) as (reader, target):
        assert entry_at(reader, mark="after-one") == 2
        assert entry_at(reader, flush=2) == 5 and entry_at(reader, entry=3) == 3
        replay_to(reader, target, entry_at(reader, mark="after-one"))
        assert data_area(target)[:4096] == b"1" * 4096
        replay_to(reader, target, entry_at(reader, flush=2))
        assert data_area(target)[:4096] == bytes(1024) + b"2" * 3072
        for bad in ({"mark": "nope"}, {"entry": 99}, {"flush": 3}, {"flush": 0}):
            with pytest.raises(PmemfsError):
                entry_at(reader, **bad)  # type: ignore[arg-type]
        with pytest.raises(PmemfsError, match="no mark 'nope' .*'after-one'"):
            find_mark(reader, "nope")


def test_replay_targets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A copy of the start image, a new image made from the log's geometry, a plain copy of pmem0;
    an image of another geometry and a file that is neither are refused in one line."""
    with logged_region(tmp_path) as (region, log):
        log.write(8192, b"z" * 4096)
        data_size = region.data_size
    with open(tmp_path / "pmem0.copy", "wb") as f:
        f.truncate(data_size)
    for name, kind in (("start.img", "pmemfs image"), ("new.img", "pmemfs image"), ("pmem0.copy", "copy of pmem0")):
        with opened(log.path, str(tmp_path / name)) as (reader, target):
            assert target.kind == kind
            replay_to(reader, target, len(reader.entries) - 1)
            assert data_area(target)[8192 : 8192 + 4096] == b"z" * 4096
    create_image(tmp_path / "other.img", "32M", "--map", "mem")
    with open(tmp_path / "junk", "wb") as f:
        f.write(b"junk" * 1000)
    for name, message in (("other.img", "another geometry"), ("junk", "neither a pmemfs image nor a copy of pmem0")):
        with pytest.raises(PmemfsError, match=message), LogReader(log.path) as reader:
            Target(str(tmp_path / name), reader)


def write_raw_log(path, entries: list[bytes], nr_entries: int | None = None, magic: int = WRITE_LOG_MAGIC) -> str:  # type: ignore[no-untyped-def]
    block0 = bytearray(S)
    struct.pack_into("<QQQI", block0, 0, magic, 1, len(entries) if nr_entries is None else nr_entries, S)
    with open(path, "wb") as f:
        f.write(bytes(block0) + b"".join(entries))
    return str(path)


def test_bad_logs_get_one_clear_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    entry = struct.pack("<QQQQ", 0, 1, 0, 0).ljust(S, b"\0")
    cases = {
        "not a dm-log-writes log: magic": write_raw_log(tmp_path / "magic", [], magic=0x1234),
        "too short": str(tmp_path / "short"),
        "the file ends in entry 1": write_raw_log(tmp_path / "count", [entry + bytes(S)], nr_entries=2),
        "has 1 sectors of data but the file ends": write_raw_log(tmp_path / "data", [entry]),
        "is all zeros": write_raw_log(tmp_path / "zeros", [bytes(S)]),
        "is not zero padded": write_raw_log(tmp_path / "padding", [entry[:32] + b"x" + entry[33:] + bytes(S)]),
    }
    (tmp_path / "short").write_bytes(b"abc")
    for message, path in cases.items():
        with pytest.raises(LogFormatError, match=message):
            LogReader(path)
        result = pmemfs("replay", path, str(tmp_path / "img"), "--entry", "0", check=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and message.split(":")[0] in result.stderr


def checker_command(script: str) -> list[str]:
    return [sys.executable, "-c", script, "{}"]


# A checker that fails when sector 0 says "valid" and sector 8 does not hold the record.
CHECK_RECORD = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
base = int(os.environ["PMEMFS_REPLAY_DATAOFF"])
flag, record = os.pread(fd, 5, base), os.pread(fd, 6, base + 4096)
sys.exit(1 if flag == b"valid" and record != b"record" else 0)
"""


def each(tmp_path, log_path: str, kind: str, **options) -> tuple[object, list[str], EachPoint]:  # type: ignore[no-untyped-def]
    """Replay ``--each`` onto a fresh copy of the start image; what failed, the table, the walk."""
    lines: list[str] = []
    shutil.copyfile(tmp_path / "start.img", tmp_path / "work.img")
    with opened(log_path, str(tmp_path / "work.img")) as (reader, target):
        checker = Checker(checker_command(CHECK_RECORD), target, reader, mount=False)
        walk = EachPoint(reader, target, checker, kind, 0, say=lines.append, **options)
        failed = walk.run()
        return failed, lines, walk


def test_each_write_finds_a_flag_written_before_its_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with logged_region(tmp_path) as (_, log):
        log.write(0, b"valid".ljust(S, b"\0"))  # the bug: the flag first, no flush before it
        log.write(4096, b"record".ljust(S, b"\0"))
        log.flush()
    failed, lines, walk = each(tmp_path, log.path, "write")
    assert failed is not None and failed.point.number == 1 and failed.point.last == 0  # type: ignore[attr-defined]
    assert "FAILED" in lines[-1] and walk.checked == 1
    with LogReader(log.path) as reader:
        assert reader.entries[0].sector == 0
    # At the flush point the bug hides: both writes are in by then.
    failed, _, walk = each(tmp_path, log.path, "flush")
    assert failed is None and walk.checked == 1


def test_reordered_crash_states_are_drawn_from_the_seed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Record first, flag second, but no flush between: only a reordered state shows the bug."""
    import random

    writes = list(range(10))
    assert reorder_states(writes, 5, random.Random(7)) == reorder_states(writes, 5, random.Random(7))
    assert all(0 < len(s) < 10 for s in reorder_states(writes, 50, random.Random(1)))
    assert reorder_states([3], 5, random.Random(1)) == []
    assert len(reorder_states([1, 2], 10, random.Random(1))) == 2  # only {1} and {2} are neither none nor all
    with logged_region(tmp_path) as (_, log):
        log.write(4096, b"record".ljust(S, b"\0"))
        log.write(0, b"valid".ljust(S, b"\0"))
        log.flush()
    failed, _, _ = each(tmp_path, log.path, "flush")
    assert failed is None  # in order, every flush point is fine
    failed, lines, walk = each(tmp_path, log.path, "flush", reorder=4, seed=11)
    assert failed is not None and failed.point.landed == (1,)  # type: ignore[attr-defined]
    assert "reorder" in lines[-1] and "1 of 2 writes landed" in lines[-1]
    assert any("(did not land)" in line for line in walk.describe_failure(failed))  # type: ignore[arg-type]


def test_a_command_that_changes_the_image_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with logged_region(tmp_path) as (_, log):
        log.write(0, b"x" * S)
    with opened(log.path, str(tmp_path / "start.img")) as (reader, target):
        checker = Checker(checker_command("import sys; open(sys.argv[1], 'r+b').write(b'!')"), target, reader,
                          mount=False)  # fmt: skip
        with pytest.raises(PmemfsError, match="changed .* at point 1"):
            EachPoint(reader, target, checker, "write", 0, say=lambda line: None).run()
    # With --copy it changes a scratch copy, which goes; IMAGE holds what the log says.
    with opened(log.path, str(tmp_path / "start.img")) as (reader, target):
        writer = checker_command("import sys; open(sys.argv[1], 'r+b').write(b'!')")
        with Checker(writer, target, reader, copy=True) as checker:
            assert EachPoint(reader, target, checker, "write", 0, say=lambda line: None).run() is None
        assert data_area(target)[:S] == b"x" * S and not any(
            p.name.startswith("pmemfs-replay-") for p in tmp_path.iterdir()
        )


def test_replay_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with logged_region(tmp_path) as (_, log):
        log.write(0, b"valid".ljust(S, b"\0"))
        log.mark("flagged")
        log.write(4096, b"record".ljust(S, b"\0"))
        log.flush()
    image = str(tmp_path / "start.img")
    result = pmemfs("replay", log.path, image, "--to", "flagged")
    assert "replayed entries 0-1" in result.stdout
    result = pmemfs("replay", log.path, image, "--to", "nope", check=False)
    assert result.returncode == 1 and "no mark 'nope'" in result.stderr
    create_image(tmp_path / "fresh.img", "16M", "--map", "mem")
    result = pmemfs(
        "replay",
        log.path,
        str(tmp_path / "fresh.img"),
        "--each",
        "write",
        "--",
        *checker_command(CHECK_RECORD),
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "COMMAND failed at point 1 (entry 0" in result.stderr and "entry 0: write sectors 0+1" in result.stdout
    result = pmemfs("replay", log.path, image, "--to", "flagged", "--", "true", check=False)
    assert result.returncode == 2
    help_text = subprocess.run([sys.executable, "-m", "pmemfs", "replay", "--help"], capture_output=True, text=True)
    assert "{}" in help_text.stdout and "PMEMFS_REPLAY_IMAGE" in help_text.stdout


@pytest.mark.skipif(  # reason: xfstests' replay-log is not packaged; it is there only where xfstests is built
    shutil.which("replay-log") is None, reason="xfstests' replay-log is not on PATH"
)
def test_xfstests_replay_log_reads_our_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The reader the format was made for: it finds our marks and replays our writes and zeros."""
    with logged_region(tmp_path) as (region, log):
        log.write(0, b"a" * 8192)
        log.mark("half")
        log.write(4096, b"b" * 600)  # not aligned
        log.zero(0, 1024, flush=False)
        log.flush()
        media = bytes(region.read(0, 8192))
    with open(tmp_path / "copy", "wb") as f:
        f.truncate(region.data_size)

    def replay_log(*args: str) -> str:
        done = subprocess.run(["replay-log", "--log", log.path, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "entries=6" in replay_log()
    assert replay_log("--find", "--end-mark", "half").startswith("1@")
    replay_log("--replay", str(tmp_path / "copy"), "--end-mark", writelog.END_MARK)
    assert (tmp_path / "copy").read_bytes()[:8192] == media
