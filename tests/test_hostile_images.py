"""Bad input on purpose: paths that are not images.

Whatever the path or the bytes, `info`, `check` and `mount` answer with exit 0, or exit 1 and one
line that names the problem: never a traceback, never the CLI's "internal error" (that catch-all is
the last line of defence, not how bad input is meant to be handled), never exit 2, never a hang,
and the file is left as it was.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from conftest import PMEMFS, DirectFile, create_image, mounted, pmemfs, sha256_of

from pmemfs.cli import main
from pmemfs.errors import PmemfsError
from pmemfs.region import Region
from pmemfs.region import create_image as create_image_in_process

NOBODY = 65534


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with must_not_block():
        code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@contextlib.contextmanager
def must_not_block(timeout_s: int = 10) -> Iterator[None]:
    def on_alarm(*_: object) -> None:
        raise TimeoutError(f"blocked for {timeout_s} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout_s)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line_failure(code: int, err: str, what: object) -> None:
    assert code == 1, (what, code, err)
    assert len(err.splitlines()) == 1 and err.startswith("pmemfs: "), (what, err)
    assert "internal error" not in err and "Traceback" not in err, (what, err)


def open_region(path: str) -> str | None:
    """Region.open as a mount does it: None when it opens, else the one-line error."""
    try:
        with must_not_block():
            region = Region.open(path)
    except PmemfsError as err:
        assert err.exit_code == 1 and "\n" not in str(err), err
        return str(err)
    region.close(clean=False)
    return None


# Paths that are not images at all.


NOT_IMAGES = {
    "directory": (lambda d: _mkdir(os.path.join(d, "dir")), "is a directory, not a pmemfs image"),
    "FIFO": (lambda d: _mkfifo(os.path.join(d, "fifo")), "is a FIFO, not a pmemfs image"),
    "character device": (lambda d: "/dev/null", "is a character device, not a pmemfs image"),
    "socket": (lambda d: _bind(os.path.join(d, "sock")), "is a socket, not a pmemfs image"),
    "missing": (lambda d: os.path.join(d, "missing.img"), "cannot open"),
    "empty": (lambda d: _file(os.path.join(d, "empty.img"), 0), "too short to be a pmemfs image"),
    "4 KiB of zeros": (lambda d: _file(os.path.join(d, "small.img"), 4096), "too short to be a pmemfs image"),
    "16 MiB of zeros": (lambda d: _file(os.path.join(d, "zeros.img"), 16 << 20), "bad magic"),
}
SOCKETS: list[socket.socket] = []


def _mkdir(path: str) -> str:
    os.mkdir(path)
    return path


def _mkfifo(path: str) -> str:
    os.mkfifo(path)
    return path


def _bind(path: str) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    SOCKETS.append(sock)
    return path


def _file(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def describe(path: str) -> tuple[int, int, str]:
    """What must not change: the kind of file, its size, and its contents or listing."""
    try:
        st_ = os.stat(path)
    except FileNotFoundError:
        return (0, 0, "missing")
    if stat.S_ISDIR(st_.st_mode):
        return (stat.S_IFMT(st_.st_mode), 0, ",".join(sorted(os.listdir(path))))
    if stat.S_ISREG(st_.st_mode):
        return (stat.S_IFMT(st_.st_mode), st_.st_size, sha256_of(path))
    return (stat.S_IFMT(st_.st_mode), st_.st_rdev, "")


@pytest.fixture
def close_sockets() -> Iterator[None]:
    yield
    while SOCKETS:
        SOCKETS.pop().close()


@pytest.mark.usefixtures("close_sockets")
@pytest.mark.parametrize("kind", list(NOT_IMAGES))
def test_a_path_that_is_not_an_image(tmp_path, capsys, kind: str) -> None:  # type: ignore[no-untyped-def]
    make, says = NOT_IMAGES[kind]
    path = make(str(tmp_path))
    before = describe(path)
    for args in (["info", path], ["check", path], ["check", path, "--repair"]):
        code, out, err = run_main(capsys, *args)
        assert_one_line_failure(code, err, args)
        assert says in out + err, (args, out, err)  # check names each problem on stdout
    refused = open_region(path)
    assert refused is not None and says in refused
    if kind not in ("missing", "empty", "4 KiB of zeros", "16 MiB of zeros"):
        # Replacing a file is what --force is for; anything else stays as it is.
        code, _, err = run_main(capsys, "create", path, "--size", "64M", "--force")
        assert_one_line_failure(code, err, "create --force")
        assert says in err
    assert describe(path) == before


@pytest.mark.parametrize("kind", ["directory", "FIFO", "character device", "empty"])
def test_mount_of_a_path_that_is_not_an_image(tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    make, says = NOT_IMAGES[kind]
    path = make(str(tmp_path))
    before = describe(path)
    os.mkdir(tmp_path / "mnt")
    result = subprocess.run([*PMEMFS, "mount", path, str(tmp_path / "mnt")], capture_output=True, text=True, timeout=30)
    assert_one_line_failure(result.returncode, result.stderr, kind)
    assert says in result.stderr
    assert describe(path) == before and not os.path.ismount(tmp_path / "mnt")


@pytest.fixture
def world_readable_dir() -> Iterator[str]:
    """A directory nobody can enter (pytest's own temporary directories are root's alone)."""
    directory = tempfile.mkdtemp(prefix="pmemfs-nobody-")
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_an_unreadable_image_as_an_unprivileged_user(world_readable_dir: str) -> None:
    """As nobody, in a forked child: the venv's interpreter lives under /root, which nobody cannot
    enter, so `setpriv --reuid=65534 ... python -m pmemfs` could not even start."""
    path = os.path.join(world_readable_dir, "secret.img")
    create_image_in_process(path, 16 << 20, mode="fsdax", map="dev", align=2 << 20, force=False)
    os.chmod(path, 0o600)
    before = sha256_of(path)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports through the pipe and never returns into pytest
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            results = []
            for args in (["info", path], ["check", path]):
                sys.stderr = io.StringIO()
                results.append((main(args), sys.stderr.getvalue()))
            results.append((1, open_region(path) or ""))
            os.write(write_end, json.dumps(results).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        output = pipe.read()
    os.waitpid(pid, 0)
    assert output, "the child that dropped to nobody reported nothing"
    results = json.loads(output)
    for code, err in results[:2]:
        assert_one_line_failure(code, err, "as nobody")
        assert err == f"pmemfs: cannot open {path}: Permission denied\n"
    assert results[2][1] == f"cannot open {path}: Permission denied"
    assert sha256_of(path) == before


def test_create_force_refuses_an_image_a_daemon_serves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = create_image(tmp_path / "served.img", "64M")
    with mounted(path, str(tmp_path / "mnt")) as mount:
        with DirectFile(mount.pmem0) as direct:
            direct.pwrite(b"kept" * 1024, 8192)
            before = sha256_of(path)
            result = pmemfs("create", path, "--size", "32M", "--force", check=False)
            assert_one_line_failure(result.returncode, result.stderr, "create --force")
            assert f"in use by process {mount.pid}" in result.stderr
            assert sha256_of(path) == before
            assert direct.pread(4096, 8192) == b"kept" * 1024
