"""Attacks on the edges of a mount's life: unmount under I/O, failed writes over poison, a mount that fails,
what the daemon imports, and where it logs.

DESIGN.md section 3: unmount kills the device reference only to drain references, and names every
holder; section 5: a write that fails keeps the poison, a mount that fails leaves the image byte for byte
as it was, and unmount with a file open is refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from conftest import (
    PMEMFS,
    SERVING_MODE,
    DirectFile,
    Mount,
    create_image,
    fill_filesystem,
    force_unmount,
    fuse_mounts_under,
    mounted,
    pmemfs,
    sha256_of,
    tmpfs_at,
    wait_for,
)

from pmemfs.client import PinSession, default_log_path, read_status

MiB = 1 << 20
PAGE = 4096


def umount_timed(mount: Mount) -> tuple[subprocess.CompletedProcess[str], float]:
    """`pmemfs umount`, and how much longer it took than `pmemfs status` just before it: what the CLI's own
    start costs (about 0.5 s, several on two CPUs shared with fio) is not the unmount's doing."""
    started = time.monotonic()
    pmemfs("status", mount.mountpoint)
    baseline_s = time.monotonic() - started
    started = time.monotonic()
    result = pmemfs("umount", mount.mountpoint, "--timeout", "30", check=False)
    return result, time.monotonic() - started - baseline_s


# D1: unmount while files are in use.

HOLDERS = {
    # Holds pmem0 open and does nothing.
    "pmem0 open": """
        import os, signal, sys
        fd = os.open(sys.argv[1] + "/pmem0", os.O_RDONLY)
        print("ready", flush=True)
        signal.pause()  # until the test kills it
    """,
    # Maps dax0 and closes the file: only the mapping keeps it in use.
    "dax0 mapped": """
        import mmap, os, signal, sys
        fd = os.open(sys.argv[1] + "/dax0", os.O_RDWR)
        m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)
        os.close(fd)
        m[0] = 1
        print("ready", flush=True)
        signal.pause()  # until the test kills it
    """,
}


