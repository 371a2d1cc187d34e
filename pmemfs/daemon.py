"""Composition root of the daemon: open the region, build the tree, mount, serve, unmount clean.

Run as ``python -m pmemfs.daemon IMAGE MOUNTPOINT`` by ``pmemfs mount``; the CLI's
``--foreground`` calls :func:`run` in-process.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import pyfuse3
import trio

from .control import ControlFile, daemon_identity, loop_devices_for, render_json
from .errors import PmemfsError
from .fs import PMEM0_NAME, PmemOperations
from .region import Region

log = logging.getLogger("pmemfs")

FUSE_OPTIONS = ("fsname=pmemfs", "subtype=pmemfs", "default_permissions")


def _status_file(region: Region, ops_ref: list[PmemOperations], mountpoint: str, log_path: str | None) -> ControlFile:
    pmem0_path = os.path.join(mountpoint, PMEM0_NAME.decode())

    def render() -> bytes:
        blockdevs = loop_devices_for(pmem0_path)
        return render_json(
            {
                **daemon_identity(mountpoint),
                "image": region.path,
                "log": log_path,
                **region.geometry.as_dict(),
                **region.header.as_dict(),
                "previous_shutdown": "clean" if region.previous_shutdown_clean else "unclean",
                "blockdev": blockdevs[0] if blockdevs else None,
                "allocated_bytes": region.allocated_bytes(),
                "counters": ops_ref[0].statistics(),
            }
        )

    return ControlFile("status", render)


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        # Handlers never await, so one worker task serves every request with no lock hand-off.
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("got %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def run(image: str, mountpoint: str, *, ready_fd: int | None = None, log_path: str | None = None) -> int:
    """Serve IMAGE at MOUNTPOINT until unmounted; return the process exit code.

    Errors before the mount is up go to ``ready_fd`` as one line (for the CLI that started us);
    the fd is closed once the kernel has the mount, which is the CLI's cue to poll it.
    """
    mountpoint = os.path.abspath(mountpoint)
    try:
        region = Region.open(image)
    except PmemfsError as err:
        return _fail_start(ready_fd, str(err))
    except Exception as err:
        log.exception("cannot open %s", image)
        return _fail_start(ready_fd, f"cannot open {image}: {err!r}")
    # Do not mark the image clean on the way out unless this daemon really marked it dirty.
    mounted = False
    try:
        region.mark_dirty()
        if not region.previous_shutdown_clean:
            log.warning("%s was not shut down cleanly (unclean shutdowns: %d)", image, region.header.unclean_shutdowns)
        ops_ref: list[PmemOperations] = []
        ops = PmemOperations(region, [_status_file(region, ops_ref, mountpoint, log_path)])
        ops_ref.append(ops)
        try:
            pyfuse3.init(ops, mountpoint, set(FUSE_OPTIONS))
        except RuntimeError as err:
            return _fail_start(ready_fd, f"cannot mount {image} at {mountpoint}: {err}")
        mounted = True
        _close_ready(ready_fd)
        log.info("serving %s at %s (pid %d)", image, mountpoint, os.getpid())
        try:
            trio.run(_serve)
        finally:
            pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)
        return 0
    finally:
        region.close(clean=mounted)


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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    return run(args.image, args.mountpoint, ready_fd=args.ready_fd, log_path=args.log)


if __name__ == "__main__":
    sys.exit(main())
