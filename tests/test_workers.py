"""Serving from several worker processes: exact registry across them, worker death, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest
from conftest import DirectFile, children_of, fuse_mounts_under, mounted, pmemfs, process_alive, wait_for

from pmemfs.serving import default_workers


def test_default_is_one_worker_per_cpu(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with mounted(image, str(tmp_path / "mnt")) as mount:
        status = mount.status()
        assert status["serving"]["mode"] == "fast"
        assert status["serving"]["workers"] == default_workers()
        if default_workers() > 1:
            assert len(children_of(status["pid"])) == default_workers()
            # Requests land in the workers, not in the parent.
            assert status["serving"]["pid"] != status["pid"]


def test_pins_taken_in_one_worker_are_dropped_by_another(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pmemfs.client import PinSession

    with mounted(image, str(tmp_path / "mnt"), "--workers", "2") as mount:
        serving_pids = set()
        for _ in range(20):
            with PinSession(mount.mountpoint) as session:
                session.pin("dax0", 0, 65536, longterm=True)
                serving_pids.add(mount.status()["serving"]["pid"])
        stats = mount.status()["registry"]
        assert stats["pinned_pages"] == 0 and stats["nr_foll_pin_acquired"] == stats["nr_foll_pin_released"] == 20 * 16
        assert len(serving_pids) == 2  # both workers answered


@pytest.mark.skipif(default_workers() < 2 and os.cpu_count() == 1, reason="a second worker would share the only CPU")
def test_kill_9_of_a_worker_fails_or_completes_requests_and_loses_no_acknowledged_write(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mountpoint = str(tmp_path / "mnt")
    acknowledged: dict[int, bytes] = {}
    attempts = [0]
    stop = threading.Event()

    def writer(mount_pmem0: str) -> None:
        with DirectFile(mount_pmem0) as direct:
            block = 0
            while not stop.is_set() and block < 4096:
                data = os.urandom(4096)
                attempts[0] += 1
                try:
                    direct.pwrite(data, block * 4096)
                except OSError:
                    pass  # failed, not acknowledged: allowed
                else:
                    acknowledged[block] = data
                block += 1

    with mounted(image, mountpoint, "--workers", "2") as mount:
        daemon = mount.pid
        workers = children_of(daemon)
        assert len(workers) == 2
        fio = subprocess.Popen(
            ["fio", "--name=k", f"--filename={mount.pmem0}", "--rw=randrw", "--bs=4k", "--ioengine=libaio",
             "--iodepth=16", "--direct=1", "--offset=64M", "--size=64M", "--time_based", "--runtime=4",
             "--output=/dev/null"],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        thread = threading.Thread(target=writer, args=(mount.pmem0,))
        thread.start()
        try:
            wait_for(lambda: len(acknowledged) > 50, what="writes to be acknowledged")
            os.kill(workers[0], signal.SIGKILL)
            after_kill = attempts[0]
            # Let the writer run into the dead worker (and past it) before it stops.
            wait_for(lambda: attempts[0] >= after_kill + 20 or not thread.is_alive(), what="writes after the kill")
        finally:
            stop.set()
            thread.join(timeout=60)
            assert not thread.is_alive(), "a client hung"
            assert fio.wait(timeout=60) is not None, "fio hung"
        # The daemon went down cleanly (or keeps serving): either way nothing is left behind.
        wait_for(lambda: not process_alive(daemon) or mount_answers(mountpoint), timeout_s=30, what="the daemon")
    assert not fuse_mounts_under(mountpoint)
    assert not process_alive(daemon) and not any(process_alive(w) for w in workers)
    with mounted(image, mountpoint) as mount:
        with DirectFile(mount.pmem0, os.O_RDONLY) as direct:
            for block, data in acknowledged.items():
                assert direct.pread(4096, block * 4096) == data, f"block {block}"
        assert mount.status()["registry"]["referenced_pages"] == 0


def mount_answers(mountpoint: str) -> bool:
    try:
        return os.path.exists(os.path.join(mountpoint, ".pmemfs", "status"))
    except OSError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_reaps_every_worker_and_marks_clean(image: str, tmp_path, workers: int) -> None:  # type: ignore[no-untyped-def]
    mountpoint = str(tmp_path / "mnt")
    with mounted(image, mountpoint, "--workers", str(workers)) as mount:
        daemon = mount.pid
        serving = children_of(daemon) if workers > 1 else [daemon]
        assert len(serving) == workers
        # Requests one at a time, so the signal lands while a serving process polls for the next.
        with DirectFile(os.path.join(mountpoint, "pmem0")) as direct:
            for block in range(200):
                direct.pread(4096, block * 4096)
        os.kill(daemon, signal.SIGTERM)
        wait_for(lambda: not process_alive(daemon), timeout_s=30, what="the daemon to exit")
    assert not any(process_alive(w) for w in serving)
    assert not fuse_mounts_under(mountpoint)
    assert '"clean": true' in pmemfs("info", image, "--json").stdout


def test_workers_need_the_fast_path(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = pmemfs("mount", image, str(tmp_path), "--serve", "trio", "--workers", "2", check=False)
    assert result.returncode == 2 and "--workers" in result.stderr
