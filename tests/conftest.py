"""Fixtures that start real pmemfs daemons through the CLI and always take them down again."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pmemfs import holes
from pmemfs.client import poll_until, process_alive  # noqa: F401  (process_alive is re-exported for the tests)

PMEMFS = [sys.executable, "-m", "pmemfs"]
PAGE = 4096


def pmemfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(PMEMFS + list(args), capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"pmemfs {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def create_image(path: os.PathLike[str] | str, size: str = "256M", *extra: str) -> str:
    pmemfs("create", str(path), "--size", size, *extra)
    return str(path)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fuse_mounts_under(prefix: str) -> list[str]:
    with open("/proc/mounts") as mounts:
        return [
            line.split()[1]
            for line in mounts
            if line.split()[2].startswith("fuse") and line.split()[1].startswith(prefix)
        ]


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    if not poll_until(predicate, timeout_s, interval_s=0.01):
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@dataclasses.dataclass
class Mount:
    image: str
    mountpoint: str

    @property
    def pmem0(self) -> str:
        return os.path.join(self.mountpoint, "pmem0")

    def status(self) -> dict:
        return json.loads(pmemfs("status", self.mountpoint, "--json").stdout)

    @property
    def pid(self) -> int:
        return int(self.status()["pid"])


def force_unmount(mountpoint: str) -> None:
    """Last resort for a test that left a mount behind: detach loops, kill the daemon, lazy unmount."""
    pmem0 = os.path.join(mountpoint, "pmem0")
    for backing in _loop_backing_files():
        if backing[1] == pmem0:
            subprocess.run(["umount", "-l", backing[0]], capture_output=True)
            subprocess.run(["losetup", "-d", backing[0]], capture_output=True)
    with contextlib.suppress(Exception):
        os.kill(Mount("", mountpoint).pid, signal.SIGKILL)
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


def _loop_backing_files() -> list[tuple[str, str]]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"], capture_output=True, text=True)
    return [tuple(line.split(None, 1)) for line in out.stdout.splitlines() if len(line.split(None, 1)) == 2]  # type: ignore[misc]


# The serving mode mounts use; the `serving_mode` fixture runs each mount test in every mode.
SERVING_MODE = ["fast"]


@pytest.fixture(params=["fast", "trio"])
def serving_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    SERVING_MODE[0] = request.param
    try:
        yield request.param
    finally:
        SERVING_MODE[0] = "fast"


@contextlib.contextmanager
def mounted(image: str, mountpoint: str, *extra: str) -> Iterator[Mount]:
    os.makedirs(mountpoint, exist_ok=True)
    pmemfs("mount", image, mountpoint, "--serve", SERVING_MODE[0], *extra)
    mount = Mount(image, mountpoint)
    try:
        yield mount
    finally:
        if fuse_mounts_under(os.path.abspath(mountpoint)):
            result = pmemfs("umount", mountpoint, check=False)
            if result.returncode != 0:
                force_unmount(mountpoint)
                raise AssertionError(f"pmemfs umount failed: {result.stderr.strip()}")


@pytest.fixture(scope="session", autouse=True)
def daemon_logs_in_the_session_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Daemons started without --log write to $TMPDIR/pmemfs-<mountpoint>.log: keep the thousands
    a run makes in pytest's own temporary directory (which pytest prunes), not in /tmp."""
    tmpdir = str(tmp_path_factory.mktemp("tmpdir"))
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = tmpdir
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def sweep_stale_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Nothing a test run mounts outlives it, even when a test failed half-way."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    for mountpoint in fuse_mounts_under(base):
        force_unmount(mountpoint)


@pytest.fixture
def image(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return create_image(tmp_path / "pmem.img", "256M")


@pytest.fixture
def mount(image: str, tmp_path) -> Iterator[Mount]:  # type: ignore[no-untyped-def]
    with mounted(image, str(tmp_path / "mnt")) as m:
        yield m


class DirectFile:
    """O_DIRECT reads and writes with page-aligned buffers, as a direct-I/O test suite does them."""

    def __init__(self, path: str, flags: int = os.O_RDWR) -> None:
        self.fd = os.open(path, flags | os.O_DIRECT)

    def pwrite(self, data: bytes, offset: int) -> int:
        buf = mmap.mmap(-1, max(len(data), PAGE))
        buf[: len(data)] = data
        with memoryview(buf) as view:
            return os.pwritev(self.fd, [view[: len(data)]], offset)

    def pread(self, length: int, offset: int) -> bytes:
        buf = mmap.mmap(-1, max(length, PAGE))
        with memoryview(buf) as view:
            n = os.preadv(self.fd, [view[:length]], offset)
        return buf[:n]

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def serving_pids(daemon_pid: int) -> set[int]:
    """The processes that serve a mount: the daemon and its workers."""
    return {daemon_pid, *children_of(daemon_pid)}


def kill_serving(daemon_pid: int) -> set[int]:
    """kill -9 every serving process of a mount, and wait until they are gone."""
    pids = serving_pids(daemon_pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(process_alive(pid) for pid in pids), what="the serving processes to die")
    return pids


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def data_extents(path: str, start: int, end: int) -> list[tuple[int, int]]:
    """The allocated extents of a file within [start, end), as SEEK_DATA/SEEK_HOLE report them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return holes.data_extents(fd, start, end)
    finally:
        os.close(fd)


def needs_root() -> None:
    if os.getuid() != 0:
        pytest.skip(reason="needs root to mount a filesystem")


@contextlib.contextmanager
def tmpfs_at(where: os.PathLike[str] | str, size: str) -> Iterator[str]:
    """A size-limited tmpfs at ``where``, unmounted on the way out whatever happened."""
    needs_root()
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield str(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@contextlib.contextmanager
def ext4_at(where: os.PathLike[str] | str, size_bytes: int) -> Iterator[str]:
    """A small ext4 filesystem (a file of ``size_bytes`` on a loop device) mounted at ``where``."""
    needs_root()
    backing = f"{where}.ext4"
    with open(backing, "wb") as f:
        f.truncate(size_bytes)
    subprocess.run(["mkfs.ext4", "-q", "-F", backing], check=True, capture_output=True)
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", backing, str(where)], check=True)
    try:
        yield str(where)
    finally:
        # The loop device mount made goes with the last reference (autoclear).
        subprocess.run(["umount", "-l", str(where)], check=True)
        os.unlink(backing)


def fill_filesystem(where: str) -> int:
    """Take every free byte of the filesystem at ``where`` with a filler file; return its size."""
    fd = os.open(os.path.join(where, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    size = 0
    try:
        stat = os.statvfs(where)
        with contextlib.suppress(OSError):  # most of it at once, without copying
            size = stat.f_bavail * stat.f_frsize // (1 << 20) * (1 << 20) - (1 << 20)
            os.posix_fallocate(fd, 0, max(size, 1))
        size = os.fstat(fd).st_size
        for chunk in (bytes(1 << 20), bytes(4096)):  # then writes, and pages for what is left
            while True:
                try:
                    size += os.pwrite(fd, chunk, size)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return size
