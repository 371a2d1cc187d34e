"""The ``pmemfs`` command: argument parsing, one line per error, exit codes 0 / 1 / 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

from . import client
from .api import daemon_arguments, log_arguments
from .errors import MountError, PmemfsError, UsageError
from .mount import Mount
from .options import DEFAULT_SPIN_US, MAX_SPIN_US, MAX_WORKERS, default_workers
from .sizes import format_size, parse_size
from .writelog import DEFAULT_MAX_BYTES as DEFAULT_LOG_MAX_BYTES
from .writelog import MARK_MAX

# typing.TYPE_CHECKING would load typing (mount.py says why not); type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .replay import EachPoint

# What replay --each says to COMMAND, and its kinds of points (replay.py has the same; kept here so
# that --help loads no numpy).
KINDS = ("flush", "write", "mark")
REPLAY_ENVIRONMENT = (
    "PMEMFS_REPLAY_IMAGE (the image COMMAND checks), PMEMFS_REPLAY_DATAOFF (where its data area starts: 0 "
    "for a copy of pmem0), PMEMFS_REPLAY_SIZE (the data area's size), PMEMFS_REPLAY_POINT, "
    "PMEMFS_REPLAY_ENTRY (the last entry applied), PMEMFS_REPLAY_LOG; with --mount also "
    "PMEMFS_REPLAY_PMEM0 and PMEMFS_REPLAY_MOUNTPOINT"
)

# Commands that read or write images import numpy (through region.py): they do it themselves, so
# that the commands every test and script runs most (status, umount) start in a tenth of the time.


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit 2, like the rest of pmemfs's errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


def cmd_create(args: argparse.Namespace) -> str | None:
    from .region import create_image

    info = create_image(args.image, args.size, mode=args.mode, map=args.map, align=args.align, force=args.force)
    _print_json(info.as_dict())
    return None


def cmd_info(args: argparse.Namespace) -> str | None:
    from .region import read_image_info

    info = read_image_info(args.image)
    data = info.as_dict()
    if args.json:
        _print_json(data)
        return None
    geometry = info.geometry
    lines = [
        f"image:              {info.path}",
        f"uuid:               {data['uuid']}",
        f"mode:               {geometry.mode} (map={geometry.map}, align {format_size(geometry.align)})",
        f"raw size:           {geometry.size} ({format_size(geometry.size)})",
        f"data area:          {geometry.data_size} bytes at offset {geometry.dataoff} ({geometry.npfns} pages)",
        f"end_trunc:          {geometry.end_trunc}",
        f"memmap carve-out:   {geometry.memmap_size} bytes "
        + ("(1/64 of capacity, in the image)" if geometry.map == "dev" else "(none: map=mem keeps it in DRAM)"),
        f"state:              {'clean' if info.header.clean else 'dirty (mounted, or its daemon died)'}",
        f"mounts:             {info.header.mount_count}",
        f"unclean shutdowns:  {info.header.unclean_shutdowns}",
        f"bad blocks:         {data['badblock_count']}"
        + "".join(f"\n  sectors {s}-{s + c - 1}" for s, c in info.header.badblocks),
    ]
    print("\n".join(lines))
    return None


def cmd_check(args: argparse.Namespace) -> str | None:
    from .check import check_image
    from .views.progress import open_progress

    with open_progress("check", quiet=args.quiet) as progress:
        report = check_image(args.image, repair=args.repair, progress=progress)
    for line in report.lines:
        print(line)
    if not report.ok:
        raise PmemfsError(
            f"{args.image}: {report.problems} problem(s) found"
            + ("" if args.repair else "; see above (--repair fixes what is safe)")
        )
    return None


def cmd_mount(args: argparse.Namespace) -> str | None:
    if args.serve == "trio" and args.workers not in (None, 1):
        raise UsageError("--workers needs the fast path: the trio loop serves from one process")
    if args.workers is not None and not 1 <= args.workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 1 and {MAX_WORKERS}")
    if not 0 <= args.spin_us <= MAX_SPIN_US:
        raise UsageError(f"--spin-us must be between 0 and {MAX_SPIN_US}")
    if args.foreground:
        args.workers = args.workers or (default_workers() if args.serve == "fast" else 1)
        if args.loop:
            raise PmemfsError("--loop needs the daemon in the background: drop --foreground")
        import logging

        from . import daemon

        logging.basicConfig(
            level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
        )
        code = daemon.run(
            args.image,
            args.mountpoint,
            log_path=None,
            track_references=args.track_references,
            serving_mode=args.serve,
            workers=args.workers,
            spin_us=args.spin_us,
            log_writes=os.path.abspath(args.log_writes) if args.log_writes else None,
            log_writes_max=args.log_writes_max,
        )
        if code:
            sys.exit(code)
        return None
    daemon_args = daemon_arguments(args.serve, args.workers, args.spin_us)
    daemon_args += () if args.track_references else ("--no-references",)
    daemon_args += log_arguments(args.log_writes, args.log_writes_max)
    from .views.progress import open_progress

    with open_progress("mount", quiet=args.quiet, delay_s=0) as progress:
        started = client.spawn_daemon(
            args.image, args.mountpoint, log_path=args.log, debug=args.debug, daemon_args=daemon_args, progress=progress
        )
    pid = started.pid
    if not args.loop:
        return f"mounted {args.image} at {args.mountpoint} (daemon pid {pid}){_mount_notes(args)}"
    notes = _mount_notes(args)
    if notes:  # stdout is the device's name alone: scripts read it
        print(f"pmemfs: mounted {args.image} at {args.mountpoint}{notes}", file=sys.stderr)
    try:
        device = client.attach_loop(args.mountpoint)
    except PmemfsError:
        client.unmount(args.mountpoint)
        raise
    print(device)
    return None


def _mount_notes(args: argparse.Namespace) -> str:
    """What a user should know of a mount just made: an unclean shutdown before it (the dirty
    shutdown count ndctl shows), and where its writes are logged."""
    notes = ""
    if args.log_writes:
        notes += f"; logging writes to {args.log_writes}"
    with contextlib.suppress(PmemfsError):
        status = client.read_status(args.mountpoint)
        if status["previous_shutdown"] == "unclean":
            notes += f"; it was not shut down cleanly before (unclean shutdowns: {status['unclean_shutdowns']})"
    return notes


def cmd_crash(args: argparse.Namespace) -> str | None:
    mountpoint = os.path.abspath(args.mountpoint)
    if not client.fuse_mount_entry(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    if client.mount_is_dead(mountpoint):
        client.cleanup_after_power_cut(mountpoint)
        return f"cleaned up {mountpoint}: its daemon had died already (the next mount counts an unclean shutdown)"
    status = client.read_status(mountpoint)
    stopped = client.power_cut(status["image"], mountpoint, int(status["pid"]))
    for line in client.cleanup_after_power_cut(mountpoint):
        print(line)
    write_log = status.get("write_log")
    logged = f"; the write log {write_log['path']} ends at the last write that completed" if write_log else ""
    return (
        f"crashed {mountpoint}: serving processes {', '.join(map(str, stopped))} stopped at once; dax0 stores "
        f"never flushed are lost; {status['image']} counts an unclean shutdown at its next mount{logged}"
    )


def cmd_mark(args: argparse.Namespace) -> str | None:
    Mount(args.mountpoint).mark(args.name)
    return f"marked {args.name!r} in the write log of {args.mountpoint}"


def cmd_replay(args: argparse.Namespace) -> str | None:
    from . import replay

    chosen = [name for name in ("to", "entry", "flush", "each") if getattr(args, name) is not None]
    if len(chosen) != 1:
        raise UsageError("replay needs one of --to MARK, --entry N, --flush N or --each KIND")
    if args.each is None and (args.command_args or args.mount or args.copy or args.reorder or args.from_mark):
        raise UsageError("-- COMMAND, --from, --copy, --mount and --reorder go with --each")
    if args.reorder and args.each != "flush":
        raise UsageError("--reorder goes with --each flush: it draws which writes between two flushes landed")
    with replay.opened(args.log, args.image) as (reader, target):
        summary = replay.log_summary(reader)
        if args.each is None:
            last = replay.entry_at(reader, mark=args.to, entry=args.entry, flush=args.flush)
            replay.replay_to(reader, target, last)
            return (
                f"replayed entries 0-{last} of {args.log} (to {reader.entries[last].describe()}; the log has "
                f"{summary}) into {args.image}, a {target.kind}"
            )
        start = replay.find_mark(reader, args.from_mark).index if args.from_mark else 0
        with replay.Checker(args.command_args, target, reader, mount=args.mount, copy=args.copy) as checker:
            each = replay.EachPoint(reader, target, checker, args.each, start, args.reorder, args.seed)
            return _replay_each(args, each, summary)


def _replay_each(args: argparse.Namespace, each: EachPoint, summary: str) -> str:
    print(f"{args.log}: {summary}", flush=True)
    print(
        f"checking {args.image} ({each.target.kind}) at each {args.each} point"
        + (f" from mark {args.from_mark!r} (entry {each.start})" if args.from_mark else "")
        + (", on a scratch copy each time" if args.copy or args.mount else ""),
        flush=True,
    )
    if args.reorder:
        print(f"reorder seed {each.seed} (--seed {each.seed} draws the same crash states)", flush=True)
    failed = each.run()
    if failed is None:
        if not each.checked:
            raise PmemfsError(f"{args.log} has no {args.each} point to check from entry {each.start}")
        return f"COMMAND passed at all {each.checked} points"
    for line in each.describe_failure(failed):
        print(line)
    point = failed.point
    raise PmemfsError(
        f"COMMAND failed at point {point.number} (entry {point.last}, {point.what}; it covers "
        f"{point.covering()}): {args.image} holds the media at that point"
    )


def cmd_umount(args: argparse.Namespace) -> str | None:
    from .views.progress import open_progress

    with open_progress("umount", quiet=args.quiet) as progress:
        return client.unmount(args.mountpoint, timeout_s=args.timeout, progress=progress)


def cmd_status(args: argparse.Namespace) -> str | None:
    status = Mount(args.mountpoint).status()
    if args.json:
        _print_json(status)
        return None
    print(format_status(status))
    return None


def _lane_text(serving: dict) -> str:
    """What the answering process's compiled request loop did, when it has one."""
    lane = serving.get("lane")
    if not lane:
        return ""
    text = f"; pid {serving['pid']}'s lane: {lane['served']} served, {lane['relayed']} relayed"
    lost = lane["lost_replies"] + lane["failed_replies"]
    return text + (f", {lost} replies not delivered" if lost else "")


