"""The pytest plugin (entry point ``pytest11``): a fresh pmem region per test, pin checks, and
failure reports that show what the device saw.

    def test_direct_io(pmem):                       # a 256M fsdax region on tmp_path, unmounted after
        fd = os.open(pmem.pmem0, os.O_RDWR | os.O_DIRECT)
        ...
        pmem.assert_balanced()

    @pytest.mark.pmem(size="64M", mode="devdax")    # any keyword of pmemfs.open_region
    def test_small(pmem): ...

    def test_two(pmem_factory):                     # open_region's keywords; all unmounted after
        a, b = pmem_factory(size="64M"), pmem_factory(map="mem")

Kept light (no numpy, pyfuse3 or trio): every pytest session of a user who installed pmemfs loads it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from . import client, owners
from .api import MountedRegion, open_region
from .errors import PmemfsError

FUSE_DEVICE = "/dev/fuse"
# The marker and the factory take open_region's keywords but where the region goes: the fixtures choose.
OPTIONS = [name for name in inspect.signature(open_region).parameters if name not in ("directory", "mountpoint")]
# A test's region is torn down in seconds, not in open_region's 30: a pin still held after the
# test is a leak, not a transfer about to finish. Its trace records every transfer, for the report.
DEFAULTS: dict[str, object] = {"unmount_timeout_s": 5.0, "trace_io": True}
LOG_LINES = 40
TRACE_EVENTS = 40

# The regions each test used, and what they showed just before they were unmounted, for its report.
REGIONS = pytest.StashKey[list["UsedRegion"]]()
SWEPT = pytest.StashKey[list[str]]()
# The fixtures' regions not yet unmounted: only an interrupted teardown leaves one here at the end.
OPEN = pytest.StashKey[set[MountedRegion]]()


class UsedRegion:
    """A region one test mounted, with the report sections it had when it was unmounted."""

    def __init__(self, region: MountedRegion) -> None:
        self.region = region
        self.final: list[tuple[str, str]] | None = None

    def sections(self) -> list[tuple[str, str]]:
        """Report sections: the daemon's log tail, the referenced pages, the last trace events."""
        region = self.region
        sections = [(f"pmem {region.mountpoint}: daemon log (last {LOG_LINES} lines)", _tail(region.log, LOG_LINES))]
        if self.final is not None:
            return sections + self.final
        return sections + self.device_sections()

    def device_sections(self) -> list[tuple[str, str]]:
        region = self.region
        if not region.mounted:
            gone = "(not mounted: the test killed the daemon and did not remount)"
            return [(f"pmem {region.mountpoint}: pages", gone)]
        try:
            registry = region.status()["registry"]
            pages = client.format_pages(region.pages())
            trace = region.trace()[-TRACE_EVENTS:]
        except PmemfsError as err:
            return [(f"pmem {region.mountpoint}: pages", f"(cannot read them: {err})")]
        counters = ", ".join(f"{name} {registry[name]}" for name in sorted(registry) if name.startswith("nr_"))
        return [
            (f"pmem {region.mountpoint}: pages", "\n".join([counters, *pages])),
            (f"pmem {region.mountpoint}: trace (last {TRACE_EVENTS} events)", "\n".join(trace) or "(no events)"),
        ]


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as err:
        return f"(cannot read {path}: {err.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class FixtureRegions:
    """The regions one fixture mounted for one test, in its tmp_path; unmounted at its teardown."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: os.PathLike[str], prefix: str) -> None:
        self.item = request.node
        self.open_regions = request.config.stash.setdefault(OPEN, set())
        self.tmp_path = tmp_path
        self.prefix = prefix
        self.opened: list[UsedRegion] = []
        self.managers: list[contextlib.AbstractContextManager[MountedRegion]] = []

    def open(self, what: str, options: dict[str, object]) -> MountedRegion:
        if not os.path.exists(FUSE_DEVICE):
            pytest.skip(f"pmemfs needs {FUSE_DEVICE} (FUSE), which this machine does not have")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            pytest.fail(f"{what}: unknown option(s) {', '.join(unknown)}; it takes {', '.join(OPTIONS)}", pytrace=False)
        name = self.prefix if not self.opened else f"{self.prefix}-{len(self.opened) + 1}"
        manager = open_region(directory=os.path.join(self.tmp_path, name), **{**DEFAULTS, **options})  # type: ignore[arg-type]
        failure: str | None = None
        try:
            region = manager.__enter__()
        except PmemfsError as err:
            failure = str(err)
        if failure is not None:  # outside the except: the report shows this line, not a chain of two
            # Only a machine without FUSE is a reason to skip: anything else is a failure to see.
            pytest.fail(f"{what}: cannot mount a pmem region: {failure}", pytrace=False)
        used = UsedRegion(region)
        self.managers.append(manager)
        self.opened.append(used)
        self.item.stash.setdefault(REGIONS, []).append(used)
        self.open_regions.add(region)
        return region

    def close(self) -> None:
        for used in self.opened:
            if used.region.mounted:
                used.final = used.device_sections()
        errors = []
        for manager in reversed(self.managers):
            try:
                manager.__exit__(None, None, None)
            except PmemfsError as err:  # and the next region is unmounted all the same
                errors.append(str(err))
        self.open_regions.difference_update(used.region for used in self.opened)
        if errors:
            pytest.fail("\n".join(errors), pytrace=False)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pmemfs", "pmemfs regions (the pmem and pmem_factory fixtures)")
    group.addoption(
        "--pmem-check-pins",
        action="store_true",
        default=None,
        help="fail a test that used a pmem region unless, when it ends, no page is referenced and every pin "
        "acquired was released (pmem.assert_balanced())",
    )
    parser.addini("pmem_check_pins", type="bool", default=False, help="as --pmem-check-pins")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pmem(size='256M', mode='fsdax', map='dev', workers=None, ...): how the pmem fixture makes its region "
        "(the keywords of pmemfs.open_region)",
    )


@pytest.fixture(scope="session")
def _pmem_sweep(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Take down regions left mounted by a run that was killed (their owner is gone) before the
    first test mounts one, and at the end any whose teardown was interrupted: nothing outlives a run."""
    basetemp = str(tmp_path_factory.getbasetemp())
    request.config.stash[SWEPT] = owners.sweep(os.path.dirname(basetemp))
    yield
    for region in request.config.stash.get(OPEN, set()):
        region.close(raise_errors=False)


