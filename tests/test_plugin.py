"""The pytest plugin as a user meets it: pytester writes a user's test file, runs it (in this process
where it can), and the outcomes, the report sections and what is left mounted are checked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import wait_for

# Loaded before pytester's in-process runs, which unload what they load: numpy cannot load twice.
import pmemfs.aio  # noqa: F401
import pmemfs.pytest_plugin as plugin
import pmemfs.region  # noqa: F401
from pmemfs import client

pytest_plugins = ["pytester"]

# The entry point loads the plugin into every pytest run; naming it too is harmless (the entry point
# has its name) and lets these tests run from a checkout used before `pip install -e .`.
BASE = ["-p", "no:cacheprovider", "--strict-markers", "-p", "pmemfs.pytest_plugin"]

USER_TESTS = """
import mmap, os
import pytest
import pmemfs


def direct_write(path, offset, data):
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)


def test_pmem_is_a_fresh_region_on_tmp_path(pmem, tmp_path):
    assert pmem.mountpoint.startswith(str(tmp_path)) and pmem.status()["mounts"] == 1
    direct_write(pmem.pmem0, 0, b"x" * 4096)
    pmem.assert_balanced()


@pytest.mark.pmem(size="64M", mode="devdax", map="mem", workers=1)
def test_the_marker_configures_it(pmem):
    status = pmem.status()
    assert (status["raw_size"], status["mode"], status["map"]) == (64 << 20, "devdax", "mem")
    assert status["serving"]["workers"] == 1


def test_the_factory_takes_open_regions_keywords(pmem_factory):
    small, other = pmem_factory(size="32M", workers=1), pmem_factory(size="48M", workers=1)
    assert small.status()["raw_size"] == 32 << 20 and other.status()["raw_size"] == 48 << 20
    assert small.mountpoint != other.mountpoint


@pytest.mark.trio
async def test_an_async_test_takes_pmem(pmem):
    region = pmemfs.AsyncMountedRegion(pmem)
    async with region.pin("dax0", 0, 4096, longterm=True):
        assert (await region.status())["registry"]["pinned_pages"] == 1
    await region.assert_balanced()


def test_a_failure_shows_what_the_device_saw(pmem, leaked):
    direct_write(pmem.pmem0, 65536, b"y" * 4096)
    pin = pmem.pin("dax0", 0, 8192, longterm=True)
    pin.__enter__()
    leaked.append(pin)
    assert os.path.getsize(pmem.pmem0) == 0


@pytest.mark.pmem(size="1M")
def test_a_region_that_cannot_be_made_is_an_error(pmem):
    pass


@pytest.mark.pmem(sise="64M")
def test_a_misspelt_option_is_an_error(pmem):
    pass
"""


@pytest.fixture
def nothing_left_mounted(pytester: pytest.Pytester) -> Iterator[None]:
    """Whatever the user's run did, the mounts under its directory are gone afterwards, and this
    test fails if the plugin left one; a leftover is taken down here so that it cannot outlive us."""
    yield
    left = client.fuse_mounts_under(str(pytester.path))
    for mountpoint in left:
        image = os.path.join(os.path.dirname(mountpoint), "pmem.img")
        client.kill_daemon(image, mountpoint)
        client.cleanup_dead_mount(mountpoint)
    assert not left, f"left mounted: {left}"


def readme_test() -> str:
    """The ten-line test the README's "Use it in your tests" starts with."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Use it in your tests") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("```\n\n- ")]


def test_the_entry_point_is_the_plugin() -> None:
    # What `pip install` registers, so that a user's pytest loads the plugin with no configuration.
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        entry_points = tomllib.load(f)["project"]["entry-points"]["pytest11"]
    assert entry_points == {"pmemfs.pytest_plugin": "pmemfs.pytest_plugin"}
    assert all(hasattr(plugin, name) for name in ("pmem", "pmem_factory", "pytest_addoption", "pytest_configure"))


@pytest.mark.usefixtures("nothing_left_mounted")
def test_fixtures_marker_trio_and_failure_reports(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS, test_readme=readme_test())
    result = pytester.runpytest(*BASE, "-rs")
    result.assert_outcomes(passed=5, failed=1, errors=2)
    report = result.stdout.str()
    # pytest prints the errors, then the failures, then the summary.
    error = report[report.index("_ ERROR at setup of test_a_region") : report.index("= FAILURES =")]
    failure = report[report.index("_ test_a_failure_shows_what_the_device_saw _") : report.index("1 failed, 5 passed")]
    for section in [r"pmem \S+/mnt: daemon log \(last 40 lines\)", r"pmem \S+/mnt: pages", r"pmem \S+/mnt: trace"]:
        assert re.search(f"^-+ {section}", failure, re.MULTILINE), section
    assert "INFO pmemfs: serving" in failure  # the log's tail
    assert "nr_foll_pin_acquired 3, nr_foll_pin_released 1" in failure  # a pin counts its pages
    assert "holds a longterm reference on dax0 offset 0 length 8192" in failure
    assert re.search(r"unpin pid \d+ pmem0 pfn 16\+1\n", failure)  # the transfer, traced for the report
    assert "pin pid" in failure and "dax0 pfn 0+2 session pin" in failure
    result.stdout.fnmatch_lines(
        ["*ERROR at setup of test_a_region_that_cannot_be_made_is_an_error*"]
        + ["*@pytest.mark.pmem: cannot mount a pmem region: image size 1048576 is under the minimum*"]
        + ["*ERROR at setup of test_a_misspelt_option_is_an_error*"]
        + ["@pytest.mark.pmem: unknown option(s) sise; it takes image, size, mode, map, workers, align, *"]
    )
    assert "pmem /" not in error  # no region, no device sections


