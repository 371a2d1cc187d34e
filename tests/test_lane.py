"""The serving processes' compiled request loop (lane.pyx): reads and writes served by it, the rest
relayed to pyfuse3 through the socket pair, every answer the same as pyfuse3's."""

from __future__ import annotations

import errno
import os
import re

import pytest
from conftest import DirectFile, children_of, mounted, pmemfs

WORKERS = 2


def _lanes(mount, want_pids: int) -> dict[int, dict[str, int]]:  # type: ignore[no-untyped-def]
    """Each serving process's lane counts, read from status until every process has answered."""
    lanes: dict[int, dict[str, int]] = {}
    for _ in range(200):
        serving = mount.status()["serving"]
        lanes[serving["pid"]] = serving["lane"]
        if len(lanes) == want_pids:
            return lanes
    raise AssertionError(f"only {sorted(lanes)} of {want_pids} serving processes answered status")


def test_reads_and_writes_are_served_by_the_lane_and_the_rest_relayed(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    requests = 300
    log = tmp_path / "daemon.log"
    with mounted(image, str(tmp_path / "mnt"), "--workers", str(WORKERS), "--log", str(log)) as mount:
        before = _lanes(mount, WORKERS)
        data = os.urandom(4096 * requests)
        with DirectFile(mount.pmem0) as direct:
            for block in range(requests):
                direct.pwrite(data[block * 4096 : (block + 1) * 4096], block * 4096)
            assert direct.pread(len(data), 0) == data
            with pytest.raises(OSError) as misaligned:
                direct.pread(4096, 100)
            assert misaligned.value.errno == errno.EINVAL
            assert direct.pread(4096, os.fstat(direct.fd).st_size) == b""
        with open(os.path.join(mount.mountpoint, "dax0"), "rb") as buffered:
            assert buffered.read(len(data)) == data
        after = _lanes(mount, WORKERS)
        assert set(after) == set(children_of(mount.pid)), "a serving process has no lane"
        served = sum(after[pid]["served"] - before[pid]["served"] for pid in after)
        relayed = sum(after[pid]["relayed"] - before[pid]["relayed"] for pid in after)
        assert served >= requests + 4  # the writes, the direct reads, the error, the end, the buffered reads
        assert relayed >= 4  # opens, releases, status's own
        assert all(lane["forwarded"] <= lane["relayed"] for lane in after.values())
        assert all(lane["lost_replies"] == lane["failed_replies"] == 0 for lane in after.values())
        status = mount.status()
        assert status["counters"]["writes"] >= requests and status["registry"]["referenced_pages"] == 0
        assert re.search(r"pid \d+'s lane: \d+ served, \d+ relayed\n", pmemfs("status", mount.mountpoint).stdout)
    # At the unmount every lane saw its device close, and its process ended cleanly.
    logged = log.read_text()
    assert not re.search(r"serving process \d+ (failed|\(pid \d+\) died)", logged), logged[-2000:]


def test_control_files_are_served_through_the_lane_like_any_file(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Control-file reads and writes are FUSE_READ/FUSE_WRITE too: they go through the lane's
    buffer to the same handlers (a command longer than any is EINVAL, the mount goes on)."""
    with mounted(image, str(tmp_path / "mnt"), "--workers", str(WORKERS)) as mount:
        fd = os.open(os.path.join(mount.mountpoint, ".pmemfs", "pin"), os.O_RDWR)
        try:
            os.write(fd, b"pin dax0 0 8192")
            pin_id, file, *_ = os.pread(fd, 65536, 0).split()
            assert file == b"dax0"
            with pytest.raises(OSError) as too_long:
                os.write(fd, b"pin " + b"1" * (1 << 20))
            assert too_long.value.errno == errno.EINVAL
            os.write(fd, b"unpin " + pin_id)
        finally:
            os.close(fd)
        assert mount.status()["registry"]["referenced_pages"] == 0
