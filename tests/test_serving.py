"""Serving modes: the fast blocking loop, and the fall-back to trio when pyfuse3 lacks the backend slot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import DirectFile, children_of, pmemfs, wait_for

from pmemfs.client import wait_until_answering

SIMULATE_MISSING_SLOT = """
import sys
import pmemfs.serving
pmemfs.serving.BACKEND_SLOT = "no_such_slot"  # as if pyfuse3 had renamed or dropped it
from pmemfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_missing_backend_slot_falls_back_to_trio_with_one_warning(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with subprocess.Popen(
        [sys.executable, "-c", SIMULATE_MISSING_SLOT, "mount", "--foreground", image, str(mountpoint)],
        stderr=subprocess.PIPE,
        text=True,
    ) as daemon:
        try:
            wait_until_answering(str(mountpoint), daemon)  # type: ignore[arg-type]
            with DirectFile(str(mountpoint / "pmem0")) as direct:
                direct.pwrite(b"t" * 4096, 0)
                assert direct.pread(4096, 0) == b"t" * 4096
            assert mountpoint.joinpath(".pmemfs", "status").read_text()
        finally:
            pmemfs("umount", str(mountpoint))
            _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 0
    warnings = [line for line in stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "fast data path is unavailable" in warnings[0] and "no_such_slot" in warnings[0]
    assert "served with the trio loop" in stderr


def test_fast_loop_is_the_default(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mountpoint = str(tmp_path / "mnt")
    os.mkdir(mountpoint)
    log = tmp_path / "daemon.log"
    pmemfs("mount", image, mountpoint, "--log", str(log))
    try:
        with DirectFile(os.path.join(mountpoint, "pmem0")) as direct:
            direct.pwrite(b"f" * 4096, 0)
    finally:
        pmemfs("umount", mountpoint)
    assert "served with the fast" in log.read_text()


def stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        fields = stat_fields(pid)
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def test_an_idle_daemon_stops_polling(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mountpoint = str(tmp_path / "mnt")
    os.mkdir(mountpoint)
    pmemfs("mount", image, mountpoint, "--serve", "fast", "--spin-us", "1000")
    try:
        status = json.loads(pmemfs("status", mountpoint, "--json").stdout)
        assert status["serving"]["spin_us"] == 1000
        daemon = status["pid"]
        serving = [daemon, *children_of(daemon)]
        with DirectFile(os.path.join(mountpoint, "pmem0")) as direct:
            for block in range(500):  # one at a time: the spinning worker polls after each reply
                direct.pread(4096, block * 4096)
        # Past the last polling window (1 ms): every serving process asleep.
        wait_for(lambda: all(stat_fields(pid)[0] == "S" for pid in serving), what="the daemon to go idle")
        before = cpu_seconds(serving)
        time.sleep(1)  # the interval measured: one idle second
        assert cpu_seconds(serving) - before < 0.1
    finally:
        pmemfs("umount", mountpoint)


@pytest.mark.parametrize("bad", ["-1", "10001", "x"])
def test_spin_us_out_of_range_is_a_usage_error(image: str, tmp_path, bad: str) -> None:  # type: ignore[no-untyped-def]
    result = pmemfs("mount", image, str(tmp_path), "--spin-us", bad, check=False)
    assert result.returncode == 2 and "--spin-us" in result.stderr