@pytest.fixture
def pmem(request: pytest.FixtureRequest, tmp_path: os.PathLike[str], _pmem_sweep: None) -> Iterator[MountedRegion]:
    """A fresh pmem region for this test, in its tmp_path, as ``pmemfs.open_region`` gives it;
    ``@pytest.mark.pmem(...)`` says how to make it. Unmounted after the test, whatever happened."""
    marker = request.node.get_closest_marker("pmem")
    if marker is not None and marker.args:
        pytest.fail("@pytest.mark.pmem takes keywords only, e.g. @pytest.mark.pmem(size='64M')", pytrace=False)
    regions = FixtureRegions(request, tmp_path, "pmem")
    region = regions.open("@pytest.mark.pmem", dict(marker.kwargs) if marker else {})
    try:
        yield region
    finally:
        regions.close()


@pytest.fixture
def pmem_factory(
    request: pytest.FixtureRequest, tmp_path: os.PathLike[str], _pmem_sweep: None
) -> Iterator[Callable[..., MountedRegion]]:
    """``pmem_factory(**options)`` mounts another region (``pmemfs.open_region``'s keywords) in this
    test's tmp_path and returns it; every one is unmounted after the test."""
    regions = FixtureRegions(request, tmp_path, "pmem-factory")
    try:
        yield lambda **options: regions.open("pmem_factory", options)
    finally:
        regions.close()


@pytest.hookimpl(trylast=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # After the test body (trylast: after pytest's own runner ran it), and only if it passed.
    config = item.config
    if not (config.getoption("pmem_check_pins") or config.getini("pmem_check_pins")):
        return
    for used in item.stash.get(REGIONS, []):
        if used.region.mounted:
            try:
                used.region.assert_balanced()
            except AssertionError as err:
                pytest.fail(f"--pmem-check-pins: {err}", pytrace=False)


# An old-style wrapper: pluggy has new-style ones only since 1.1, and a plugin that every pytest
# run of a pmemfs user loads must not stop an older pytest from starting.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for used in item.stash.get(REGIONS, []):
            report.sections.extend(used.sections())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    swept = config.stash.get(SWEPT, [])
    if swept:
        terminalreporter.write_line(
            f"pmemfs: took down {len(swept)} region(s) an interrupted run had left mounted: {', '.join(swept)}"
        )
