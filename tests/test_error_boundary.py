"""The daemon's error boundary: an unexpected exception in any handler is an errno for that one
request, logged once with its traceback, and the same serving processes go on serving."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal

import pytest
from conftest import (
    SERVING_MODE,
    DirectFile,
    children_of,
    create_image,
    fuse_mounts_under,
    mounted,
    pmemfs,
    process_alive,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("serving_mode")

# One fault per kind of place: the data path, fsync, a control file's render, a session command,
# the badblocks check on every transfer, and the hook that ends transfers between requests.
FAULTS = {
    "region.write": "RuntimeError",
    "region.read": "MemoryError",
    "region.flush": "OSError",
    "registry.statistics": "ValueError",
    "sessions.command": "RuntimeError",
    "badblocks.changed_or_bad": "RuntimeError",
    "registry.end_transfer": "RuntimeError",
}


def _failures_until_it_works(operation, expected_errnos: set[int], attempts: int = 10) -> int:  # type: ignore[no-untyped-def]
    for failures in range(attempts):
        try:
            operation()
            return failures
        except OSError as err:
            assert err.errno in expected_errnos, f"{operation}: {err}"
    raise AssertionError(f"{operation} still fails after {attempts} attempts")


def test_unexpected_exceptions_in_handlers_do_not_take_the_mount_down(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PMEMFS_FAULTS", ",".join(f"{where}={kind}" for where, kind in FAULTS.items()))
    image = create_image(tmp_path / "pmem.img", "64M")
    data = os.urandom(1 << 20)
    with mounted(image, str(tmp_path / "mnt")) as mount:
        status_path = os.path.join(mount.mountpoint, ".pmemfs", "status")

        def read_status() -> None:
            with open(status_path) as f:
                f.read()

        _failures_until_it_works(read_status, {errno.EIO})
        daemon = mount.pid
        serving = {daemon, *children_of(daemon)}
        failed = 0
        with DirectFile(mount.pmem0) as direct:
            failed += _failures_until_it_works(lambda: direct.pwrite(data, 0), {errno.EIO})
            failed += _failures_until_it_works(lambda: direct.pread(len(data), 0), {errno.EIO, errno.ENOMEM})
            failed += _failures_until_it_works(lambda: os.fsync(direct.fd), {errno.EIO})
            fd = os.open(os.path.join(mount.mountpoint, ".pmemfs", "pin"), os.O_RDWR)
            try:
                failed += _failures_until_it_works(lambda: os.write(fd, b"pin pmem0 0 4096"), {errno.EIO})
            finally:
                os.close(fd)
            assert direct.pread(len(data), 0) == data
        assert failed >= 4  # each fault fired where it was meant to, and the next request went through
        assert {daemon, *children_of(daemon)} == serving, "a serving process died or was replaced"
        status = mount.status()
        assert status["counters"]["internal_errors"] >= len(FAULTS) - 1
        assert status["registry"]["referenced_pages"] == 0
        assert status["registry"]["nr_foll_pin_acquired"] == status["registry"]["nr_foll_pin_released"]
        with open(status["log"]) as log:
            logged = log.read()
        for where in ("write", "read", "fsync", "open"):
            assert f"unexpected error in {where}:" in logged
        assert "Traceback" in logged
    assert pmemfs("info", image).returncode == 0


def _stale_image(tmp_path) -> str:  # type: ignore[no-untyped-def]
    """An image whose daemon died holding a pin: its carve-out has records to reset at the next mount."""
    image = create_image(tmp_path / "pmem.img", "64M")
    with mounted(image, str(tmp_path / "mnt")) as mount:
        fd = os.open(os.path.join(mount.mountpoint, ".pmemfs", "pin"), os.O_RDWR)
        try:
            os.write(fd, b"pin dax0 0 8192")
            for pid in {mount.pid, *children_of(mount.pid)}:
                os.kill(pid, signal.SIGKILL)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        pmemfs("umount", mount.mountpoint)  # cleans up the dead mount
    return image


def test_a_mount_that_fails_after_the_kernel_has_it_leaves_the_header_as_it_was(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The reset of a dead daemon's records is the first write after the mount is up: if it fails, the
    mount comes down again, no dead mount is left behind, and the header counts no mount."""
    image = _stale_image(tmp_path)
    before = json.loads(pmemfs("info", image, "--json").stdout)
    monkeypatch.setenv("PMEMFS_FAULTS", "region.punch_hole=OSError")
    result = pmemfs("mount", image, str(tmp_path / "mnt"), "--serve", SERVING_MODE[0], check=False)
    assert result.returncode == 1 and "cannot start serving" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not fuse_mounts_under(str(tmp_path / "mnt"))
    after = json.loads(pmemfs("info", image, "--json").stdout)
    assert (after["mounts"], after["unclean_shutdowns"], after["clean"]) == (
        before["mounts"],
        before["unclean_shutdowns"],
        before["clean"],
    )


def test_records_are_reset_by_writing_zeros_where_holes_cannot_be_punched(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    image = _stale_image(tmp_path)
    monkeypatch.setenv("PMEMFS_FAULTS", "region.punch_hole=EOPNOTSUPP")
    with mounted(image, str(tmp_path / "mnt")) as mount:
        status = mount.status()
        assert status["stale_references"]["pages"] == 2  # found, reported...
        assert status["registry"]["referenced_pages"] == 0  # ...and reset all the same
        with DirectFile(mount.pmem0) as direct:
            direct.pwrite(b"z" * 4096, 0)


def test_a_session_closes_whole_whatever_fails_in_it(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The kernel sends a release once: a pin that cannot be dropped must not keep the device dead or
    the other pins held."""
    monkeypatch.setenv("PMEMFS_FAULTS", "registry.drop=RuntimeError")
    image = create_image(tmp_path / "pmem.img", "64M")
    with mounted(image, str(tmp_path / "mnt")) as mount:
        fd = os.open(os.path.join(mount.mountpoint, ".pmemfs", "pin"), os.O_RDWR)
        os.write(fd, b"pin dax0 0 4096")
        os.write(fd, b"pin dax0 1048576 4096")
        os.write(fd, b"kill")
        os.close(fd)
        wait_for(lambda: mount.status()["registry"]["device_alive"], what="the session's close")
        registry = mount.status()["registry"]
        assert registry["referenced_pages"] == 1  # the one the fault kept; the other went
        assert registry["holders"] == 1
        with DirectFile(mount.pmem0) as direct:
            assert direct.pwrite(b"y" * 4096, 8192) == 4096
        with open(mount.status()["log"]) as log:
            assert "dropping pin" in log.read()
        # The pin the fault left is a leak the log names; drop it the only way left, so that the
        # fixture's umount can drain.
        assert pmemfs("umount", mount.mountpoint, "--timeout", "1", check=False).returncode == 1
        daemon = mount.pid
        os.kill(daemon, signal.SIGKILL)
        wait_for(lambda: not process_alive(daemon), what="the daemon to die")
        pmemfs("umount", mount.mountpoint)
