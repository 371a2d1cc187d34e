"""The page registry through a real mount: direct-I/O pins, long-term pins, teardown, stale state."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import PMEMFS, DirectFile, Mount, mounted, pmemfs, process_alive, wait_for

from pmemfs.client import PinSession
from pmemfs.errors import PmemfsError

pytestmark = pytest.mark.usefixtures("serving_mode")


def registry(mount: Mount) -> dict:
    return mount.status()["registry"]


def assert_balanced(mount: Mount) -> dict:
    stats = registry(mount)
    assert stats["referenced_pages"] == 0 and stats["pinned_pages"] == 0, stats
    assert stats["nr_foll_pin_acquired"] == stats["nr_foll_pin_released"], stats
    assert stats["nr_get_page"] == stats["nr_put_page"], stats
    assert stats["nr_unbalanced"] == 0
    assert pmemfs("pages", mount.mountpoint).stdout.strip() == "no page is referenced"
    return stats


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (make test installs it)")
def test_fio_leaves_every_refcount_at_zero(mount: Mount) -> None:
    subprocess.run(
        ["fio", "--name=pins", f"--filename={mount.pmem0}", "--rw=randrw", "--bs=4k", "--ioengine=libaio",
         "--iodepth=16", "--numjobs=4", "--direct=1", "--size=32M", "--offset_increment=32M", "--output=/dev/null"],
        check=True, timeout=300,
    )  # fmt: skip
    stats = assert_balanced(mount)
    assert stats["nr_foll_pin_acquired"] >= 4 * 32 * 256


def test_a_direct_transfer_pins_exactly_its_pages_while_it_runs(mount: Mount) -> None:
    length = 1 << 20  # the largest request FUSE sends (max_pages 256): one transfer
    with PinSession(mount.mountpoint) as watcher:
        watcher.trace_io(True)  # as `pmemfs trace --io --follow` does
        with DirectFile(mount.pmem0) as direct:
            direct.pwrite(os.urandom(length), 64 << 20)
            direct.pread(length, 64 << 20)
        lines = pmemfs("trace", mount.mountpoint).stdout.splitlines()
    my_pid = os.getpid()
    pfn, npages = (64 << 20) // 4096, length // 4096
    # Each transfer: a pin of its pages by this process, then the unpin of the same pages after it.
    for verb in ("pin", "unpin"):
        assert any(re.search(rf" {verb} pid {my_pid} pmem0 pfn {pfn}\+{npages}$", line) for line in lines), verb
    pins = [i for i, line in enumerate(lines) if re.search(rf" pin pid {my_pid} pmem0 pfn {pfn}\+{npages}$", line)]
    unpins = [i for i, line in enumerate(lines) if re.search(rf" unpin pid {my_pid} pmem0 pfn {pfn}\+{npages}$", line)]
    assert len(pins) == len(unpins) == 2 and all(p < u for p, u in zip(pins, unpins, strict=False))
    assert_balanced(mount)


def test_io_transfers_are_traced_only_while_asked(mount: Mount) -> None:
    probes = iter(range(1000, 2000))

    def io_traced() -> bool:
        """Read a page never read before and say whether the trace shows it."""
        pfn = next(probes)
        with DirectFile(mount.pmem0) as direct:
            direct.pread(4096, pfn * 4096)
        return f" pin pid {os.getpid()} pmem0 pfn {pfn}+1" in pmemfs("trace", mount.mountpoint).stdout

    assert not io_traced()
    with subprocess.Popen(
        PMEMFS + ["trace", mount.mountpoint, "--io", "--follow"], stdout=subprocess.PIPE, text=True
    ) as follower:
        try:
            wait_for(io_traced, what="I/O tracing to start")
            assert follower.stdout is not None
            while f" pin pid {os.getpid()} pmem0" not in follower.stdout.readline():
                pass
        finally:
            follower.terminate()  # SIGINT may be ignored when the suite runs in the background
            follower.communicate(timeout=10)
    wait_for(lambda: not io_traced(), what="I/O tracing to stop with its session")


def test_buffered_io_takes_get_page_references(mount: Mount) -> None:
    with open(mount.pmem0, "r+b", buffering=0) as f:
        f.write(b"b" * 8192)
        f.seek(0)
        assert f.read(8192) == b"b" * 8192
    stats = assert_balanced(mount)
    assert stats["nr_get_page"] > 0


@contextlib.contextmanager
def pin_holder(mount: Mount, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A `pmemfs pin` child holding a pin until the test ends it (or the context does)."""
    with subprocess.Popen(
        PMEMFS + ["pin", mount.mountpoint, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None and child.stderr is not None
            line = child.stdout.readline()
            assert line.startswith("pinned"), line + child.stderr.read()
            yield child
        finally:
            child.kill()
            child.communicate()


def test_longterm_pin_on_dax0_is_held_by_the_child_and_dropped_when_it_dies(mount: Mount) -> None:
    with pin_holder(mount, "--file", "dax0", "--offset", "1M", "--length", "2M", "--longterm") as child:
        status = mount.status()
        assert status["registry"]["pinned_pages"] == 512
        pages = mount_pages(mount)
        assert [(h["pid"], h["kind"], h["file"], h["offset"], h["length"]) for h in pages["holders"]] == [
            (child.pid, "longterm", "dax0", 1 << 20, 2 << 20)
        ]
        assert f"pid {child.pid} holds a longterm reference on dax0" in pmemfs("pages", mount.mountpoint).stdout
    wait_for(lambda: registry(mount)["pinned_pages"] == 0, what="the dead client's pins to go")
    assert "client died" in pmemfs("trace", mount.mountpoint).stdout
    assert_balanced(mount)


def mount_pages(mount: Mount) -> dict:
    import json

    return json.loads(pmemfs("pages", mount.mountpoint, "--json").stdout)


def test_longterm_pin_on_pmem0_is_eopnotsupp(mount: Mount) -> None:
    result = pmemfs(
        "pin", mount.mountpoint, "--file", "pmem0", "--offset", "0", "--length", "4096", "--longterm", check=False
    )
    assert result.returncode == 1 and "fsdax" in result.stderr
    with PinSession(mount.mountpoint) as session:
        with pytest.raises(Exception) as err:
            session.pin("pmem0", 0, 4096, longterm=True)
        assert err.value.errno == errno.EOPNOTSUPP  # type: ignore[attr-defined]
        session.pin("pmem0", 0, 4096)  # a short-term pin works on fsdax
        session.pin("dax0", 0, 4096)
        assert registry(mount)["pinned_pages"] == 1
    assert_balanced(mount)


@pytest.mark.parametrize("offset, length", [(-4096, 4096), (0, 0), (0, 1 << 40)])
def test_pins_outside_the_data_area_are_einval(mount: Mount, offset: int, length: int) -> None:
    with PinSession(mount.mountpoint) as session:
        with pytest.raises(Exception) as err:
            session.pin("dax0", offset, length)
        assert err.value.errno == errno.EINVAL  # type: ignore[attr-defined]


def test_pin_holds_while_its_command_runs(mount: Mount) -> None:
    result = pmemfs(
        "pin", mount.mountpoint, "--file", "dax0", "--offset", "0", "--length", "64K", "--",
        sys.executable, "-m", "pmemfs", "status", mount.mountpoint, "--json",
    )  # fmt: skip
    assert '"pinned_pages": 16' in result.stdout
    assert_balanced(mount)


def test_umount_waits_for_pins_then_names_the_holder_and_keeps_serving(mount: Mount) -> None:
    data = os.urandom(1 << 20)
    with DirectFile(mount.pmem0) as direct:
        direct.pwrite(data, 0)
    with pin_holder(mount, "--file", "dax0", "--offset", "0", "--length", "1M", "--longterm") as child:
        result = pmemfs("umount", mount.mountpoint, "--timeout", "2", check=False)
        assert result.returncode == 1
        assert f"pid {child.pid} holds a longterm reference on dax0 offset 0 length 1048576" in result.stderr
        assert registry(mount)["device_alive"]
        with DirectFile(mount.pmem0) as direct:
            assert direct.pread(1 << 20, 0) == data
        child.terminate()
        assert child.wait(timeout=10) == 0
    wait_for(lambda: registry(mount)["pinned_pages"] == 0, what="the pin to go")
    pid = mount.pid
    pmemfs("umount", mount.mountpoint, "--timeout", "5")
    assert not process_alive(pid)


def test_new_pins_fail_with_enxio_while_the_device_is_torn_down(mount: Mount) -> None:
    with (
        pin_holder(mount, "--file", "dax0", "--offset", "0", "--length", "4K", "--longterm"),
        subprocess.Popen(PMEMFS + ["umount", mount.mountpoint, "--timeout", "4"], stderr=subprocess.PIPE) as unmounter,
    ):
        wait_for(lambda: not registry(mount)["device_alive"], what="the device reference to be killed")
        with PinSession(mount.mountpoint) as session:
            with pytest.raises(Exception) as err:
                session.pin("dax0", 8192, 4096)
            assert err.value.errno == errno.ENXIO  # type: ignore[attr-defined]
        # No data file was open when the teardown began (else it would have been refused at once);
        # from then on opening one fails, as opening a disk being removed does.
        with pytest.raises(OSError) as io_err:
            DirectFile(mount.pmem0)
        assert io_err.value.errno == errno.ENXIO
        assert unmounter.wait(timeout=30) == 1
    assert registry(mount)["device_alive"] and registry(mount)["nr_refused"] >= 2


def test_concurrent_pinners_and_fio_keep_counts_consistent(mount: Mount) -> None:
    stop = threading.Event()
    failures: list[BaseException] = []

    def pinner(seed: int) -> None:
        try:
            with PinSession(mount.mountpoint) as session:
                n = 0
                while not stop.is_set():
                    offset = ((seed * 7 + n) % 32) * 65536
                    pin = session.pin("dax0" if n % 2 else "pmem0", offset, 256 << 10)
                    session.unpin(int(pin["id"]))  # type: ignore[call-overload]
                    n += 1
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)

    threads = [threading.Thread(target=pinner, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        fio = subprocess.run(
            ["fio", "--name=c", f"--filename={mount.pmem0}", "--rw=randrw", "--bs=4k", "--ioengine=libaio",
             "--iodepth=8", "--direct=1", "--size=2M", "--runtime=3", "--time_based", "--numjobs=2",
             "--output=/dev/null"],
            timeout=120,
        )  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert fio.returncode == 0 and not failures, failures
    assert_balanced(mount)


def test_stale_pins_of_a_killed_daemon_are_reported_and_reset(image: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mountpoint = str(tmp_path / "mnt")
    with mounted(image, mountpoint) as mount:
        with pin_holder(mount, "--file", "dax0", "--offset", "0", "--length", "40K", "--longterm"):
            pid = mount.pid
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not process_alive(pid), what="the daemon to die")
        pmemfs("umount", mountpoint)
    with mounted(image, mountpoint) as mount:
        status = mount.status()
        assert status["stale_references"] == {
            "pages": 10,
            "ranges": [{"pfn": 0, "npages": 10, "refcount": 1024, "pins": 1}],
        }
        assert "stale references reset at mount: 10 page(s)" in pmemfs("status", mountpoint).stdout
        assert_balanced(mount)


def test_opens_held_back_by_an_unmount_fail_fast_and_an_open_file_makes_it_back_off(mount: Mount) -> None:
    """An unmount holds opens of pmem0/dax0 back before it kills the device reference, so that no data
    file can be open when it does: with one open, holding is refused (EBUSY) and nothing changes;
    while opens are held, an open fails at once with ENXIO, as a disk being removed does, and works
    again once they are let go."""
    with DirectFile(mount.pmem0) as direct, PinSession(mount.mountpoint) as unmounter:
        with pytest.raises(PmemfsError) as busy:
            unmounter.hold_opens()
        assert busy.value.errno == errno.EBUSY
        direct.pread(4096, 0)
    wait_for(lambda: mount.status()["open_files"] == 0, what="the release of pmem0")
    with PinSession(mount.mountpoint) as unmounter:
        unmounter.hold_opens()
        started = time.monotonic()
        with pytest.raises(OSError) as refused:
            DirectFile(mount.pmem0)
        assert refused.value.errno == errno.ENXIO and time.monotonic() - started < 1
        unmounter.release_opens()
        with DirectFile(mount.pmem0) as direct:
            assert len(direct.pread(4096, 0)) == 4096