@pytest.mark.usefixtures("serving_mode")
def test_umount_is_refused_at_once_naming_who_holds_the_mount(mount: Mount) -> None:
    """Attacks unmount against idle users: a process holding pmem0 open, and one with dax0 mapped (file
    closed), must each get `pmemfs umount` refused at once (within 2 s more than `pmemfs status` takes),
    naming that process and saying the file is open; the mount serves on and unmounts once they are gone."""
    tried: list[str] = []
    try:
        for what, code in HOLDERS.items():
            with subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(code), mount.mountpoint], stdout=subprocess.PIPE, text=True
            ) as holder:
                try:
                    assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
                    result, took_s = umount_timed(mount)
                finally:
                    holder.kill()
                    holder.communicate()
            named = str(holder.pid) in result.stderr and "open" in result.stderr
            tried.append(f"{what}: exit {result.returncode}, {took_s:+.1f} s over `pmemfs status`, named {named}")
            assert fuse_mounts_under(mount.mountpoint), f"{what}: umount went ahead: {result.stdout}{result.stderr}"
            assert result.returncode == 1 and took_s < 2, f"{what}: {tried[-1]}: {result.stderr}"
            assert named, f"{what}: pid {holder.pid} not named: {result.stderr}"
            assert read_status(mount.mountpoint)["registry"]["device_alive"]
    finally:
        print(f"umount with users ({SERVING_MODE[0]}): " + "; ".join(tried))


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (make test installs it)")
@pytest.mark.usefixtures("serving_mode")
def test_umount_never_breaks_running_io(mount: Mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Attacks unmount against running I/O: fio (psync, and libaio at iodepth 8) does verified O_DIRECT randrw
    on pmem0 for 4 s; a `pmemfs umount` meanwhile must be refused within 2 s (more than `pmemfs status` takes
    then) naming fio, and fio must finish with no error at all; the unmount after it succeeds."""
    # Rate-limited, so that on two CPUs the umount command itself is not starved of CPU.
    job = ["--direct=1", "--rw=randrw", "--bs=4k", "--size=64M", "--verify=crc32c", "--rate_iops=2500"]
    command = [
        "fio", "--thread", "--output-format=json", f"--filename={mount.pmem0}", "--time_based", "--runtime=4",
        "--name=psync", "--ioengine=psync", *job, "--name=libaio", "--ioengine=libaio", "--iodepth=8",
        "--offset=64M", *job,
    ]  # fmt: skip
    with subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as fio:
        try:
            before = read_status(mount.mountpoint)["counters"]["direct_writes"]
            wait_for(
                lambda: read_status(mount.mountpoint)["counters"]["direct_writes"] > before + 100,
                what="fio to be writing",
            )
            result, took_s = umount_timed(mount)
            out, err = fio.communicate(timeout=60)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.communicate()
    jobs = json.loads(out[out.index("{") :])["jobs"] if "{" in out else []
    ios = sum(j["read"]["total_ios"] + j["write"]["total_ios"] for j in jobs)
    print(
        f"umount under fio ({SERVING_MODE[0]}): umount exit {result.returncode}, {took_s:+.1f} s over `pmemfs status`; "
        f"fio exit "
        f"{fio.returncode}, {ios} I/Os, errors {[j['error'] for j in jobs]}"
    )
    assert fio.returncode == 0 and jobs and all(j["error"] == 0 for j in jobs), f"fio broke: {err[-1500:]}"
    assert result.returncode == 1 and took_s < 2, f"umount exit {result.returncode}, {took_s:+.1f} s: {result}"
    assert str(fio.pid) in result.stderr and "open" in result.stderr, result.stderr
    assert fuse_mounts_under(mount.mountpoint)


# D2: a write that fails keeps the poison.


@pytest.mark.usefixtures("serving_mode")
def test_a_write_that_fails_keeps_the_poison(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Attacks poison clearing on the write path: a 4 KiB O_DIRECT write over poisoned sectors that fails with
    ENXIO (device reference killed) or ENOSPC (a hole on a full tmpfs) must leave the sectors poisoned (reads
    still EIO); only a write that stores clears them."""
    with tmpfs_at(tmp_path / "small", "40M") as small:
        image = create_image(os.path.join(small, "pmem.img"), "64M", "--map", "mem")
        with mounted(image, str(tmp_path / "mnt"), "--log", str(tmp_path / "daemon.log")) as mount:
            tried: list[str] = []
            problems = failed_writes_keep_the_poison(mount, small, tried)
            print(f"failed writes over poison ({SERVING_MODE[0]}): write, then read, at each: {tried}")
            assert not problems, problems


def failed_writes_keep_the_poison(mount: Mount, small: str, tried: list[str]) -> list[str]:
    """The ENXIO case, then the ENOSPC case, on one mount; ``tried`` gets what each write and read got.
    Returns what went wrong."""
    badblocks = os.path.join(mount.mountpoint, ".pmemfs", "badblocks")
    problems = []

    def listed() -> str:
        with open(badblocks) as f:
            return f.read()

    # ENXIO: the device reference is dead while the session that killed it stays open.
    pmemfs("inject-error", mount.mountpoint, "--block", "0", "--count", "8")
    with PinSession(mount.mountpoint) as killer, DirectFile(mount.pmem0) as direct:
        killer.kill_device()
        tried.append(write_errno(direct, 0))
        if listed() != "0 8\n":
            problems.append(f"a write refused with {tried[-1]} cleared the poison: badblocks {listed()!r}")
    # The release of the killer's session reaches the daemon asynchronously.
    wait_for(lambda: read_status(mount.mountpoint)["registry"]["device_alive"], what="the killer's close")
    with DirectFile(mount.pmem0) as direct:
        tried.append(read_errno(direct, 0))
        assert direct.pwrite(b"w" * PAGE, 0) == PAGE  # a store: it clears the poison
        assert direct.pread(PAGE, 0) == b"w" * PAGE
    # ENOSPC: a hole of a full backing filesystem. Sectors at 48 MiB were never written.
    sector = (48 * MiB) // 512
    pmemfs("inject-error", mount.mountpoint, "--block", str(sector), "--count", "8")
    fill_filesystem(small)
    with DirectFile(mount.pmem0) as direct:
        tried.append(write_errno(direct, 48 * MiB))
        if listed() != f"{sector} 8\n":
            problems.append(f"a write refused with {tried[-1]} cleared the poison: badblocks {listed()!r}")
        tried.append(read_errno(direct, 48 * MiB))
        os.unlink(os.path.join(small, "filler"))
        assert direct.pwrite(b"x" * PAGE, 48 * MiB) == PAGE
        assert direct.pread(PAGE, 48 * MiB) == b"x" * PAGE
    if tried != ["ENXIO", "EIO", "ENOSPC", "EIO"]:
        problems.append(f"expected writes refused and reads of the poison EIO, got {tried}")
    if listed():
        problems.append(f"stores did not clear the poison: {listed()!r}")
    return problems


def write_errno(direct: DirectFile, offset: int) -> str:
    try:
        direct.pwrite(b"f" * PAGE, offset)
    except OSError as err:
        return errno.errorcode.get(err.errno or 0, str(err.errno))
    return "written"


def read_errno(direct: DirectFile, offset: int) -> str:
    try:
        direct.pread(PAGE, offset)
    except OSError as err:
        return errno.errorcode.get(err.errno or 0, str(err.errno))
    return "read"


# D3 to D5 are about starting the daemon, before any request is served: one serving mode is enough.


def test_a_mount_that_fails_leaves_the_image_as_it_was(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Attacks the daemon's start-up: run it directly on a mountpoint that does not exist, so that the FUSE
    mount fails after the image was opened; it must exit non-zero and leave the image byte for byte as it
    was (no dirty flag, no mount counted). (A regular file as the mountpoint does not make the mount fail
    here: FUSE mounts over a file, and the daemon then serves until killed.)"""
    image = create_image(tmp_path / "pmem.img", "64M")
    missing = tmp_path / "no-such-dir"
    before = sha256_of(image)
    result = subprocess.run(
        [sys.executable, "-m", "pmemfs.daemon", image, str(missing), "--log", str(tmp_path / "daemon.log")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    info = json.loads(pmemfs("info", image, "--json").stdout)
    state = "unchanged" if sha256_of(image) == before else "CHANGED"
    print(
        f"failed mount: daemon exit {result.returncode}; image {state} (clean {info['clean']}, mounts {info['mounts']})"
    )
    assert result.returncode != 0
    assert state == "unchanged", f"the failed mount changed the image: clean {info['clean']}, mounts {info['mounts']}"


SHADOW = 'open({marker!r}, "a").write("{what} ran from the caller\'s directory\\n")\n'


def test_the_daemon_does_not_import_from_the_callers_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Attacks how the daemon is started: a `pmemfs` package in the caller's working directory (the installed
    CLI never looks there) must not be what the daemon runs; the mount must work and nothing from that
    directory may run."""
    cli = os.path.join(os.path.dirname(sys.executable), "pmemfs")
    if not os.path.exists(cli):
        pytest.skip(reason=f"no installed pmemfs entry point next to {sys.executable}")
    marker = str(tmp_path / "marker")
    shadow = tmp_path / "cwd" / "pmemfs"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(SHADOW.format(marker=marker, what="pmemfs/__init__.py"))
    (shadow / "daemon.py").write_text(SHADOW.format(marker=marker, what="pmemfs/daemon.py") + "raise SystemExit(3)\n")
    image = create_image(tmp_path / "pmem.img", "64M")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = str(tmp_path / "daemon.log")
    try:
        result = subprocess.run(
            [cli, "mount", image, str(mountpoint), "--log", log],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=shadow.parent,
        )
        answered = bool(fuse_mounts_under(str(mountpoint)))
    finally:
        if fuse_mounts_under(str(mountpoint)):
            pmemfs("umount", str(mountpoint))
    ran = ""
    if os.path.exists(marker):
        with open(marker) as f:
            ran = f.read()
    print(f"shadow package in the cwd: mount exit {result.returncode}, mounted {answered}, shadow code ran: {ran!r}")
    assert not ran, f"the daemon imported the caller's directory: {ran}"
    assert result.returncode == 0 and answered, result.stderr


def log_path_under(tmpdir: str, mountpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the CLI logs by default with TMPDIR=tmpdir (tempfile caches the temporary directory)."""
    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "tempdir", tmpdir)
        return default_log_path(mountpoint)


def mount_with_tmpdir(image: str, mountpoint: str, tmpdir: str) -> subprocess.CompletedProcess[str] | None:
    """`pmemfs mount` with TMPDIR=tmpdir and no --log; None if it hung (it is killed)."""
    try:
        return subprocess.run(
            PMEMFS + ["mount", image, mountpoint],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "TMPDIR": tmpdir},
        )
    except subprocess.TimeoutExpired:
        return None


def test_the_default_log_file_is_opened_safely(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Attacks the default log path ($TMPDIR/pmemfs-<mountpoint>.log): a symlink there must not make the mount
    append to its target (refused with one line naming the path, or not followed); a FIFO there must not
    hang the mount and gets one line; a log file the mount creates is mode 0600."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    image = create_image(tmp_path / "pmem.img", "64M")
    mountpoint = str(tmp_path / "mnt")
    os.mkdir(mountpoint)
    log = log_path_under(str(tmpdir), mountpoint, monkeypatch)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    outcomes = []
    try:
        os.symlink(victim, log)
        result = mount_with_tmpdir(image, mountpoint, str(tmpdir))
        assert result is not None, "the mount hung on a symlinked log path"
        outcomes.append(f"symlink: exit {result.returncode} {result.stderr.strip()!r}")
        if fuse_mounts_under(mountpoint):
            pmemfs("umount", mountpoint)
        assert victim.read_bytes() == b"precious\n", "the mount wrote through the symlink at " + log
        if result.returncode:
            assert result.returncode == 1 and len(result.stderr.splitlines()) == 1 and log in result.stderr, result
        os.unlink(log)

        os.mkfifo(log, 0o600)
        result = mount_with_tmpdir(image, mountpoint, str(tmpdir))
        outcomes.append("fifo: hung" if result is None else f"fifo: exit {result.returncode} {result.stderr.strip()!r}")
        assert result is not None, "the mount hung on a FIFO at the log path " + log
        if fuse_mounts_under(mountpoint):
            pmemfs("umount", mountpoint)
        said = (result.stderr if result.returncode else result.stdout).splitlines()
        assert result.returncode in (0, 1) and len(said) == 1, result
        if result.returncode:
            assert log in result.stderr, result.stderr
        os.unlink(log)

        umask = os.umask(0o022)
        try:
            result = mount_with_tmpdir(image, mountpoint, str(tmpdir))
        finally:
            os.umask(umask)
        assert result is not None and result.returncode == 0, result
        mode = stat.S_IMODE(os.stat(log).st_mode)
        outcomes.append(f"new log: mode {mode:o}")
        pmemfs("umount", mountpoint)
        assert mode == 0o600, f"{log} was created with mode {mode:o}"
    finally:
        print("default log path: " + "; ".join(outcomes))
        if fuse_mounts_under(mountpoint):
            force_unmount(mountpoint)
