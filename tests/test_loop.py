"""pmem0 as a real block device: losetup with direct I/O, mkfs.ext4, files, fsck."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import create_image, mounted, pmemfs

pytestmark = [
    pytest.mark.usefixtures("serving_mode"),
    pytest.mark.skipif(  # reason: losetup needs root and /dev/loop-control
        not os.path.exists("/dev/loop-control") or os.getuid() != 0,
        reason="needs root and /dev/loop-control for losetup",
    ),
]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stdout}{result.stderr}"
    return result


def test_mount_loop_mkfs_files_fsck(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = create_image(tmp_path / "pmem.img", "512M")
    ext4 = tmp_path / "ext4"
    ext4.mkdir()
    with mounted(image, str(tmp_path / "mnt"), "--loop") as mount:
        device = mount.status()["blockdev"]
        assert device and device.startswith("/dev/loop")
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as dio:
            assert dio.read().strip() == "1"
        run("mkfs.ext4", "-q", "-F", device)
        run("mount", device, str(ext4))
        try:
            payload = os.urandom(3 << 20)
            for i in range(20):
                (ext4 / f"file{i}").write_bytes(payload[i:] + payload[:i])
            shutil.copytree(os.path.dirname(os.path.abspath(__file__)), ext4 / "tree")
        finally:
            run("umount", str(ext4))
        run("fsck.ext4", "-fn", device)
        run("mount", device, str(ext4))
        try:
            for i in range(20):
                assert (ext4 / f"file{i}").read_bytes() == payload[i:] + payload[:i]
        finally:
            run("umount", str(ext4))
    assert device not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def test_umount_refuses_while_the_loop_device_is_mounted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = create_image(tmp_path / "pmem.img", "64M")
    ext4 = tmp_path / "ext4"
    ext4.mkdir()
    with mounted(image, str(tmp_path / "mnt"), "--loop") as mount:
        device = mount.status()["blockdev"]
        run("mkfs.ext4", "-q", "-F", device)
        run("mount", device, str(ext4))
        try:
            result = pmemfs("umount", mount.mountpoint, check=False)
            assert result.returncode == 1 and "unmount it first" in result.stderr
            assert mount.status()["blockdev"] == device
        finally:
            run("umount", str(ext4))


def test_umount_refuses_while_a_process_has_the_loop_device_open(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """losetup -d of an open loop device succeeds and detaches it only at its last close: the user
    would lose the device under their feet. umount must refuse first, naming who has it open."""
    image = create_image(tmp_path / "pmem.img", "64M")
    with mounted(image, str(tmp_path / "mnt"), "--loop") as mount:
        device = mount.status()["blockdev"]
        fd = os.open(device, os.O_RDONLY)
        try:
            result = pmemfs("umount", mount.mountpoint, check=False)
            assert result.returncode == 1 and f"pid {os.getpid()}" in result.stderr, result.stderr
            assert os.path.basename(device) in result.stderr
            assert mount.status()["blockdev"] == device  # still attached
            with open(f"/sys/block/{os.path.basename(device)}/loop/autoclear") as autoclear:
                assert autoclear.read().strip() == "0"  # and not set to go at the last close
            assert len(os.pread(fd, 4096, 0)) == 4096
        finally:
            os.close(fd)
