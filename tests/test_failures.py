"""What bad situations get: a second daemon, a full backing filesystem, kill -9 of the daemon."""

from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest
from conftest import DirectFile, create_image, mounted, pmemfs, process_alive, wait_for

pytestmark = pytest.mark.usefixtures("serving_mode")


def test_second_daemon_on_the_same_image_is_refused(mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "other"
    other.mkdir()
    result = pmemfs("mount", mount.image, str(other), check=False)
    assert result.returncode == 1
    assert f"in use by process {mount.pid}" in result.stderr
    assert not os.path.ismount(other)
    assert mount.status()["mounts"] == 1


def test_mounting_twice_at_one_place_is_refused(mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    second = create_image(tmp_path / "second.img", "16M")
    result = pmemfs("mount", second, mount.mountpoint, check=False)
    assert result.returncode == 1 and "already mounted" in result.stderr


@pytest.fixture
def small_fs(tmp_path):  # type: ignore[no-untyped-def]
    """A 40 MiB tmpfs: room for only part of a 64 MiB image's data."""
    if os.getuid() != 0:
        pytest.skip(reason="needs root to mount a size-limited tmpfs")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_full_backing_filesystem_is_enospc_for_the_writer(small_fs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = create_image(small_fs / "pmem.img", "64M", "--map", "mem")
    chunk = os.urandom(1 << 20)
    with mounted(image, str(tmp_path / "mnt")) as mount:
        written = 0
        with DirectFile(mount.pmem0) as direct:
            with pytest.raises(OSError) as err:
                while True:
                    direct.pwrite(chunk, written)
                    written += len(chunk)
            assert err.value.errno == errno.ENOSPC
            assert 16 << 20 < written < 40 << 20
            # The daemon is alive, everything that was acknowledged reads back.
            status = mount.status()
            assert process_alive(status["pid"]) and status["counters"]["errors"] >= 1
            for offset in range(0, written, len(chunk)):
                assert direct.pread(len(chunk), offset) == chunk
    assert pmemfs("info", image).returncode == 0
    assert '"clean": true' in pmemfs("info", image, "--json").stdout


def test_kill_9_keeps_completed_writes_and_counts_the_unclean_shutdown(image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(4 << 20)
    mountpoint = str(tmp_path / "mnt")
    with mounted(image, mountpoint) as mount:
        with DirectFile(mount.pmem0) as direct:
            direct.pwrite(data, 8 << 20)
        pid = mount.pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), what="the daemon to die")
        with pytest.raises(OSError) as err:
            os.stat(mount.pmem0)
        assert err.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        result = pmemfs("umount", mountpoint)
        assert "daemon had died" in result.stdout
    assert "unclean shutdowns:  0" in pmemfs("info", image).stdout  # counted at the next mount, not before
    with mounted(image, mountpoint) as mount:
        status = mount.status()
        assert status["unclean_shutdowns"] == 1 and status["previous_shutdown"] == "unclean"
        with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
            assert direct.pread(len(data), 8 << 20) == data


def test_mount_over_a_dead_mount_cleans_it_up(image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mountpoint = str(tmp_path / "mnt")
    with mounted(image, mountpoint) as mount:
        pid = mount.pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), what="the daemon to die")
        result = pmemfs("mount", image, mountpoint)
        assert "cleaning up a dead mount" in result.stderr
        assert mount.status()["unclean_shutdowns"] == 1


def test_sigterm_unmounts_and_marks_clean(image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mountpoint = str(tmp_path / "mnt")
    with mounted(image, mountpoint) as mount:
        pid = mount.pid
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not process_alive(pid), what="the daemon to exit")
        assert not os.path.ismount(mountpoint)
    assert '"clean": true' in pmemfs("info", image, "--json").stdout


def test_umount_of_something_not_mounted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = pmemfs("umount", str(tmp_path), check=False)
    assert result.returncode == 1 and "not mounted" in result.stderr


def test_umount_refuses_while_a_file_is_open(mount) -> None:  # type: ignore[no-untyped-def]
    with open(mount.pmem0, "rb"):
        result = pmemfs("umount", mount.mountpoint, check=False)
        assert result.returncode == 1 and f"pid {os.getpid()} (python) has pmem0 open" in result.stderr
        assert process_alive(mount.pid) and mount.status()["registry"]["device_alive"]
