"""``pmemfs top``: a live view of a mount, refreshed every interval, like ``htop`` and ``iostat -x 1``.

A frame is built from two samples of the mount's control files (``status`` and ``pages``) and of
/proc (the serving processes' CPU time, the holders' command names): rates are the difference
over the time between them, totals are the later sample's. Drawn with rich.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..client import command_name, daemon_processes
from ..mount import Mount
from ..sizes import format_size

HOLDERS_SHOWN = 8
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    """What the mount and /proc said at ``time_s``."""

    time_s: float
    status: dict
    pages: dict
    cpu_ticks: dict[int, int] = field(default_factory=dict)  # serving process pid: utime + stime
    rss: dict[int, int] = field(default_factory=dict)  # serving process pid: resident bytes

    @property
    def counters(self) -> dict[str, int]:
        return {**self.status["counters"], **self.status.get("file_counters", {}), **self.status["registry"]}


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def take_sample(mount: Mount) -> Sample:
    status = mount.status()
    cpu, rss = {}, {}
    # The daemon and its workers, as a crash or an unmount finds them (by their command line).
    for pid in sorted({int(status["pid"]), *daemon_processes(status["image"], status["mountpoint"])}):
        fields = _proc_stat(pid)
        if fields:
            cpu[pid] = int(fields[11]) + int(fields[12])  # utime, stime
            rss[pid] = int(fields[21]) * PAGE_BYTES
    return Sample(time.monotonic(), status, mount.pages(), cpu, rss)


def _rate(before: Sample | None, after: Sample, name: str) -> float | None:
    if before is None or after.time_s <= before.time_s:
        return None
    return (after.counters.get(name, 0) - before.counters.get(name, 0)) / (after.time_s - before.time_s)


def human_size(size_bytes: float) -> str:
    """Bytes as people read them at a glance: 4.0 MiB, 12.3 GiB."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size_bytes >= 1 << shift:
            return f"{size_bytes / (1 << shift):.1f} {unit}"
    return f"{size_bytes:.0f} B"