def format_status(status: dict) -> str:
    """``.pmemfs/status`` as ``pmemfs status`` prints it (scripts/demo.py prints it too)."""
    counters, registry = status["counters"], status["registry"]
    return "\n".join(
        [
            f"{status['mountpoint']}: {status['mode']} map={status['map']} {format_size(status['size'])} "
            f"(image {status['image']}, daemon pid {status['pid']})",
            f"  uuid {status['uuid']}, dataoff {status['dataoff']}, npfns {status['npfns']}, "
            f"align {format_size(status['align'])}",
            f"  blockdev: {status['blockdev'] or '-'}   allocated: {status['allocated_bytes']} bytes   "
            f"badblock_count: {status['badblock_count']}",
            f"  serving: {status['serving']['mode']} loop, {status['serving']['workers']} process(es), "
            f"polls {status['serving'].get('spin_us', 0)} µs after a reply{_lane_text(status['serving'])}",
            f"  mounts {status['mounts']}, unclean shutdowns {status['unclean_shutdowns']}, "
            f"this start after a{'n unclean' if status['previous_shutdown'] == 'unclean' else ' clean'} shutdown",
            "  reads {reads} ({read_bytes} B, {direct_reads} direct), writes {writes} ({write_bytes} B, "
            "{direct_writes} direct), fsyncs {fsyncs}, errors {errors}".format(**counters),
            "  pages: {referenced_pages} referenced, {pinned_pages} pinned, {holders} holder(s); "
            "device reference {alive}".format(alive="alive" if registry["device_alive"] else "killed", **registry),
            "  nr_foll_pin_acquired {nr_foll_pin_acquired}, nr_foll_pin_released {nr_foll_pin_released}, "
            "get_page {nr_get_page}, put_page {nr_put_page}, "
            "unbalanced {nr_unbalanced}, refused {nr_refused}".format(**registry),
        ]
        + (
            [f"  stale references reset at mount: {status['stale_references']['pages']} page(s)"]
            if status["stale_references"]["pages"]
            else []
        )
        + (
            [
                "  write log {path}: {entries} entries ({writes} writes, {flushes} flushes, {marks} marks), "
                "{bytes} of {max_bytes} bytes{full}".format(
                    **{**status["write_log"], "full": ", FULL: writes fail" if status["write_log"]["full"] else ""}
                )
            ]
            if status.get("write_log")
            else []
        )
    )


