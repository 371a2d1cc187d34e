"""Bad input on purpose: paths that are not images and images whose every field says something odd.

Whatever the path or the bytes, `info`, `check` and `mount` answer with exit 0, or exit 1 and one
line that names the problem: never a traceback, never the CLI's "internal error" (that catch-all is
the last line of defence, not how bad input is meant to be handled), never exit 2, never a hang,
and the file is left as it was.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from conftest import PMEMFS, DirectFile, create_image, mounted, pmemfs, sha256_of
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pmemfs.cli import main
from pmemfs.errors import PmemfsError
from pmemfs.infoblock import HeaderBlock, fletcher64
from pmemfs.region import Region, read_image_info
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


# Images whose fields say something odd: every field of the header and the info block, at its
# extremes, checksummed again (so that validation beyond the checksum is what answers) or not.

settings.register_profile(
    "hostile",
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
IMAGE_SIZE = 64 << 20
HEAD = 8192


# The on-media fields, written out here rather than taken from pmemfs so that the test pins the format.
@dataclasses.dataclass(frozen=True)
class Field:
    block: str  # "header" (each copy at 0 and 2048), "v1 header" (one copy over 4 KiB) or "info" (at 4096)
    name: str
    offset: int  # within its copy or block
    fmt: str

    @property
    def width_bits(self) -> int:
        return 8 * struct.calcsize("<" + self.fmt)

    def __str__(self) -> str:
        return f"{self.block}.{self.name}"


_SHARED_HEADER_FIELDS = [
    ("magic", 0, "8s"), ("version", 8, "I"), ("flags", 12, "I"), ("image_size", 16, "Q"), ("uuid", 24, "16s"),
    ("mount_count", 40, "Q"), ("unclean_shutdowns", 48, "Q"), ("created_ns", 56, "Q"), ("last_mount_ns", 64, "Q"),
    ("map", 72, "I"), ("devdax", 76, "I"), ("align", 80, "Q"), ("badblock_count", 88, "I"),
]  # fmt: skip
HEADER_FIELDS = [Field("header", *f) for f in _SHARED_HEADER_FIELDS] + [
    Field("header", name, offset, fmt)
    for name, offset, fmt in [
        ("reserved", 92, "I"), ("sequence", 96, "Q"), ("reserved tail", 104, "Q"),
        ("badblock[0].sector", 128, "Q"), ("badblock[0].count", 136, "Q"), ("badblock[1].sector", 144, "Q"),
        ("badblock[118].count", 128 + 16 * 118 + 8, "Q"), ("padding", 2032, "Q"), ("checksum", 2040, "Q"),
    ]
]  # fmt: skip
V1_HEADER_FIELDS = [Field("v1 header", *f) for f in _SHARED_HEADER_FIELDS] + [
    Field("v1 header", "badblock[0].count", 264, "Q"),
    Field("v1 header", "checksum", 4088, "Q"),
]
INFO_FIELDS = [
    Field("info", name, offset, fmt)
    for name, offset, fmt in [
        ("signature", 0, "16s"), ("uuid", 16, "16s"), ("parent_uuid", 32, "16s"), ("flags", 48, "I"),
        ("version_major", 52, "H"), ("version_minor", 54, "H"), ("dataoff", 56, "Q"), ("npfns", 64, "Q"),
        ("mode", 72, "I"), ("start_pad", 76, "I"), ("end_trunc", 80, "I"), ("align", 84, "I"),
        ("page_size", 88, "I"), ("page_struct_size", 92, "H"), ("padding", 200, "Q"), ("checksum", 4088, "Q"),
    ]
]  # fmt: skip


def seal(block: bytes) -> bytes:
    """nd_fletcher64 of the block with its last 8 bytes zeroed, stored in those 8 bytes."""
    zeroed = block[:-8] + bytes(8)
    return zeroed[:-8] + struct.pack("<Q", fletcher64(zeroed))


def v1_head(head: bytes) -> bytes:
    """The same image with its header in version 1's layout, as pmemfs 0.1 wrote it."""
    header = HeaderBlock.decode(head[:4096]).header
    block = bytearray(head[:64] + bytes(4096 - 64))  # the fields up to last_mount_ns are where v1 had them
    struct.pack_into("<IIQI", block, 72, *struct.unpack_from("<IIQI", head, 72))  # map, devdax, align, count
    struct.pack_into("<I", block, 8, 1)
    for i, extent in enumerate(header.badblocks):
        struct.pack_into("<QQ", block, 256 + 16 * i, *extent)
    return seal(bytes(block)) + head[4096:]


