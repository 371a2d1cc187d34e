"""The daemon's error boundary: an unexpected exception in any handler is an errno for that one
request, logged once with its traceback, and the same serving processes go on serving."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import DirectFile, children_of, create_image, mounted, pmemfs

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
    "registry.end_transfers": "RuntimeError",
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