def cmd_zero(args: argparse.Namespace) -> str | None:
    from .views.progress import open_progress

    with open_progress("zero", quiet=args.quiet) as progress:
        Mount(args.mountpoint).zero(args.offset, args.length, timeout_s=args.timeout, progress=progress)
    return f"zeroed {args.length} bytes at offset {args.offset}"


def cmd_inject_error(args: argparse.Namespace) -> str | None:
    mount = Mount(args.mountpoint)
    if not args.status:
        (mount.uninject_error if args.uninject else mount.inject_error)(args.block, args.count)
    # Like ndctl inject-error --status: the list, in 512-byte blocks of the data area.
    _print_json({"badblocks": [{"block": s, "count": c} for s, c in mount.badblocks()]})
    return None


def cmd_clear_errors(args: argparse.Namespace) -> str | None:
    cleared = Mount(args.mountpoint).clear_errors()
    return f"cleared {sum(c for _, c in cleared)} bad block(s) in {len(cleared)} range(s)"


def cmd_pages(args: argparse.Namespace) -> str | None:
    mount = Mount(args.mountpoint)
    pages = mount.pages()
    if args.heatmap:
        from .views.heatmap import heatmap

        layout = heatmap(args.heatmap, mount.status(), pages, mount.badblocks())
        return (
            f"wrote {args.heatmap}: {layout.rows} rows of {format_size(layout.row_bytes)}, "
            f"{layout.columns} cells of {format_size(layout.cell_bytes)} each"
        )
    if args.json:
        _print_json(pages)
        return None
    print("\n".join(client.format_pages(pages)))
    return None


