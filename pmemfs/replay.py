"""Replay a write log: rebuild the media as it was at any entry, flush or mark, or check every point.

``pmemfs replay LOG IMAGE --to MARK`` applies the log's entries, in order, to IMAGE, which must
hold the media as it was when the log started: a copy of the image made before the mount, or a
new image of the same geometry (a fresh image's data area is all zeros; a missing IMAGE is
created so). IMAGE may also be a plain copy of ``pmem0`` (a file of exactly the data area's
size), which tools like ``fsck.ext4`` read as they are.

``--each flush|write|mark -- COMMAND`` moves IMAGE from point to point and runs COMMAND at each,
stopping at the first that fails, so that IMAGE then holds the media at that point. COMMAND
must not change IMAGE (a read-only check, ``fsck -n``): that would change every later point, so
replay checks that it did not. ``--copy`` gives COMMAND a scratch copy instead, which it may
change (a journal's recovery before the check: a journaling filesystem is consistent at a flush
only once its journal is replayed), and ``--mount`` a mounted scratch copy.

``--reorder N`` adds, at each flush point, N crash states in which an arbitrary subset of the
writes since the previous point landed and the others did not (CrashMonkey's model of a
volatile write cache), drawn from a seed that replay prints, so that a failure can be replayed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence

from .errors import CorruptImage, PmemfsError, UsageError
from .holes import data_extents, punch_hole
from .writelog import DISCARD, FLUSH, MARK, Entry, LogReader

# An mtime no write ever gives IMAGE: set before COMMAND runs, so that any write by it shows.
UNTOUCHED_NS = 1_000_000_007
OUTPUT_TAIL_LINES = 20


def _bad(message: str) -> PmemfsError:
    """What the log or IMAGE is not (exit status 1: the input, not the command line, is wrong)."""
    return PmemfsError(message, errno=errno.EINVAL)


class Target:
    """Where replay writes: the data area of a pmemfs image, or a plain copy of ``pmem0``."""

    def __init__(self, path: str, reader: LogReader) -> None:
        from .region import create_image, lock_image, open_image, read_image_info

        self.path = path
        recorded = reader.recorded
        if not os.path.lexists(path):
            if recorded is None:
                raise _bad(
                    f"{path} does not exist, and {reader.path} does not say what it was recorded on "
                    "(a log the kernel wrote): give a copy of the device it logged"
                )
            create_image(path, recorded.image_size, mode=recorded.mode, map=recorded.map, align=recorded.align,
                         force=False)  # fmt: skip
        self.fd = open_image(path, writable=True)
        try:
            lock_image(self.fd, path)  # no daemon serves it while we write it, nor mounts it half-written
            size = os.fstat(self.fd).st_size
            if recorded is not None and size == recorded.data_size:
                self.kind, self.dataoff, self.data_size = "copy of pmem0", 0, size
            else:
                try:
                    geometry = read_image_info(path).geometry
                except CorruptImage as err:
                    if recorded is not None:
                        raise _bad(
                            f"{path} is neither a pmemfs image nor a copy of pmem0: it has {size} bytes, and the "
                            f"log was recorded on a data area of {recorded.data_size} bytes ({err.args[0]})"
                        ) from None
                    geometry = None
                if geometry is None:
                    self.kind, self.dataoff, self.data_size = "file", 0, size
                else:
                    self.kind, self.dataoff, self.data_size = "pmemfs image", geometry.dataoff, geometry.data_size
                    if recorded is not None and geometry.data_size != recorded.data_size:
                        raise _bad(
                            f"{path} is an image of another geometry: a data area of {geometry.data_size} bytes, "
                            f"the log was recorded on one of {recorded.data_size} (pmemfs create IMAGE --size "
                            f"{recorded.image_size} --map {recorded.map} --align {recorded.align} makes one)"
                        )
            end = max((e.sector + e.nr_sectors for e in reader.entries), default=0) * reader.sectorsize
            if end > self.data_size:
                raise _bad(f"{path}: the log writes up to byte {end}, past its {self.data_size}-byte data area")
        except BaseException:
            os.close(self.fd)
            raise
        self.sectorsize = reader.sectorsize

    def apply(self, entry: Entry, reader: LogReader) -> None:
        if not entry.is_write:
            return
        offset, length = self.dataoff + entry.sector * self.sectorsize, entry.nr_sectors * self.sectorsize
        if entry.flags & DISCARD:
            self.zero(offset, length)
        else:
            self.store(offset, reader.read_data(entry))

    def store(self, offset: int, data: bytes) -> None:
        if os.pwrite(self.fd, data, offset) != len(data):
            raise PmemfsError(f"{self.path}: a write of {len(data)} bytes at {offset} was short")

    def zero(self, offset: int, length: int) -> None:
        try:
            punch_hole(self.fd, offset, length)  # reads as zeros, allocates nothing
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            for piece in range(offset, offset + length, 1 << 20):
                self.store(piece, bytes(min(1 << 20, offset + length - piece)))

    def read(self, entry: Entry) -> bytes:
        return os.pread(self.fd, entry.nr_sectors * self.sectorsize, self.dataoff + entry.sector * self.sectorsize)

    def close(self) -> None:
        os.close(self.fd)


def find_mark(reader: LogReader, name: str) -> Entry:
    for entry in reader.marks():
        if entry.mark == name:
            return entry
    names = ", ".join(repr(e.mark) for e in reader.marks()) or "none"
    raise _bad(f"{reader.path} has no mark {name!r} (its marks: {names})")


def entry_at(reader: LogReader, *, mark: str | None = None, entry: int | None = None, flush: int | None = None) -> int:
    """The index of the last entry to apply for ``--to``, ``--entry`` or ``--flush`` (1 = the first flush)."""
    if mark is not None:
        return find_mark(reader, mark).index
    if entry is not None:
        if not 0 <= entry < len(reader.entries):
            raise _bad(f"{reader.path} has entries 0 to {len(reader.entries) - 1}, not {entry}")
        return entry
    assert flush is not None
    flushes = [e.index for e in reader.entries if e.flags & FLUSH]
    if not 1 <= flush <= len(flushes):
        raise _bad(f"{reader.path} has {len(flushes)} flush entries, not {flush} (--flush counts from 1)")
    return flushes[flush - 1]


def replay_to(reader: LogReader, target: Target, last: int) -> None:
    """Apply entries 0..``last`` to ``target``."""
    for entry in reader.entries[: last + 1]:
        target.apply(entry, reader)


def _is_point(entry: Entry, kind: str) -> bool:
    if kind == "flush":
        return bool(entry.flags & FLUSH)
    if kind == "mark":
        return bool(entry.flags & MARK)
    return entry.is_write


@dataclasses.dataclass(frozen=True)
class Point:
    """A state to check: the media once entries up to ``last`` are applied (``landed``: of the
    writes in ``first``..``last``, only these, for a reordered crash state)."""

    number: int
    first: int
    last: int
    what: str
    landed: tuple[int, ...] | None = None

    def covers(self) -> str:
        return f"{self.first}-{self.last}" if self.first < self.last else str(self.last)

    def covering(self) -> str:
        return f"entries {self.first}-{self.last}" if self.first < self.last else f"entry {self.last}"


def points(reader: LogReader, kind: str, start: int) -> Iterator[tuple[int, int, str]]:
    """(first, last, what) of each point of ``kind`` from entry ``start`` on: ``first`` is the
    first entry the point covers, after the previous point."""
    first = start
    for entry in reader.entries[start:]:
        if _is_point(entry, kind):
            yield first, entry.index, entry.describe()
            first = entry.index + 1


def reorder_states(writes: Sequence[int], count: int, rng: random.Random) -> list[tuple[int, ...]]:
    """Up to ``count`` distinct subsets of ``writes`` (neither none nor all of them: those are the
    previous point and this one), each write landed or not with even odds."""
    if len(writes) < 2:
        return []
    possible = 2 ** len(writes) - 2
    states: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    attempts = 0
    while len(states) < min(count, possible) and attempts < 64 * count:
        attempts += 1
        landed = tuple(w for w in writes if rng.random() < 0.5)
        if 0 < len(landed) < len(writes) and landed not in seen:
            seen.add(landed)
            states.append(landed)
    return states


@dataclasses.dataclass
class Outcome:
    point: Point
    returncode: int
    output: str


class Checker:
    """Runs COMMAND at a point: ``{}`` in it becomes the replayed image, or with ``copy`` a scratch
    copy of it that COMMAND may change (a recovery before the check), or with ``mount`` the pmem0
    of a mounted scratch copy; the environment says the rest (cli.py's REPLAY_ENVIRONMENT)."""

    def __init__(
        self, command: Sequence[str], target: Target, reader: LogReader, *, mount: bool = False, copy: bool = False
    ) -> None:
        if not command:
            raise UsageError("--each needs a command after --")
        if mount and target.kind != "pmemfs image":
            raise UsageError(f"--mount needs a pmemfs image, and {target.path} is a {target.kind}")
        self.command = list(command)
        self.target = target
        self.reader = reader
        self.mount = mount
        # Scratch copies go next to IMAGE: the same filesystem, where a copy may share its blocks.
        self._workdir = (
            tempfile.mkdtemp(prefix="pmemfs-replay-", dir=os.path.dirname(os.path.abspath(target.path)))
            if mount or copy
            else None
        )

    def run(self, point: Point) -> Outcome:
        env = dict(os.environ)
        env.update(
            PMEMFS_REPLAY_LOG=os.path.abspath(self.reader.path),
            PMEMFS_REPLAY_IMAGE=os.path.abspath(self.target.path),
            PMEMFS_REPLAY_DATAOFF=str(self.target.dataoff),
            PMEMFS_REPLAY_SIZE=str(self.target.data_size),
            PMEMFS_REPLAY_POINT=str(point.number),
            PMEMFS_REPLAY_ENTRY=str(point.last),
        )
        if self._workdir is not None:
            return self._run_on_copy(point, env, self._workdir)
        os.utime(self.target.fd, ns=(UNTOUCHED_NS, UNTOUCHED_NS))
        outcome = self._run(point, env, env["PMEMFS_REPLAY_IMAGE"])
        if os.fstat(self.target.fd).st_mtime_ns != UNTOUCHED_NS:
            raise PmemfsError(
                f"COMMAND changed {self.target.path} at point {point.number}, so every later point would not be "
                "what the log says: run a read-only check (fsck -n), or pass --copy (or --mount), which gives "
                "COMMAND a copy to change"
            )
        return outcome

    def _run_on_copy(self, point: Point, env: dict[str, str], workdir: str) -> Outcome:
        copy = os.path.join(workdir, os.path.basename(self.target.path))
        sparse_copy(self.target.fd, copy)
        env["PMEMFS_REPLAY_IMAGE"] = copy
        try:
            if not self.mount:
                return self._run(point, env, copy)
            from .api import open_region

            with open_region(copy, directory=workdir, workers=1) as region:
                env.update(PMEMFS_REPLAY_PMEM0=region.pmem0, PMEMFS_REPLAY_MOUNTPOINT=region.mountpoint)
                return self._run(point, env, region.pmem0)
        finally:
            os.unlink(copy)

    def _run(self, point: Point, env: dict[str, str], path: str) -> Outcome:
        argv = [arg.replace("{}", path) for arg in self.command]
        try:
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace")  # fmt: skip
        except OSError as err:
            raise PmemfsError(f"cannot run {argv[0]}: {err.strerror}") from None
        return Outcome(point, done.returncode, done.stdout + done.stderr)

    def close(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sparse_copy(fd: int, path: str) -> None:
    """Copy the file open at ``fd`` to ``path``, only its data extents (a sparse image stays sparse)."""
    size = os.fstat(fd).st_size
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(out, size)
        for start, end in data_extents(fd, 0, size):
            while start < end:
                copied = os.copy_file_range(fd, out, end - start, start, start)
                if copied <= 0:
                    raise PmemfsError(f"cannot copy {size} bytes to {path}: the copy stopped at {start}")
                start += copied
    finally:
        os.close(out)


class EachPoint:
    """``--each``: walk IMAGE from point to point, check each, stop at the first failure."""

    def __init__(
        self, reader: LogReader, target: Target, checker: Checker, kind: str, start: int,
        reorder: int = 0, seed: int | None = None, say: Callable[[str], None] = print,
    ) -> None:  # fmt: skip
        self.reader, self.target, self.checker, self.kind, self.start = reader, target, checker, kind, start
        self.reorder = reorder
        self.seed = seed if seed is not None else random.SystemRandom().randrange(1 << 32)
        self.rng = random.Random(self.seed)
        self.say = say
        self.applied = -1
        self.checked = 0

    def run(self) -> Outcome | None:
        """The first failing point's outcome (IMAGE is left at it), or None when every point passed."""
        self.say(f"{'point':>6}  {'entry':>6}  {'covers':<13}  {'what':<34}  result")
        number = 0
        for first, last, what in points(self.reader, self.kind, self.start):
            self._apply_through(first - 1)
            if self.reorder and self.kind == "flush":
                writes = [i for i in range(first, last) if self.reader.entries[i].is_write]
                for n, landed in enumerate(reorder_states(writes, self.reorder, self.rng), start=1):
                    number += 1
                    failed = self._check_reordered(Point(number, first, last, f"{what}, reorder {n}", landed))
                    if failed:
                        return failed
            self._apply_through(last)
            number += 1
            failed = self._check(Point(number, first, last, what))
            if failed:
                return failed
        return None

    def _apply_through(self, last: int) -> None:
        for entry in self.reader.entries[self.applied + 1 : last + 1]:
            self.target.apply(entry, self.reader)
        self.applied = max(self.applied, last)

    def _check(self, point: Point) -> Outcome | None:
        outcome = self.checker.run(point)
        self.checked += 1
        result = "ok" if outcome.returncode == 0 else f"FAILED (exit status {outcome.returncode})"
        what = point.what
        if point.landed is not None:
            writes = sum(1 for i in range(point.first, point.last) if self.reader.entries[i].is_write)
            what += f": {len(point.landed)} of {writes} writes landed"
        self.say(f"{point.number:>6}  {point.last:>6}  {point.covers():<13}  {what:<34}  {result}")
        return outcome if outcome.returncode else None

    def _check_reordered(self, point: Point) -> Outcome | None:
        """The state at the previous point plus only the writes ``landed``; undone afterwards,
        unless it failed (then IMAGE is left in it)."""
        entries = self.reader.entries
        writes = [entries[i] for i in range(point.first, point.last) if entries[i].is_write]
        before = [(entry, self.target.read(entry)) for entry in writes]
        for index in point.landed or ():
            self.target.apply(entries[index], self.reader)
        failed = self._check(point)
        if not failed:
            for entry, data in before:
                self.target.store(self.target.dataoff + entry.sector * self.target.sectorsize, data)
        return failed

    def describe_failure(self, outcome: Outcome) -> list[str]:
        """What the failing point covered, entry by entry, and the tail of COMMAND's output."""
        point = outcome.point
        lines = [f"point {point.number} covers {point.covering()}:"]
        for entry in self.reader.entries[point.first : point.last + 1]:
            landed = ""
            if point.landed is not None and entry.is_write and entry.index != point.last:
                landed = " (landed)" if entry.index in point.landed else " (did not land)"
            lines.append(f"  entry {entry.index}: {entry.describe()}{landed}")
        output = outcome.output.rstrip().splitlines()
        if output:
            lines.append(f"COMMAND's output{' (last lines)' if len(output) > OUTPUT_TAIL_LINES else ''}:")
            lines += ["  " + line for line in output[-OUTPUT_TAIL_LINES:]]
        return lines


@contextlib.contextmanager
def opened(log: str, image: str) -> Iterator[tuple[LogReader, Target]]:
    with LogReader(log) as reader:
        target = Target(image, reader)
        try:
            yield reader, target
        finally:
            target.close()


def log_summary(reader: LogReader) -> str:
    entries = reader.entries
    flushes = sum(1 for e in entries if e.flags & FLUSH)
    writes = sum(1 for e in entries if e.is_write)
    marks = len(reader.marks())
    ending = ""
    if reader.stopped_full:
        ending = "; it stopped when it was full"
    elif reader.closed_clean is False:
        ending = "; it ends where its daemon stopped (a crash)"
    counts = ", ".join(_count(n, what) for n, what in ((writes, "write"), (flushes, "flush"), (marks, "mark")))
    return f"{_count(len(entries), 'entry')}: {counts}{ending}"


def _count(n: int, what: str) -> str:
    plural = {"entry": "entries", "flush": "flushes"}.get(what, what + "s")
    return f"{n} {what if n == 1 else plural}"
