"""Composition root of the daemon: open the image, build the registry, control files and tree, mount,
serve, unmount clean.

Run as ``python -P -m pmemfs.daemon IMAGE MOUNTPOINT`` by ``pmemfs mount``; the CLI's
``--foreground`` calls :func:`run` in-process.

Everything is built once, in order, on one exit stack that unwinds it on any failure: how to
serve (decided before anything else, so ``status`` shows what runs), the region (with the state
its serving processes will share, shared.py), the registry, the badblocks table, the write log
when one is asked (logwrites.py; a mount that fails removes it), the pin sessions, the control
files, the tree, the kernel's mount. Until the kernel has the mount, nothing is written to the
image, so a mount that fails leaves it byte for byte as it was. Only then is it marked dirty (and
the mount counted), and only then are the registry records of a daemon that died reset. On the
way out: unmount, end the write log, reset the records (no file is open, so no reference is
left), mark the image clean if this daemon marked it dirty.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable

import pyfuse3

from . import faults, membarrier, serving
from .badblocks import BadBlocks
from .control import control_files
from .errors import PmemfsError
from .fs import PmemOperations
from .infoblock import SECTOR_SIZE
from .logwrites import WriteLog
from .memmap import open_registry, reset_records
from .pages import PageRegistry
from .region import Region
from .sessions import PinSessions
from .writelog import DEFAULT_MAX_BYTES

log = logging.getLogger("pmemfs")

FUSE_OPTIONS = ("fsname=pmemfs", "subtype=pmemfs", "default_permissions")
EPOCH_MASK = 0xFFFFFFFF
# While a start takes long (the registry scan after a crash of a daemon on a huge image), tell the
# CLI this often that it is moving, so that it waits instead of giving up on it.
PROGRESS_EVERY_S = 1.0


class _Lifecycle:
    """How far the mount got, for what the exit stack undoes: mark clean only if this daemon marked
    the image dirty, reset the records only after a clean end of serving."""

    marked_dirty = False
    served = False


def run(
    image: str,
    mountpoint: str,
    *,
    ready_fd: int | None = None,
    log_path: str | None = None,
    track_references: bool = True,
    serving_mode: str = "fast",
    workers: int = 1,
    spin_us: int = serving.DEFAULT_SPIN_US,
    log_writes: str | None = None,
    log_writes_max: int = DEFAULT_MAX_BYTES,
) -> int:
    """Serve IMAGE at MOUNTPOINT until unmounted; return the process exit code.

    Errors before the mount is up go to ``ready_fd`` as one line (for the CLI that started us);
    the fd is closed once the kernel has the mount, which is the CLI's cue to poll it.
    """
    mountpoint = os.path.abspath(mountpoint)
    plan = serving.plan(serving_mode, workers, spin_us)
    progress = _progress_reporter(ready_fd)
    state = _Lifecycle()
    with contextlib.ExitStack() as stack:
        try:
            region = Region.open(image)
        except PmemfsError as err:
            return _fail_start(ready_fd, str(err))
        except Exception as err:
            log.exception("cannot open %s", image)
            return _fail_start(
                ready_fd, f"cannot open {image}: {type(err).__name__}: {err} (a bug in pmemfs; see the log)"
            )
        stack.callback(lambda: region.close(clean=state.marked_dirty))
        # The epoch stamps this mount's records: the mount count that mark_dirty will write.
        previous_epoch = region.header.mount_count & EPOCH_MASK
        epoch = region.header.mounted(0).mount_count & EPOCH_MASK
        registry, stale = open_registry(region, previous_epoch, epoch, region.shared, progress)
        stack.callback(_reset_records_if_served, region, state)
        badblocks = BadBlocks(region.data_size // SECTOR_SIZE, region.badblock_store(), region.shared)
        write_log = None
        if log_writes is not None:
            try:
                write_log = WriteLog.create(log_writes, region, region.shared, log_writes_max)
            except PmemfsError as err:
                return _fail_start(ready_fd, str(err))
            stack.callback(_close_write_log, write_log, state)
        sessions = PinSessions(registry, region, badblocks, write_log)
        ops = PmemOperations(
            region, registry, badblocks, sessions,
            control_files(
                region=region, registry=registry, badblocks=badblocks, mountpoint=mountpoint, log_path=log_path,
                stale=stale, write_log=write_log,
                serving=lambda: {**plan.as_dict(), "pid": os.getpid(), "lane": serving.lane_counts()},
            ),
            track_references=track_references, write_log=write_log,
        )  # fmt: skip
        if faults.install({"region": region, "registry": registry, "badblocks": badblocks, "sessions": sessions}):
            ops.datapath.general_only = True  # the faults are in the Python the compiled common case skips
        try:
            pyfuse3.init(ops, mountpoint, set(FUSE_OPTIONS))
        except RuntimeError as err:
            return _fail_start(ready_fd, f"cannot mount {image} at {mountpoint}: {err}")
        stack.callback(pyfuse3.close, unmount=True)
        try:
            _commit_mount(region, progress)
        except Exception as err:
            log.exception("cannot start serving %s", image)
            stack.close()  # unmounted and the header restored before the CLI hears of it
            return _fail_start(ready_fd, f"cannot start serving {image}: {err}")
        state.marked_dirty = True
        if not region.previous_shutdown_clean:
            log.warning("%s was not shut down cleanly (unclean shutdowns: %d)", image, region.header.unclean_shutdowns)
        _close_ready(ready_fd)
        log.info("serving %s at %s (pid %d)", image, mountpoint, os.getpid())
        membarrier.register()
        serving.serve(
            plan,
            _end_transfer_hook(registry),
            serving.LaneHandlers(ops.datapath.read, ops.datapath.write),
            initialized=lambda: ops.initialized,
            become=lambda column: _become_worker(registry, column),
            mountpoint=mountpoint,
        )
        state.served = True
        log.info("served with the %s loop%s", plan.mode, f" ({plan.workers} workers)" if plan.workers > 1 else "")
    log.info("unmounted %s", mountpoint)
    return 0


def _commit_mount(region: Region, progress: Callable[[int, int], None]) -> None:
    """Mark the image in use and reset the registry records a dead daemon left: the first writes
    to the image, once the kernel has the mount. If the reset fails, the header goes back to what
    it said, so a mount that fails counts neither a mount nor an unclean shutdown."""
    before = region.header
    region.mark_dirty()
    try:
        # The carve-out is volatile: whatever the last daemon left there goes, in bulk.
        reset_records(region, progress)
    except BaseException:
        with contextlib.suppress(Exception):
            region.restore_header(before)
        raise


def _reset_records_if_served(region: Region, state: _Lifecycle) -> None:
    if state.served:
        # No file is open any more, so no reference is left: give the carve-out back in one go.
        reset_records(region)


def _close_write_log(write_log: WriteLog, state: _Lifecycle) -> None:
    """End the log as a clean unmount does; a mount that never started takes its empty log away."""
    write_log.close(clean=state.served)
    if not state.marked_dirty:
        with contextlib.suppress(OSError):
            os.unlink(write_log.path)


def _end_transfer_hook(registry: PageRegistry) -> Callable[[], None]:
    """What the serving loop runs before it reads the next request: the last reply is out, so the
    transfer it carried ends (pages.py). The loop must never see an exception (it would end the
    process): a transfer that cannot be ended is logged, once, and forgotten."""
    logged = False
    transfers = registry.transfers

    def end_transfer() -> None:
        nonlocal logged
        while transfers.in_flight:
            try:
                registry.end_transfer()
            except Exception:
                if not logged:
                    logged = True
                    log.exception("ending a transfer's page references failed (logged once)")

    return end_transfer


def _progress_reporter(ready_fd: int | None) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` that tells the CLI, at most every PROGRESS_EVERY_S, that the
    start is moving (a line ``progress <text>`` on the ready pipe)."""
    started = last = time.monotonic()

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if ready_fd is None or now - last < PROGRESS_EVERY_S:
            return
        last = now
        line = f"progress resetting the registry records of the daemon that died: {100 * done // max(total, 1)}%"
        log.info("%s (%.0f s so far)", line.removeprefix("progress "), now - started)
        os.write(ready_fd, line.encode() + b"\n")

    return progress