@dataclasses.dataclass(frozen=True)
class Mutation:
    field: Field
    value: int | bytes
    copies: tuple[int, ...]  # header copies written (0: A, 1: B)
    reseal: bool

    def apply(self, head: bytes) -> bytes:
        block = bytearray(head)
        value = (self.value,)
        if self.field.block == "info":
            bases, size = [4096], 4096
        elif self.field.block == "v1 header":
            bases, size = [0], 4096
        else:
            bases, size = [2048 * copy for copy in self.copies], 2048
        for base in bases:
            struct.pack_into("<" + self.field.fmt, block, base + self.field.offset, *value)
            if self.reseal and self.field.name != "checksum":
                block[base : base + size] = seal(bytes(block[base : base + size]))
        return bytes(block)


def extremes(field: Field) -> st.SearchStrategy[int | bytes]:
    if field.fmt.endswith("s"):
        n = struct.calcsize(field.fmt)
        return st.one_of(st.sampled_from([bytes(n), b"\xff" * n, b"\x01" * n]), st.binary(min_size=n, max_size=n))
    top = (1 << field.width_bits) - 1
    edges = [0, 1, 2, top - 1, top, 1 << (field.width_bits - 1)]
    edges += {"badblock_count": [119, 120, 239, 240], "align": [4096, 2 << 20, 1 << 30], "sequence": [1]}.get(
        field.name, []
    )
    return st.one_of(st.sampled_from(edges), st.integers(0, top))


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, Mutation]:
    base = draw(st.sampled_from(list(BASES)))
    fields = V1_HEADER_FIELDS + INFO_FIELDS if base == "v1" else HEADER_FIELDS + INFO_FIELDS
    field = draw(st.sampled_from(fields))
    copies = draw(st.sampled_from([(0, 1), (0, 1), (0,), (1,)]))
    return base, Mutation(field, draw(extremes(field)), copies, reseal=draw(st.sampled_from([True, True, True, False])))


# Base images: their first 8 KiB, made once. The rest of an image is a hole.
BASES: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("bases")
    variants = {
        "fsdax map=dev": ("fsdax", "dev", ()),
        "devdax map=mem, two bad extents": ("devdax", "mem", ((8, 2), (100, 1))),
    }
    for name, (mode, map_, badblocks) in variants.items():
        path = str(directory / f"{mode}-{map_}.img")
        create_image_in_process(path, IMAGE_SIZE, mode=mode, map=map_, align=2 << 20, force=False)
        with open(path, "r+b") as f:
            state = HeaderBlock.decode(f.read(4096))
            f.seek(0)
            f.write(HeaderBlock.initial(state.header.replace(badblocks=badblocks)))
            f.seek(0)
            BASES[name] = f.read(HEAD)
    BASES["v1"] = v1_head(BASES["devdax map=mem, two bad extents"])


def write_image(path: str, head: bytes) -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(IMAGE_SIZE)


def fingerprint(path: str) -> tuple[bytes, int, int, int]:
    """Enough to see any change: the only non-hole bytes, the size, the allocation, the last write."""
    st_ = os.stat(path)
    with open(path, "rb") as f:
        return f.read(HEAD), st_.st_size, st_.st_blocks, st_.st_mtime_ns


@pytest.mark.usefixtures("bases")
@settings(settings.get_profile("hostile"))
@given(mutations())
def test_hostile_field_values_are_answered_in_one_line(tmp_path, capsys, case: tuple[str, Mutation]) -> None:  # type: ignore[no-untyped-def]
    base, mutation = case
    path = str(tmp_path / "hostile.img")
    write_image(path, mutation.apply(BASES[base]))
    before = fingerprint(path)
    outcomes = {}
    for command in ("info", "check"):
        code, out, err = run_main(capsys, command, path)
        if code:
            assert_one_line_failure(code, err, (command, mutation))
        else:
            assert err == "", (command, mutation, err)
        outcomes[command] = code == 0
    refused = open_region(path)
    assert fingerprint(path) == before, mutation
    # check passes exactly when a mount would open the image: what check calls fine, mount serves.
    assert outcomes["check"] == (refused is None), (mutation, refused, out)
    assert outcomes["info"] or not outcomes["check"], mutation
    event("opens" if refused is None else "info shows it, mount refuses" if outcomes["info"] else "refused")