def cmd_trace(args: argparse.Namespace) -> str | None:
    mount = Mount(args.mountpoint)
    if args.perfetto:
        if args.follow or args.io:
            raise UsageError("--perfetto writes the events in the ring now: leave out --follow and --io")
        return _write_perfetto(mount, args.perfetto)
    # I/O transfers are traced only while someone asks: this command, until it exits.
    with mount.tracing_io() if args.io else contextlib.nullcontext():
        return _print_trace(mount, args.follow)


def _write_perfetto(mount: Mount, path: str) -> str:
    from .views import perfetto

    read = mount.trace_events()
    trace = perfetto.to_chrome_trace(
        read["events"],
        read["now_ns"],
        mountpoint=mount.mountpoint,
        process_name=lambda pid: f"pid {pid} ({client.command_name(pid)})",
    )
    problems = perfetto.validate(trace)
    if problems:  # a bug of the converter: say so rather than hand Perfetto a file it misreads
        raise PmemfsError(f"the timeline is not valid trace-event JSON ({problems[0]}); {path} not written")
    try:
        with open(path, "w") as f:
            json.dump(trace, f)
    except OSError as err:
        raise PmemfsError(f"cannot write {path}: {err.strerror}") from None
    counts = perfetto.summary(trace)
    return (
        f"wrote {path}: {counts['slices']} slice(s), {counts['instants']} instant(s), "
        f"{counts['counter samples']} counter sample(s) from {len(read['events'])} event(s); "
        "open it at https://ui.perfetto.dev (Open trace file) or chrome://tracing"
    )