# A pin a test leaves held, released by the user's own fixture (which runs before the region's teardown).
CONFTEST = """
import pytest


@pytest.fixture
def leaked(pmem):
    pins = []
    yield pins
    for pin in pins:
        pin.__exit__(None, None, None)
"""

CHECKED_TESTS = """
import os
import pytest


def test_a_test_that_leaves_a_pin_fails(pmem, leaked):
    pin = pmem.pin("dax0", 4096, 4096, longterm=True)
    pin.__enter__()
    leaked.append(pin)


def test_a_balanced_test_passes(pmem):
    fd = os.open(pmem.pmem0, os.O_RDONLY)
    os.close(fd)


OPEN = []


def test_a_file_left_open_is_an_error_at_teardown(pmem):
    OPEN.append(os.open(pmem.pmem0, os.O_RDONLY))  # no pin (no transfer), but umount refuses


@pytest.fixture
def no_fuse(monkeypatch):
    import pmemfs.pytest_plugin

    monkeypatch.setattr(pmemfs.pytest_plugin, "FUSE_DEVICE", "/nonexistent/fuse")


def test_without_fuse_it_skips(no_fuse, pmem):
    raise AssertionError("never runs")
"""


@pytest.mark.usefixtures("nothing_left_mounted")
def test_check_pins_option_and_the_skip_without_fuse(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_checked=CHECKED_TESTS)
    result = pytester.runpytest(*BASE, "-rs", "--pmem-check-pins")
    result.assert_outcomes(passed=2, failed=1, skipped=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*--pmem-check-pins: pages of */mnt are still referenced:",
            "pages 1-1 (offset 4096, 4096 bytes): refcount 1024, 1 pin(s)",
            "    pid * holds a longterm reference on dax0 offset 4096 length 4096 (pages 1-1) for *",
        ]
    )
    result.stdout.fnmatch_lines(["SKIPPED * pmemfs needs /nonexistent/fuse (FUSE), which this machine does not have"])
    # The region is unmounted all the same (nothing_left_mounted), and the error says why it was not clean.
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_a_file_left_open_is_an_error_at_teardown*",
            "*/mnt is busy: pid * has pmem0 open. *",
            "(pmemfs could not unmount */mnt cleanly, so it killed the daemon; the image counts an unclean shutdown)",
            "- pmem */mnt: daemon log (last 40 lines) -",
        ]
    )


@pytest.mark.usefixtures("nothing_left_mounted")
def test_an_interrupted_run_unmounts_and_a_killed_one_is_swept_by_the_next(pytester: pytest.Pytester) -> None:
    # Ctrl-C: pytest tears the fixtures down on its way out.
    pytester.makepyfile(test_interrupted="def test_interrupted(pmem):\n    raise KeyboardInterrupt\n")
    result = pytester.runpytest_inprocess(*BASE, "test_interrupted.py", no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert not client.fuse_mounts_under(str(pytester.path))

    # Ctrl-C in the middle of the region's own unmount: the end of the session takes it down.
    pytester.makepyfile(
        test_interrupted_teardown="""
from pmemfs import client

def test_interrupted_teardown(pmem):
    unmount = client.unmount

    def ctrl_c(*args, **kwargs):
        client.unmount = unmount  # once
        raise KeyboardInterrupt

    client.unmount = ctrl_c
"""
    )
    result = pytester.runpytest_inprocess(*BASE, "test_interrupted_teardown.py", no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert not client.fuse_mounts_under(str(pytester.path))

    # SIGKILL: nothing runs, the daemon (in a session of its own) serves on; the next run takes it down.
    ready = pytester.path / "mounted"
    pytester.makepyfile(
        # It holds its region until the SIGKILL below.
        test_killed=(
            f"import signal\ndef test_killed(pmem):\n    open({str(ready)!r}, 'w').close()\n    signal.pause()\n"
        ),
    )
    killed = subprocess.Popen(
        [sys.executable, "-m", "pytest", *BASE, "--basetemp", str(pytester.path / "killed"), "test_killed.py"],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(ready.exists, timeout_s=60, what="the killed run to mount its region")
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    orphans = client.fuse_mounts_under(str(pytester.path / "killed"))
    assert len(orphans) == 1
    pytester.makepyfile(test_next="def test_next(pmem):\n    pass\n")
    result = pytester.runpytest(*BASE, "test_next.py")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"pmemfs: took down 1 region(s) an interrupted run had left mounted: {orphans[0]}"])
    image = os.path.join(os.path.dirname(orphans[0]), "pmem.img")
    assert not client.daemon_processes(image, orphans[0])