# Each field at the maximum of its width, in both header copies and checksummed, through a real
# `pmemfs mount`: refused in one line with the image unchanged, or served and cleanly unmounted.
def at_max(field: Field) -> Mutation:
    value = b"\xff" * struct.calcsize(field.fmt) if field.fmt.endswith("s") else (1 << field.width_bits) - 1
    return Mutation(field, value, (0, 1), reseal=True)


def field(name: str) -> Field:
    return next(f for f in HEADER_FIELDS + INFO_FIELDS if str(f) == name)


MOUNT_BASE = "devdax map=mem, two bad extents"
# Fields whose maximum a mount accepts; each of the first few takes a path of its own in the daemon,
# the rest mean nothing to a mount and share one image (the offline test above covers each alone).
MOUNTED_AT_MAX = {
    "header.mount_count": ["header.mount_count"],
    "header.unclean_shutdowns, image not clean": ["header.unclean_shutdowns", "header.flags=0"],
    "header.sequence": ["header.sequence"],
    "info.page_struct_size": ["info.page_struct_size"],
    "every field a mount ignores": [
        "header.created_ns", "header.last_mount_ns", "header.reserved", "header.reserved tail",
        "header.padding", "header.badblock[118].count", "info.parent_uuid", "info.flags",
        "info.version_major", "info.version_minor", "info.padding",
    ],
}  # fmt: skip
ACCEPTED = {name for names in MOUNTED_AT_MAX.values() for name in names}
REFUSED_AT_MAX = [f for f in HEADER_FIELDS + INFO_FIELDS if f.name != "checksum" and str(f) not in ACCEPTED]


def image_at_max(path: str, names: list[str]) -> None:
    head = BASES[MOUNT_BASE]
    for name in names:
        mutation = at_max(field(name.removesuffix("=0")))
        head = dataclasses.replace(mutation, value=0).apply(head) if name.endswith("=0") else mutation.apply(head)
    write_image(path, head)


@pytest.fixture(scope="module")
def refused_mounts(tmp_path_factory: pytest.TempPathFactory, bases: None) -> dict[str, tuple[int, str, bool]]:
    """Every refusal's real mount, two at a time (one per core): each is two interpreter start-ups."""
    directory = tmp_path_factory.mktemp("refused")

    def attempt(f: Field) -> tuple[int, str, bool]:
        path, mountpoint = str(directory / f"{f}.img"), str(directory / f"{f}.mnt")
        os.mkdir(mountpoint)
        image_at_max(path, [str(f)])
        before = fingerprint(path)
        result = pmemfs("mount", path, mountpoint, check=False)
        if result.returncode == 0:  # should have been refused: take it down before saying so
            pmemfs("umount", mountpoint, check=False)
            return 0, result.stderr, False
        return result.returncode, result.stderr, fingerprint(path) == before and not os.path.ismount(mountpoint)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(map(str, REFUSED_AT_MAX), pool.map(attempt, REFUSED_AT_MAX), strict=True))


@pytest.mark.parametrize("field", REFUSED_AT_MAX, ids=str)
def test_a_real_mount_refuses_a_field_at_its_maximum(refused_mounts, field: Field) -> None:  # type: ignore[no-untyped-def]
    code, err, unchanged = refused_mounts[str(field)]
    assert_one_line_failure(code, err, field)
    assert unchanged, f"mount changed the image or left a mount behind: {err}"


@pytest.mark.usefixtures("bases")
@pytest.mark.parametrize("case", list(MOUNTED_AT_MAX))
def test_a_real_mount_serves_a_field_at_its_maximum(tmp_path, case: str) -> None:  # type: ignore[no-untyped-def]
    path, mountpoint = str(tmp_path / "max.img"), str(tmp_path / "mnt")
    image_at_max(path, MOUNTED_AT_MAX[case])
    with mounted(path, mountpoint) as mount:
        with open(os.path.join(mountpoint, ".pmemfs", "status")) as f:
            status = json.load(f)
        with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
            assert direct.pread(4096, 1 << 20) == bytes(4096)
    after = read_image_info(path).header
    assert after.clean and after.badblocks == ((8, 2), (100, 1))
    if case == "header.mount_count":
        assert status["mounts"] == after.mount_count == (1 << 64) - 1
    if case.startswith("header.unclean_shutdowns"):
        assert status["previous_shutdown"] == "unclean"
        assert status["unclean_shutdowns"] == after.unclean_shutdowns == (1 << 64) - 1