def cmd_top(args: argparse.Namespace) -> str | None:
    from .views import top

    if args.interval <= 0:
        raise UsageError("--interval must be a positive number of seconds")
    try:
        top.run(Mount(args.mountpoint), interval_s=args.interval, once=args.once)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves top: not a failure
    return None


def _print_trace(mount: Mount, follow: bool) -> str | None:
    # Each line starts with "<serving process>:<sequence>", unique while it stays in the ring.
    printed: set[str] = set()
    while True:
        lines = mount.trace()
        for line in lines:
            key = line.split(" ", 1)[0]
            if key not in printed:
                print(line, flush=True)
        printed = {line.split(" ", 1)[0] for line in lines}
        if not follow:
            return None
        time.sleep(0.2)


def cmd_pin(args: argparse.Namespace) -> str | None:
    command = args.command_args
    with Mount(args.mountpoint).pin(args.file, args.offset, args.length, longterm=args.longterm) as pin:
        print(
            f"pinned {pin.file} offset {pin.offset} length {pin.length} ({pin.kind}, pin {pin.id}, "
            f"holder pid {os.getpid()})",
            flush=True,
        )
        if command:
            return_code = subprocess.run(command).returncode
            if return_code:
                sys.exit(return_code)
            return None
        # Hold until interrupted; the pin goes when the session closes.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            return None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pmemfs", description="A userspace persistent-memory emulator over FUSE.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    create = commands.add_parser("create", help="create a sparse image")
    create.add_argument("image")
    create.add_argument("--size", type=_size, required=True, help="image size, e.g. 1G (multiple of 4K, at least 16M)")
    create.add_argument("--mode", choices=("fsdax", "devdax"), default="fsdax")
    create.add_argument(
        "--map", choices=("dev", "mem"), default="dev", help="where the memmap lives (default: dev, in the image)"
    )
    create.add_argument("--align", type=_size, default=2 << 20, help="mapping alignment: 2M (default) or 1G")
    create.add_argument("--force", action="store_true", help="overwrite an existing file")
    create.set_defaults(func=cmd_create)

    info = commands.add_parser("info", help="decode an image's header and info block")
    info.add_argument("image")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    check = commands.add_parser("check", help="validate an image")
    check.add_argument("image")
    check.add_argument("--repair", action="store_true", help="repair what is safe to repair")
    _quiet(check)
    check.set_defaults(func=cmd_check)

    mount = commands.add_parser("mount", help="serve an image at a mountpoint")
    mount.add_argument("image")
    mount.add_argument("mountpoint")
    mount.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    mount.add_argument("--loop", action="store_true", help="also attach pmem0 to a loop device (direct I/O)")
    mount.add_argument("--log", help="daemon log file (default: in the temp directory, named after the mountpoint)")
    mount.add_argument("--debug", action="store_true")
    _quiet(mount)
    mount.add_argument(
        "--serve",
        choices=("fast", "trio"),
        default="fast",
        help="fast (default): a blocking loop with no event loop on the data path; trio: pyfuse3's trio loop",
    )
    mount.add_argument(
        "--workers",
        type=int,
        help=f"serving processes on the fast path (default here: {default_workers()}, one per CPU)",
    )
    mount.add_argument(
        "--spin-us",
        type=int,
        default=DEFAULT_SPIN_US,
        help="fast path: how long one serving process polls for the next request after a reply before it "
        "sleeps, in microseconds; it saves a wake-up per request at queue depth 1 "
        f"(default {DEFAULT_SPIN_US}; 0: never)",
    )
    mount.add_argument(
        "--log-writes",
        metavar="LOGFILE",
        help="record every write that reaches the media, every flush and every mark in LOGFILE, in "
        "dm-log-writes' format (xfstests' replay-log reads it; so does pmemfs replay); LOGFILE must not exist",
    )
    mount.add_argument(
        "--log-writes-max",
        type=_size,
        default=DEFAULT_LOG_MAX_BYTES,
        metavar="SIZE",
        help="the write log's size limit (default 1G): once full, the log ends with the mark "
        "pmemfs-log-full and every write fails with ENOSPC",
    )
    # For scripts/bench.py: serve without registry bookkeeping, to measure what it costs.
    mount.add_argument("--no-references", dest="track_references", action="store_false", help=argparse.SUPPRESS)
    mount.set_defaults(func=cmd_mount)

    crash = commands.add_parser(
        "crash", help="a power cut: stop serving at once; unflushed dax0 stores are lost; the next mount says so"
    )
    crash.add_argument("mountpoint")
    crash.set_defaults(func=cmd_crash)

    mark = commands.add_parser("mark", help="add a named mark to the write log (mount --log-writes)")
    mark.add_argument("mountpoint")
    mark.add_argument("name", help=f"printable, no spaces, at most {MARK_MAX} bytes")
    mark.set_defaults(func=cmd_mark)

    replay = commands.add_parser(
        "replay",
        help="rebuild the media at a point of a write log, or run a check at every point",
        usage="pmemfs replay LOGFILE IMAGE (--to MARK | --entry N | --flush N | --each flush|write|mark "
        "[--from MARK] [--copy | --mount] [--reorder N [--seed S]] -- COMMAND ...)",
        description="Apply a write log to IMAGE, which holds the media as it was when the log started: a copy "
        "of the image made before the mount, or a new image of the same geometry (a missing IMAGE is created "
        "so), or a plain copy of pmem0 (a file of the data area's size).",
    )
    replay.add_argument("log", metavar="LOGFILE")
    replay.add_argument("image", metavar="IMAGE")
    replay.add_argument("--to", metavar="MARK", help="up to and including the first mark named MARK")
    replay.add_argument("--entry", type=int, metavar="N", help="up to and including entry N (from 0, as replay-log)")
    replay.add_argument("--flush", type=int, metavar="N", help="up to and including the N-th flush (from 1)")
    replay.add_argument(
        "--each",
        choices=KINDS,
        help="run COMMAND at every flush, write (data or zero) or mark, stopping at the first that fails",
    )
    replay.add_argument("--from", dest="from_mark", metavar="MARK", help="with --each: only points from MARK on")
    replay.add_argument(
        "--copy",
        action="store_true",
        help="with --each: COMMAND gets a scratch copy of IMAGE at each point, which it may change "
        "(replay a journal, then check)",
    )
    replay.add_argument(
        "--mount",
        action="store_true",
        help="with --each: mount a scratch copy of IMAGE at each point; COMMAND gets its pmem0 and may change it",
    )
    replay.add_argument(
        "--reorder",
        type=int,
        default=0,
        metavar="N",
        help="with --each flush: also N crash states per flush where only some of the writes since the "
        "previous point landed",
    )
    replay.add_argument("--seed", type=int, help="the seed of --reorder's draws (printed when not given)")
    replay.epilog = (
        "Everything after -- is COMMAND. {} in it becomes the replayed IMAGE's path (with --copy: a scratch "
        "copy's; with --mount: the pmem0 of a mounted scratch copy). Its environment also has "
        + REPLAY_ENVIRONMENT
        + ". Without --copy or --mount, COMMAND must not change IMAGE (a read-only "
        "check: fsck.ext4 -fn {}). Exit status 1 at the first point where COMMAND fails, with IMAGE left at "
        "that point."
    )
    replay.set_defaults(func=cmd_replay)

    umount = commands.add_parser("umount", help="unmount and mark the image clean")
    umount.add_argument("mountpoint")
    umount.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    _quiet(umount)
    umount.set_defaults(func=cmd_umount)

    status = commands.add_parser("status", help="what a mount is doing")
    status.add_argument("mountpoint")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    pin = commands.add_parser("pin", help="hold a pin on a range while COMMAND runs, or until interrupted")
    pin.add_argument("mountpoint")
    pin.add_argument("--file", choices=("pmem0", "dax0"), required=True)
    pin.add_argument("--offset", type=_size, required=True)
    pin.add_argument("--length", type=_size, required=True)
    pin.add_argument("--longterm", action="store_true", help="FOLL_LONGTERM (allowed on dax0 only, as on devdax)")
    pin.epilog = "Everything after -- is the command to run while the pin is held."
    pin.set_defaults(func=cmd_pin)

    zero = commands.add_parser("zero", help="bulk-zero a range (whole pages become holes in the image)")
    zero.add_argument("mountpoint")
    zero.add_argument("--offset", type=_size, required=True)
    zero.add_argument("--length", type=_size, required=True)
    zero.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for busy pages (default 30)")
    _quiet(zero)
    zero.set_defaults(func=cmd_zero)

    inject = commands.add_parser(
        "inject-error", help="poison 512-byte blocks of the data area (like ndctl inject-error)"
    )
    inject.add_argument("mountpoint")
    inject.add_argument("--block", "-B", type=int, help="first 512-byte block, relative to the data area")
    inject.add_argument("--count", "-n", type=int, default=1, help="number of blocks (default 1)")
    inject.add_argument("--uninject", "-d", action="store_true", help="remove the blocks from the list, data untouched")
    inject.add_argument("--status", "-t", action="store_true", help="only list the poisoned blocks")
    inject.set_defaults(func=cmd_inject_error)

    clear = commands.add_parser("clear-errors", help="zero every poisoned block, clearing its poison")
    clear.add_argument("mountpoint")
    clear.set_defaults(func=cmd_clear_errors)

    pages = commands.add_parser("pages", help="referenced pages and their holders")
    pages.add_argument("mountpoint")
    pages.add_argument("--json", action="store_true")
    pages.add_argument(
        "--heatmap",
        metavar="FILE",
        help="draw the data area to FILE (.png or .svg), coloured by references and pins "
        "(needs Pillow: pip install 'pmemfs[plot]')",
    )
    pages.set_defaults(func=cmd_pages)

    trace = commands.add_parser("trace", help="recent page registry events")
    trace.add_argument("mountpoint")
    trace.add_argument("--follow", action="store_true", help="keep printing new events")
    trace.add_argument(
        "--io", action="store_true", help="also trace every I/O transfer while this runs (with --follow)"
    )
    trace.add_argument(
        "--perfetto",
        metavar="FILE",
        help="write the events as a Chrome trace-event timeline (JSON) for ui.perfetto.dev or chrome://tracing",
    )
    trace.set_defaults(func=cmd_trace)

    top = commands.add_parser("top", help="a live view: I/O rates per file, pins in flight, oldest holders")
    top.add_argument("mountpoint")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame (rates over --interval) and exit")
    top.set_defaults(func=cmd_top)
    return parser


def _quiet(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--quiet", "-q", action="store_true", help="no progress (a bar on a terminal, plain lines elsewhere)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # What follows `--` is a command for `pmemfs pin` or `replay` to run, not for argparse to read.
    command_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = build_parser()
    args = parser.parse_args(argv[: len(argv) - len(command_args) - (1 if "--" in argv else 0)])
    args.command_args = command_args
    if args.func is cmd_inject_error and args.block is None and not args.status:
        parser.error("inject-error needs --block (or --status)")
    try:
        message = args.func(args)
    except PmemfsError as err:
        print(f"pmemfs: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        # The last line of defence: bad input is meant to be a PmemfsError raised on purpose.
        if os.environ.get("PMEMFS_DEBUG") == "1":
            traceback.print_exc()
        message = " ".join(str(err).split())
        print(f"pmemfs: internal error: {type(err).__name__}: {message} (this is a bug in pmemfs)", file=sys.stderr)
        return 1
    if message:
        print(message)
    return 0