def _become_worker(registry: PageRegistry, column: int) -> None:
    membarrier.register()  # not inherited across fork
    registry.set_column(column)


def _fail_start(ready_fd: int | None, message: str) -> int:
    log.error("%s", message)
    if ready_fd is not None:
        os.write(ready_fd, message.encode() + b"\n")
        os.close(ready_fd)
    else:
        print(f"pmemfs: {message}", file=sys.stderr)
    return 1


def _close_ready(ready_fd: int | None) -> None:
    if ready_fd is not None:
        os.close(ready_fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pmemfs.daemon")
    parser.add_argument("image")
    parser.add_argument("mountpoint")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--log")
    parser.add_argument("--debug", action="store_true")
    # Internal switch for scripts/bench.py: serve without registry bookkeeping to measure its cost.
    parser.add_argument("--no-references", dest="track_references", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=("fast", "trio"), default="fast")
    parser.add_argument("--workers", type=int, default=serving.default_workers())
    parser.add_argument("--spin-us", type=int, default=serving.DEFAULT_SPIN_US)
    parser.add_argument("--log-writes", help="record every write, flush and mark in this dm-log-writes log")
    parser.add_argument("--log-writes-max", type=int, default=DEFAULT_MAX_BYTES)
    # Where the CLI that started us runs pmemfs from: the daemon must run the same code.
    parser.add_argument("--package-dir")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    here = os.path.dirname(os.path.abspath(__file__))
    if args.package_dir and os.path.realpath(args.package_dir) != os.path.realpath(here):
        return _fail_start(
            args.ready_fd,
            f"the daemon would run pmemfs from {here}, but this pmemfs command runs it from {args.package_dir} "
            "(a pmemfs/ folder in the working directory shadows the installed package?): "
            "run the installed pmemfs command",
        )
    return run(
        args.image,
        args.mountpoint,
        ready_fd=args.ready_fd,
        log_path=args.log,
        track_references=args.track_references,
        serving_mode=args.serve,
        workers=args.workers,
        spin_us=args.spin_us,
        log_writes=args.log_writes,
        log_writes_max=args.log_writes_max,
    )


if __name__ == "__main__":
    sys.exit(main())