def _per_s(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _bandwidth(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f} MB/s"


def io_table(before: Sample | None, after: Sample) -> Table:
    """Reads and writes per second and bandwidth per file, direct and buffered apart."""
    c = after.counters
    table = Table(title="I/O", title_justify="left", expand=False)
    for column in ("file", "reads/s", "writes/s", "read", "write", "reads", "writes", "read bytes", "written"):
        table.add_column(column, justify="left" if column == "file" else "right")

    # Each row: (label, counter names for reads, writes, read bytes, write bytes); buffered pmem0
    # is pmem0 less its direct I/O (only pmem0 does direct I/O).
    def values(names: tuple[str, ...], minus: tuple[str, ...] = ()) -> tuple[list[float | None], list[int]]:
        rates = []
        for i, name in enumerate(names):
            rate = _rate(before, after, name)
            if minus and rate is not None:
                rate -= _rate(before, after, minus[i]) or 0.0
            rates.append(rate)
        totals = [c.get(name, 0) - (c.get(minus[i], 0) if minus else 0) for i, name in enumerate(names)]
        return rates, totals

    direct = ("direct_reads", "direct_writes", "direct_read_bytes", "direct_write_bytes")
    rows = [
        ("pmem0 direct", direct, ()),
        ("pmem0 buffered", ("pmem0_reads", "pmem0_writes", "pmem0_read_bytes", "pmem0_write_bytes"), direct),
        ("dax0", ("dax0_reads", "dax0_writes", "dax0_read_bytes", "dax0_write_bytes"), ()),
        ("all", ("reads", "writes", "read_bytes", "write_bytes"), ()),
    ]
    for label, names, minus in rows:
        rates, totals = values(names, minus)
        table.add_row(
            label, _per_s(rates[0]), _per_s(rates[1]), _bandwidth(rates[2]), _bandwidth(rates[3]),
            f"{totals[0]:,}", f"{totals[1]:,}", human_size(totals[2]), human_size(totals[3]),
        )  # fmt: skip
    return table


def pins_table(before: Sample | None, after: Sample) -> Table:
    c, registry = after.counters, after.status["registry"]
    holders = after.pages["holders"]
    longterm = [h for h in holders if h["kind"] == "longterm"]
    table = Table(title="Page registry", title_justify="left", show_header=False, expand=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("what")
    table.add_column("value", justify="right")
    # In flight as /proc/vmstat counts it: pages pinned and not yet released, transfers included.
    table.add_row(
        "pins in flight", f"{c['nr_foll_pin_acquired'] - c['nr_foll_pin_released']:,} pages",
        "pages pinned/s", _per_s(_rate(before, after, "nr_foll_pin_acquired")),
    )  # fmt: skip
    table.add_row(
        "long-term pins", f"{len(longterm):,}",
        "long-term pinned", human_size(sum(h["length"] for h in longterm)),
    )  # fmt: skip
    table.add_row(
        "pin holders", f"{sum(1 for h in holders if h['kind'] != 'get'):,}",
        "referenced pages", f"{registry['referenced_pages']:,}",
    )  # fmt: skip
    unbalanced, refused = c["nr_unbalanced"], c["nr_refused"]
    table.add_row(
        "unbalanced puts", Text(f"{unbalanced:,}", style="bold red" if unbalanced else ""),
        "refusals", Text(f"{refused:,}", style="yellow" if refused else ""),
    )  # fmt: skip
    errors, internal = c["errors"], c["internal_errors"]
    table.add_row(
        "errors", Text(f"{errors:,}", style="red" if errors else ""),
        "internal errors", Text(f"{internal:,}", style="bold red" if internal else ""),
    )  # fmt: skip
    table.add_row(
        "device reference", "alive" if registry["device_alive"] else Text("killed", style="bold yellow"),
        "fsyncs/s", _per_s(_rate(before, after, "fsyncs")),
    )  # fmt: skip
    return table


def holders_table(after: Sample, names: Callable[[int], str] = command_name) -> Table:
    """The oldest holders first: the one that blocks an unmount is at the top."""
    holders = sorted(after.pages["holders"], key=lambda h: -h["age_s"])
    table = Table(title=f"Oldest holders ({len(holders)})", title_justify="left", expand=False)
    for column in ("pid", "command", "file", "offset", "length", "pages", "kind", "age"):
        table.add_column(column, justify="right" if column in ("pid", "offset", "length", "age") else "left")
    for h in holders[:HOLDERS_SHOWN]:
        style = "red" if h["kind"] == "longterm" else "yellow" if h["kind"] == "pin" else ""
        table.add_row(
            str(h["pid"]), names(h["pid"]), h["file"], str(h["offset"]), human_size(h["length"]),
            f"{h['pfn']}-{h['pfn'] + h['npages'] - 1}", Text(h["kind"], style=style), f"{h['age_s']:.1f} s",
        )  # fmt: skip
    if len(holders) > HOLDERS_SHOWN:
        table.caption = f"and {len(holders) - HOLDERS_SHOWN} more (pmemfs pages)"
    return table


def serving_table(before: Sample | None, after: Sample) -> Table:
    serving = after.status["serving"]
    table = Table(title="Serving processes", title_justify="left", expand=False)
    table.caption = f"{serving['mode']} loop, {serving['workers']} worker(s)"
    for column in ("pid", "role", "CPU", "RSS"):
        table.add_column(column, justify="left" if column == "role" else "right")
    daemon_pid = int(after.status["pid"])
    for pid, ticks in after.cpu_ticks.items():
        cpu = "-"
        if before is not None and pid in before.cpu_ticks and after.time_s > before.time_s:
            used = (ticks - before.cpu_ticks[pid]) / CLOCK_TICKS
            cpu = f"{100 * used / (after.time_s - before.time_s):.0f} %"
        table.add_row(str(pid), "daemon" if pid == daemon_pid else "worker", cpu, human_size(after.rss.get(pid, 0)))
    return table


def frame(before: Sample | None, after: Sample, *, names: Callable[[int], str] = command_name) -> RenderableType:
    """One screen of ``pmemfs top``."""
    status = after.status
    interval = f", rates over {after.time_s - before.time_s:.1f} s" if before else ""
    header = Text.assemble(
        ("pmemfs top ", "bold"),
        f"{status['mountpoint']}: {status['mode']} map={status['map']} {format_size(status['size'])}, "
        f"daemon pid {status['pid']}{interval}",
    )
    return Group(
        header,
        io_table(before, after),
        pins_table(before, after),
        holders_table(after, names),
        serving_table(before, after),
    )


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """A ``wait(timeout_s)`` returning the key pressed meanwhile ('' if none), the terminal in cbreak mode."""
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None

    def wait(timeout_s: float) -> str:
        if fd is None:
            time.sleep(timeout_s)
            return ""
        ready, _, _ = select.select([fd], [], [], timeout_s)
        return os.read(fd, 1).decode(errors="replace") if ready else ""

    try:
        if fd is not None:
            tty.setcbreak(fd)
        yield wait
    finally:
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(mount: Mount, *, interval_s: float = 1.0, once: bool = False) -> None:
    """Draw frames until q or Ctrl-C (on a terminal, in place; elsewhere one after another); with
    ``once``, print one frame (two samples ``interval_s`` apart)."""
    console = Console(width=None if sys.stdout.isatty() else 120)
    before = take_sample(mount)
    if once or not console.is_terminal:
        # Into a pipe or a file, frame after frame, as `iostat 1 > log` does.
        while True:
            time.sleep(interval_s)
            after = take_sample(mount)
            console.print(frame(before, after))
            if once:
                return
            before = after
    from rich.live import Live

    # The alternate screen, as htop: the terminal is as it was when top is left.
    with _keys() as wait, Live(frame(None, before), console=console, auto_refresh=False, screen=True) as live:
        deadline = time.monotonic() + interval_s
        while True:
            key = wait(max(0.0, deadline - time.monotonic()))
            if key in ("q", "Q"):
                return
            if key == "" or time.monotonic() >= deadline:
                after = take_sample(mount)
                live.update(frame(before, after), refresh=True)
                before, deadline = after, time.monotonic() + interval_s
