"""Attacks on space: a full backing filesystem, reads that must not allocate, and what one write allocates.

DESIGN.md section 5: a full backing filesystem is ENOSPC for the writer and the daemon keeps running
(allocate before storing into a hole). Section 1: the image stays sparse, only what was written is
allocated; reading allocates nothing in the data area.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import (
    PAGE,
    SERVING_MODE,
    DirectFile,
    Mount,
    allocated_bytes,
    create_image,
    data_extents,
    ext4_at,
    fill_filesystem,
    mounted,
    pmemfs,
    serving_pids,
    tmpfs_at,
)

from pmemfs.client import read_status
from pmemfs.dax import open_dax
from pmemfs.errors import NoSpace

pytestmark = pytest.mark.usefixtures("serving_mode")

MiB = 1 << 20


def chunk_of(index: int) -> bytes:
    """The 1 MiB a writer stores at chunk ``index``, reproducible from the index alone."""
    return random.Random(index).randbytes(MiB)


def backing_fs(kind: str, where: str) -> Iterator[str]:
    return tmpfs_at(where, "40M") if kind == "tmpfs" else ext4_at(where, 64 * MiB)  # type: ignore[return-value]


# C1: the backing filesystem fills up.

FILL_WRITER = textwrap.dedent(
    """
    import errno, mmap, os, random, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    for index in range(int(sys.argv[2])):
        buf[:] = random.Random(index).randbytes(1 << 20)
        try:
            os.pwritev(fd, [buf], index << 20)
        except OSError as err:
            print(f"{index} {errno.errorcode[err.errno]}")
            break
        print(index, flush=True)
    """
)

DAX0_HOLE_READER = textwrap.dedent(
    """
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ, offset=int(sys.argv[2]))
    print("zeros" if m[:] == bytes(1 << 20) else "not zeros")
    """
)

DAX0_HOLE_STORER = textwrap.dedent(
    """
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, offset=int(sys.argv[2]))
    m[:] = b"s" * (1 << 20)
    print("stored", flush=True)
    try:
        m.flush()
    except OSError as err:
        print(f"msync {err.errno}")
    else:
        print("msync ok")
    """
)


@pytest.mark.parametrize("fs, map_", [("tmpfs", "mem"), ("ext4", "dev")])
def test_full_backing_filesystem(tmp_path, fs: str, map_: str) -> None:  # type: ignore[no-untyped-def]
    """Attacks allocate-before-store on a backing filesystem smaller than the image: O_DIRECT writes until
    ENOSPC (never EIO, never a hang); then holes must still read as zeros through O_DIRECT, buffered reads
    and a dax0 mapping, dax0 stores into holes fail at msync in the client only, open_dax() over holes is
    NoSpace, no serving process dies, and the image unmounts clean."""
    with backing_fs(fs, str(tmp_path / "backing")) as backing:
        # Bigger than the space: 40 MiB of tmpfs, or a 64 MiB ext4 (about 55 MiB free). On ext4 the image is
        # 1 GiB so that the registry records of the hole read below (the last MiB) lie in blocks of the
        # carve-out that no write allocated.
        image = create_image(os.path.join(backing, "pmem.img"), "64M" if fs == "tmpfs" else "1G", "--map", map_)
        log = ["--log", str(tmp_path / "daemon.log")]
        notes: list[str] = []
        try:
            with mounted(image, str(tmp_path / "mnt"), *log) as mount:
                fill_then_attack(mount, backing, notes)
        finally:
            print(f"full {fs} (map={map_}, {SERVING_MODE[0]}): " + ", ".join(notes))
        assert json.loads(pmemfs("info", image, "--json").stdout)["clean"] is True


def fill_then_attack(mount: Mount, backing: str, notes: list[str]) -> None:
    """Write until ENOSPC, take what is left of the filesystem, then read and store; ``notes`` says how far
    it went and what each step got."""
    before = serving_pids(read_status(mount.mountpoint)["pid"])
    size = os.stat(mount.pmem0).st_size
    writer = subprocess.run(
        [sys.executable, "-c", FILL_WRITER, mount.pmem0, str(size // MiB)], capture_output=True, text=True, timeout=60
    )
    lines = writer.stdout.split("\n")[:-1]
    written = len(lines) - 1
    notes.append(f"{written} MiB acknowledged then {lines[-1].split()[-1] if lines else 'nothing'}")
    assert lines and lines[-1].endswith(" ENOSPC"), f"the writer did not get ENOSPC: {lines[-1:]}"
    assert 8 < written < size // MiB - 4, f"{written} MiB written of {size // MiB}: no hole left to read"
    notes.append(f"{fill_filesystem(backing) // 1024} KiB left for a filler")  # what allocation granularity left
    check_holes_and_stores(mount, size - MiB, notes)  # the last MiB was never written
    assert serving_pids(read_status(mount.mountpoint)["pid"]) == before, "a serving process died"
    with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
        lost = [i for i in range(written) if direct.pread(MiB, i * MiB) != chunk_of(i)]
    notes.append(f"{len(lost)} acknowledged MiB lost, same serving processes")
    assert not lost, f"acknowledged chunks lost: {lost[:10]}"


def check_holes_and_stores(mount: Mount, hole: int, notes: list[str]) -> None:
    """The reads and stores a full filesystem must not break, asserting as it goes; ``notes`` gets each outcome."""
    with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
        notes.append(f"O_DIRECT hole read: {(got := attempt(lambda: direct.pread(MiB, hole)))}")
        assert got == "zeros", f"O_DIRECT read of a hole: {got}"
    with open(mount.pmem0, "rb", buffering=0) as buffered:
        buffered.seek(hole)
        notes.append(f"buffered hole read: {(got := attempt(lambda: buffered.read(MiB)))}")
        assert got == "zeros", f"buffered read of a hole: {got}"
    dax0 = os.path.join(mount.mountpoint, "dax0")
    reader = subprocess.run(
        [sys.executable, "-c", DAX0_HOLE_READER, dax0, str(hole)], capture_output=True, text=True, timeout=60
    )
    notes.append(f"dax0 mmap hole read: exit {reader.returncode} {reader.stdout.strip()}")
    assert reader.returncode == 0 and reader.stdout == "zeros\n", f"dax0 mmap read of a hole: {reader}"
    storer = subprocess.run(
        [sys.executable, "-c", DAX0_HOLE_STORER, dax0, str(hole - MiB)], capture_output=True, text=True, timeout=60
    )
    msync = storer.stdout.split("\n")[-2:-1]
    got = f"exit {storer.returncode}, {storer.stdout!r} {storer.stderr[-300:]}"
    notes.append(f"dax0 stores + msync into a hole: exit {storer.returncode} {'/'.join(storer.stdout.split())}")
    assert storer.returncode == 0, f"dax0 stores into a hole of a full filesystem killed the client: {got}"
    assert msync in ([f"msync {errno.ENOSPC}"], [f"msync {errno.EIO}"]), f"msync after stores into a hole: {got}"
    with pytest.raises(NoSpace):
        open_dax(mount.mountpoint, hole - 2 * MiB, MiB)
    notes.append("open_dax over a hole: NoSpace")


def attempt(read: Callable[[], bytes]) -> str:
    """Say "zeros" for a read of 1 MiB of zeros, else what it returned or the error it got."""
    try:
        data = read()
    except OSError as err:
        return f"{errno.errorcode.get(err.errno or 0)} ({err.strerror})"
    return "zeros" if data == bytes(MiB) else f"{len(data)} bytes, not all zeros"


# C2: reads allocate nothing in the data area.

# A 64 MiB image (a 62 MiB data area): the three whole-device reads cost seconds per 256 MiB.
DATA = {0: b"a", 7 * MiB + 4 * PAGE: b"b", 40 * MiB: b"c", 62 * MiB - 2 * PAGE: b"d"}  # offset -> 64 KiB fill


def expected_chunks(size: int) -> Iterator[bytes]:
    for start in range(0, size, MiB):
        chunk = bytearray(min(MiB, size - start))
        for offset, fill in DATA.items():
            lo, hi = max(offset, start), min(offset + 65536, start + len(chunk))
            if lo < hi:
                chunk[lo - start : hi - start] = fill * (hi - lo)
        yield bytes(chunk)


def whole_device_reads(mount: Mount, size: int) -> list[str]:
    """Read all of pmem0 with dd (O_DIRECT, then buffered) and all of dax0 through mmap; return what
    did not read back as the data written and zeros elsewhere."""
    wrong = []
    want = hashlib.sha256(b"".join(expected_chunks(size))).hexdigest()
    for flags in (["iflag=direct"], []):
        dd = subprocess.run(
            ["dd", f"if={mount.pmem0}", "bs=1M", "status=none", *flags], capture_output=True, timeout=120
        )
        if dd.returncode or hashlib.sha256(dd.stdout).hexdigest() != want:
            wrong.append(f"dd {' '.join(flags) or 'buffered'}: exit {dd.returncode} {dd.stderr.decode().strip()}")
    mapper = subprocess.run(
        [sys.executable, "-c", DAX0_SUM, os.path.join(mount.mountpoint, "dax0"), str(size)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if mapper.returncode or mapper.stdout.strip() != want:
        wrong.append(f"dax0 mmap: exit {mapper.returncode} {mapper.stderr.strip()[-200:]}")
    return wrong


DAX0_SUM = textwrap.dedent(
    """
    import hashlib, mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    m = mmap.mmap(fd, int(sys.argv[2]), mmap.MAP_SHARED, mmap.PROT_READ)
    print(hashlib.sha256(m).hexdigest())
    """
)


# How the loop serves requests does not change what the image allocates or keeps: fast only.
@pytest.mark.parametrize("serving_mode", ["fast"], indirect=True)
@pytest.mark.parametrize("fs", ["tmpfs", "ext4"])
def test_reading_never_allocates_in_the_data_area(tmp_path, fs: str) -> None:  # type: ignore[no-untyped-def]
    """Attacks the read path's side effects: whole-device reads of pmem0 (dd O_DIRECT and buffered) and of
    dax0 (mmap) must leave the data area's allocated extents as they were and read the holes as zeros; on
    tmpfs the same reads must also work once the tmpfs is full."""
    where = str(tmp_path / "tmpfs") if fs == "tmpfs" else str(tmp_path)
    with tmpfs_at(where, "1G") if fs == "tmpfs" else contextlib.nullcontext(where):
        image = create_image(os.path.join(where, "pmem.img"), "64M")
        with mounted(image, str(tmp_path / "mnt"), "--log", str(tmp_path / "daemon.log")) as mount:
            status = read_status(mount.mountpoint)
            start, size = status["dataoff"], status["size"]
            with DirectFile(mount.pmem0) as direct:
                for offset, fill in DATA.items():
                    direct.pwrite(fill * 65536, offset)
            extents = data_extents(image, start, start + size)
            wrong = whole_device_reads(mount, size)
            after = data_extents(image, start, start + size)
            full = ""
            full_wrong: list[str] = []
            if fs == "tmpfs" and not wrong and after == extents:
                filler = fill_filesystem(where)
                full_wrong = whole_device_reads(mount, size)
                os.unlink(os.path.join(where, "filler"))
                full = f"; then on the full tmpfs ({filler // MiB} MiB filler): {len(full_wrong)} wrong"
            print(
                f"reads allocate nothing ({fs}, {SERVING_MODE[0]}): 3 whole-device reads of {size // MiB} MiB, "
                f"data extents {len(extents)} before, {len(after)} after "
                f"({sum(b - a for a, b in after) // 1024} KiB), {len(wrong)} wrong{full}"
            )
            assert not wrong, wrong
            assert after == extents, f"reads allocated in the data area: {len(extents)} extents became {len(after)}"
            assert not full_wrong, f"on a full tmpfs: {full_wrong}"


# C3: what a 4 KiB write allocates.


@pytest.mark.parametrize("pattern", ["random", "2 MiB stride"])
def test_a_4k_write_allocates_about_4k(tmp_path, pattern: str) -> None:  # type: ignore[no-untyped-def]
    """Attacks allocation granularity: 3000 4 KiB O_DIRECT writes into a 64 GiB image on ext4 must grow the
    image by less than 3000 * (4 KiB of data + 4 KiB of registry records) + 2 MiB. Random offsets, and one
    every 2 MiB (where the kernel's large folios once made each store dirty, and allocate, 2 MiB)."""
    image = create_image(tmp_path / "pmem.img", "64G")
    rng = random.Random(12)
    with mounted(image, str(tmp_path / "mnt"), "--log", str(tmp_path / "daemon.log")) as mount:
        pages = os.stat(mount.pmem0).st_size // PAGE
        if pattern == "random":
            offsets = [rng.randrange(pages) * PAGE for _ in range(3000)]
        else:
            offsets = [i * 2 * MiB + 2 * PAGE for i in range(3000)]
        limit = 3000 * 2 * PAGE + 2 * MiB
        before = allocated_bytes(image)
        written = 0
        started = time.monotonic()
        with DirectFile(mount.pmem0) as direct:
            block = os.urandom(PAGE)
            for offset in offsets:
                direct.pwrite(block, offset)
                written += 1
                # Stop once the attack has shown its effect, instead of allocating gigabytes.
                if written % 10 == 0 and allocated_bytes(image) - before > limit:
                    break
        grown = allocated_bytes(image) - before
        print(
            f"4k writes ({SERVING_MODE[0]}): {written} writes ({pattern}) in {time.monotonic() - started:.2f} s "
            f"grew the image by {grown / MiB:.1f} MiB, {grown / (written * PAGE):.1f}x what was written"
        )
        assert written == 3000, f"after {written} writes the image had grown by {grown / MiB:.0f} MiB"
        assert grown < limit, f"{grown / MiB:.1f} MiB allocated for {written * PAGE / MiB:.1f} MiB written"


# How the loop serves requests does not change what the image allocates or keeps: fast only.
@pytest.mark.parametrize("serving_mode", ["fast"], indirect=True)
def test_random_writes_over_a_whole_range_leave_it_in_few_extents(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Attacks fragmentation: every page of 64 MiB written once, in random order, with 4 KiB O_DIRECT
    writes, then fsync. Allocating each page ahead of its store (fallocate) left one extent a page,
    whose writeback at fsync grew quadratic (68 s for 1 GiB); written with pwrite, ext4's delayed
    allocation lays them out together."""
    image = create_image(tmp_path / "pmem.img", "256M")
    pages = list(range((64 * MiB) // PAGE))
    random.Random(3).shuffle(pages)
    block = os.urandom(PAGE)
    with mounted(image, str(tmp_path / "mnt"), "--log", str(tmp_path / "daemon.log")) as mount:
        with DirectFile(mount.pmem0) as direct:
            started = time.monotonic()
            for page in pages:
                direct.pwrite(block, page * PAGE)
            os.fsync(direct.fd)
            took = time.monotonic() - started
    report = subprocess.run(["filefrag", image], capture_output=True, text=True, check=True).stdout
    extents = int(report.rsplit(":", 1)[1].split()[0])
    print(f"random fill ({SERVING_MODE[0]}): {len(pages)} pages in {took:.1f} s, the image has {extents} extents")
    assert extents < len(pages) // 16, report
