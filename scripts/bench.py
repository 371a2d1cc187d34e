#!/usr/bin/env python3
"""The project's benchmark: one fio matrix against pmemfs and references, side by side in one run.

Every target runs the same jobs (direct=1, time based; the mmap jobs are loads and stores through a
mapping, so buffered) in every pass. A pass sets each target up once and runs its jobs; each pass
starts at the next target (the order rotates), so that a machine drifting during the run favours no
column. Every FUSE daemon serves bytes on one private tmpfs (pmemfs's image included), so no column
gains from where its bytes live. The table shows, per cell, the median of the passes and their
spread (min-max), and each FUSE daemon's CPU per request next to its IOPS. A ratio to a reference
is called met only when pmemfs's worst pass beats the reference's median, not met when its best
pass does not, and otherwise the run cannot tell. The columns:
- pmemfs in each serving mode, and its fast mode with the page registry off (4k jobs: what the
  registry's bookkeeping costs);
- the Python floor: scripts/minimal_fs.py, the least a pyfuse3 + trio daemon does to serve a file;
- libfuse's C passthrough_hp (built by scripts/build-passthrough-hp, skipped when it cannot be);
- the host: a file on the host's disk read directly, and the file on the tmpfs (the kernel's
  limit for memory-backed storage).
A second table gives each FUSE daemon's CPU time per request (all its processes, user + system),
median and spread.
Then the page registry alone (pin + unpin of ranges) and a 1 TiB image's mount time and daemon
memory. Not a test: speed is measured here and written down in the README, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyfuse3
import trio

from pmemfs.client import fuse_mount_entry
from pmemfs.pages import RECORD_DTYPE, PageRegistry
from pmemfs.sizes import parse_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PMEMFS = [sys.executable, "-m", "pmemfs"]
MINIMAL_FS = [sys.executable, os.path.join(ROOT, "scripts", "minimal_fs.py")]
BUILD_PASSTHROUGH_HP = os.path.join(ROOT, "scripts", "build-passthrough-hp")
MOUNT_TIMEOUT_S = 15.0
RAMP_S = 0.5


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    engine: str
    iodepth: int

    @property
    def direct(self) -> bool:
        # fio's mmap engine with direct=1 msyncs and drops every page after each I/O: not a mapping's use.
        return self.engine != "mmap"

    def fio_args(self) -> list[str]:
        return [
            f"--rw={self.rw}", f"--bs={self.bs}", f"--ioengine={self.engine}", f"--iodepth={self.iodepth}",
            f"--direct={int(self.direct)}",
        ]  # fmt: skip


JOBS = [
    Job("4k randread QD1 psync", "randread", "4k", "psync", 1),
    Job("4k randwrite QD1 psync", "randwrite", "4k", "psync", 1),
    Job("4k randread QD16 libaio", "randread", "4k", "libaio", 16),
    Job("4k randwrite QD16 libaio", "randwrite", "4k", "libaio", 16),
    Job("1M read QD1 psync", "read", "1M", "psync", 1),
    Job("1M write QD1 psync", "write", "1M", "psync", 1),
    Job("1M read QD4 libaio", "read", "1M", "libaio", 4),
    Job("1M write QD4 libaio", "write", "1M", "libaio", 4),
    Job("4k randread mmap", "randread", "4k", "mmap", 1),
    Job("4k randwrite mmap", "randwrite", "4k", "mmap", 1),
]

# The pmemfs columns: (column name, mount arguments). Another serving option to compare (a
# --workers N) is one more line here; its ratio columns follow from this list.
PMEMFS_MODES = [
    ("pmemfs fast", ["--serve", "fast"]),
    ("pmemfs trio", ["--serve", "trio"]),
]
# The first mode again without the registry's pin/unpin per direct transfer, on the 4k direct jobs.
REGISTRY_OFF = ("pmemfs fast, registry off", ["--serve", "fast", "--no-references"])
PYTHON_FLOOR = "python floor"
PASSTHROUGH_HP = "passthrough_hp"
HOST_DISK = "host: file on disk"
HOST_TMPFS = "host: tmpfs file"
HOST_DISK_FILE = "host-disk.data"
DEFAULT_RUNTIME_S = 5.0
DEFAULT_PASSES = 3  # fewer and a spread says nothing: every ratio is then "cannot tell"

# The registry micro-benchmark's ranges, in 4 KiB pages: one page to 1 GiB.
REGISTRY_RANGES = [1, 16, 256, 4096, 65536, 262144]


@dataclass
class Target:
    """A file fio can run on, the byte range of it that stands for the device, and where the mmap
    jobs run when not there (dax0 on pmemfs)."""

    filename: str
    offset: int
    size: int
    mmap: Target | None = None
    # The processes that serve it (a FUSE daemon and its workers), whose CPU time run_fio measures.
    daemon_pids: Callable[[], list[int]] | None = None

    def for_job(self, job: Job) -> Target:
        if self.mmap and job.engine == "mmap":
            return Target(self.mmap.filename, self.mmap.offset, self.mmap.size, None, self.daemon_pids)
        return self


@dataclass(frozen=True)
class Column:
    name: str
    setup: Callable[[], contextlib.AbstractContextManager[Target]]
    runs: Callable[[Job], bool]


@dataclass(frozen=True)
class Placement:
    """Where fio and the daemons run: unpinned, or fio on CPU 0 and every daemon on CPU 1."""

    fio: list[str]
    daemon: list[str]
    description: str


def placement(pin: bool) -> Placement:
    if pin:
        return Placement(["taskset", "-c", "0"], ["taskset", "-c", "1"], "pinned: fio on CPU 0, daemons on CPU 1")
    return Placement([], [], "unpinned")


def run_fio(target: Target, job: Job, runtime_s: float, where: Placement) -> dict[str, float]:
    target = target.for_job(job)
    if job.engine == "mmap" and target.offset:
        # fio 3.33's mmap engine maps the file from byte 0 whatever --offset says: it would store there.
        raise ValueError(f"{job.name} on {target.filename} at offset {target.offset}: mmap jobs need offset 0")
    # --thread: one process, so that when an interrupted run kills fio no job process outlives it
    # holding the file open, which would make the unmount that follows fail with EBUSY.
    command = [
        *where.fio, "fio", "--name=bench", "--thread", "--output-format=json", f"--filename={target.filename}",
        f"--offset={target.offset}", f"--size={target.size}", "--time_based",
        f"--runtime={round(runtime_s * 1000)}ms", f"--ramp_time={round(RAMP_S * 1000)}ms",
        "--randrepeat=0", "--norandommap", *job.fio_args(),
    ]  # fmt: skip
    pids = target.daemon_pids() if target.daemon_pids else []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as fio:
        # The daemon's CPU over fio's measured part: from the end of the ramp to fio's exit.
        time.sleep(RAMP_S)
        cpu_before = cpu_seconds(pids)
        stdout, stderr = fio.communicate()
        daemon_cpu_s = cpu_seconds(pids) - cpu_before
    if fio.returncode != 0:
        raise RuntimeError(f"`{shlex.join(command)}` failed: {stderr.strip()}")
    report = json.loads(stdout[stdout.index("{") :])["jobs"][0]
    side = report["read"] if "read" in job.rw else report["write"]
    result = {"iops": side["iops"], "bw_bytes": side["bw_bytes"], "lat_us": side["lat_ns"]["mean"] / 1000}
    if pids and side["iops"]:
        result["daemon_us_per_io"] = daemon_cpu_s * 1e6 / (side["iops"] * runtime_s)
    return result


def cpu_seconds(pids: list[int]) -> float:
    """User + system time of these processes (all their threads) so far; a process gone counts 0."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def pmemfs(*args: str, prefix: list[str] | None = None) -> str:
    """Run a pmemfs command and return what it printed; on failure, raise with what it said."""
    result = subprocess.run([*(prefix or []), *PMEMFS, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pmemfs {shlex.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def prefill(filename: str, offset: int, size: int) -> None:
    """Write the whole range once so that reads hit allocated blocks on every target."""
    subprocess.run(
        ["fio", "--name=fill", "--thread", f"--filename={filename}", "--rw=write", "--bs=1M", "--direct=1",
         f"--offset={offset}", f"--size={size}", "--ioengine=psync", "--output=/dev/null"],
        check=True,
    )  # fmt: skip


# Targets. Each is a context manager that yields once the file answers and leaves nothing mounted.
@contextlib.contextmanager
def pmemfs_target(workdir: str, image: str, mount_args: list[str], where: Placement) -> Iterator[Target]:
    mountpoint = os.path.join(workdir, "mnt")
    # The daemon inherits the CPU affinity of the `pmemfs mount` that starts it.
    pmemfs("mount", image, mountpoint, *mount_args, prefix=where.daemon)
    try:
        pmem0 = os.path.join(mountpoint, "pmem0")
        size = os.stat(pmem0).st_size
        daemon = int(json.loads(pmemfs("status", mountpoint, "--json"))["pid"])
        pids = [daemon, *children_of(daemon)]
        yield Target(pmem0, 0, size, Target(os.path.join(mountpoint, "dax0"), 0, size), lambda: pids)
    finally:
        pmemfs("umount", mountpoint)


@contextlib.contextmanager
def daemon_target(command: list[str], mountpoint: str, filename: str, size: int) -> Iterator[Target]:
    """A FUSE daemon run in the foreground as our child: wait until it serves ``filename``, and
    unmount (then end it) afterwards, whatever happened."""
    # stderr goes to a file, not a pipe: a daemon that logs a lot must not block on a full pipe.
    with tempfile.TemporaryFile() as stderr:
        daemon = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for_mount(daemon, command, mountpoint, os.path.join(mountpoint, filename), stderr)
            yield Target(os.path.join(mountpoint, filename), 0, size, daemon_pids=lambda: [daemon.pid])
        finally:
            stop_daemon(daemon, mountpoint)


def wait_for_mount(daemon: subprocess.Popen, command: list[str], mountpoint: str, path: str, stderr: Any) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while not (fuse_mount_entry(mountpoint) and os.path.exists(path)):
        if daemon.poll() is not None:
            stderr.seek(0)
            said = stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"`{shlex.join(command)}` exited with status {daemon.returncode}: {said}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mountpoint} did not answer within {MOUNT_TIMEOUT_S:.0f} s")
        time.sleep(0.02)


def stop_daemon(daemon: subprocess.Popen, mountpoint: str) -> None:
    # Unmounting ends the daemon's loop; a daemon that does not go is ended, and a mount that a
    # dead daemon left is detached lazily, so the next target finds the mountpoint free.
    if fuse_mount_entry(mountpoint):
        subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            daemon.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            daemon.send_signal(sig)
    daemon.wait()
    if fuse_mount_entry(mountpoint):
        subprocess.run(["fusermount3", "-uz", mountpoint], check=True)


@contextlib.contextmanager
def host_target(target: Target) -> Iterator[Target]:
    yield target


@contextlib.contextmanager
def private_tmpfs(workdir: str, size: int) -> Iterator[str]:
    """A tmpfs of our own under the work directory (root), else a directory in /dev/shm."""
    path = os.path.join(workdir, "tmpfs")
    os.makedirs(path)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size + (16 << 20)},mode=0700", "pmemfs-bench", path], capture_output=True
    )
    if mounted.returncode != 0:
        os.rmdir(path)
        path = tempfile.mkdtemp(prefix="pmemfs-bench-", dir="/dev/shm")
    try:
        yield path
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", path], check=True)
            os.rmdir(path)
        else:
            shutil.rmtree(path)


@contextlib.contextmanager
def work_directory(parent: str) -> Iterator[str]:
    """A fresh directory with a mountpoint ``mnt`` in it, removed afterwards file by file: never a
    recursive delete, which would reach through a mount left behind into what it serves."""
    workdir = tempfile.mkdtemp(dir=parent)
    os.mkdir(os.path.join(workdir, "mnt"))
    try:
        yield workdir
    finally:
        for name in (HOST_DISK_FILE, "scale.img"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(workdir, name))
        os.rmdir(os.path.join(workdir, "mnt"))
        os.rmdir(workdir)


def passthrough_hp_binary() -> tuple[str | None, str]:
    """The cached or freshly built passthrough_hp, or None and why not."""
    result = subprocess.run([BUILD_PASSTHROUGH_HP], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"passthrough_hp skipped: {BUILD_PASSTHROUGH_HP} failed ({last})"
    return result.stdout.strip().splitlines()[-1], ""


def every_job(job: Job) -> bool:
    return True


def direct_4k(job: Job) -> bool:
    return job.bs == "4k" and job.direct


def columns(
    workdir: str, image: str, disk: Target, shared_files: str, passthrough_hp: str | None, where: Placement
) -> list[Column]:
    """Every column's target; the FUSE daemons all serve bytes on the private tmpfs (``image`` and
    ``shared_files`` are on it), the host-disk column a file on the host's disk."""

    def pmemfs(mount_args: list[str]) -> Callable[[], contextlib.AbstractContextManager[Target]]:
        return lambda: pmemfs_target(workdir, image, mount_args, where)

    mountpoint = os.path.join(workdir, "mnt")
    data = os.path.join(shared_files, "data")
    result = [Column(name, pmemfs(args), every_job) for name, args in PMEMFS_MODES]
    result.append(Column(REGISTRY_OFF[0], pmemfs(REGISTRY_OFF[1]), direct_4k))
    floor = [*where.daemon, *MINIMAL_FS, data, mountpoint]
    result.append(Column(PYTHON_FLOOR, lambda: daemon_target(floor, mountpoint, "data", disk.size), every_job))
    if passthrough_hp:
        # Its defaults: splice, attribute and writeback caching, a thread pool. O_DIRECT requests
        # still reach the daemon (the cache options only keep buffered pages across opens).
        c_daemon = [*where.daemon, passthrough_hp, "--foreground", shared_files, mountpoint]
        result.append(Column(PASSTHROUGH_HP, lambda: daemon_target(c_daemon, mountpoint, "data", disk.size), every_job))
    result.append(Column(HOST_DISK, lambda: host_target(disk), every_job))
    result.append(Column(HOST_TMPFS, lambda: host_target(Target(data, 0, disk.size)), every_job))
    return result


Passes = dict[str, dict[str, list[dict[str, float]]]]  # job -> column -> one result per pass


def run_matrix(
    all_columns: list[Column], jobs: list[Job], passes: int, runtime_s: float, where: Placement, started: float
) -> Passes:
    results: Passes = {}
    for pass_no in range(passes):
        first = pass_no % len(all_columns)
        for column in all_columns[first:] + all_columns[:first]:
            with column.setup() as target:
                for job in filter(column.runs, jobs):
                    result = run_fio(target, job, runtime_s, where)
                    results.setdefault(job.name, {}).setdefault(column.name, []).append(result)
        print(f"pass {pass_no + 1}/{passes} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return results


def medians_of(results: Passes) -> dict[str, dict[str, dict[str, float]]]:
    return {
        job: {
            name: {k: statistics.median(r[k] for r in runs) for k in runs[0] if all(k in r for r in runs)}
            for name, runs in by_column.items()
        }
        for job, by_column in results.items()
    }


def verdict(ours: list[float], reference: list[float]) -> str:
    """Whether ours beats the reference in this run: met only when our worst pass beats the
    reference's median, not met when our best does not, else the run cannot tell."""
    if min(len(ours), len(reference)) < DEFAULT_PASSES:
        return "cannot tell"
    median = statistics.median(reference)
    if min(ours) > median:
        return "met"
    if max(ours) < median:
        return "not met"
    return "cannot tell"


def print_table(results: Passes, jobs: list[Job], names: list[str]) -> None:
    pmemfs_names = [name for name, _ in PMEMFS_MODES if name in names]
    references = [ref for ref in (PASSTHROUGH_HP, PYTHON_FLOOR) if ref in names]
    ratios = [(ours, ref) for ref in references for ours in pmemfs_names]
    header = names + [f"{_short(ours)} / {ref}" for ours, ref in ratios] + ["registry cost (IOPS, CPU/request)"]
    print("| job | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for job in jobs:
        row = results[job.name]
        cells = [job.name] + [_cell(job, row[name]) if name in row else "" for name in names]
        for ours, ref in ratios:
            mine, theirs = _values(row[ours], "iops"), _values(row[ref], "iops")
            ratio = statistics.median(mine) / statistics.median(theirs)
            cells.append(f"{ratio:.2f}x {verdict(mine, theirs)}")
        on, off = row.get(pmemfs_names[0]) if pmemfs_names else None, row.get(REGISTRY_OFF[0])
        cells.append(_registry_cost(on, off) if on and off else "")
        print("| " + " | ".join(cells) + " |")


def print_daemon_cpu(results: Passes, jobs: list[Job], names: list[str]) -> None:
    """What each FUSE daemon spent per request: where a column's speed goes, without a profiler."""
    names = [
        name for name in names if any(_values(results[job.name].get(name, []), "daemon_us_per_io") for job in jobs)
    ]
    print("\nDaemon CPU per request, µs, median (min-max) of the passes (user + system time of every daemon process)\n")
    print("| job | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for job in jobs:
        row = results[job.name]
        cells = [_spread(_values(row.get(name, []), "daemon_us_per_io"), "{:.1f}") for name in names]
        print(f"| {job.name} | " + " | ".join(cells) + " |")


def _chosen(name: str, wanted: list[str] | None) -> bool:
    return wanted is None or any(part in name for part in wanted)


def _values(runs: list[dict[str, float]], key: str) -> list[float]:
    return [run[key] for run in runs if key in run]


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return ""
    median = fmt.format(statistics.median(values))
    return f"{median} ({fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else median


def _cell(job: Job, runs: list[dict[str, float]]) -> str:
    """Median (min-max) of the passes, and for a FUSE daemon its median CPU per request."""
    if job.bs == "4k":
        cell = _spread([r["iops"] / 1000 for r in runs], "{:.1f}") + "k IOPS"
    else:
        cell = _spread([r["bw_bytes"] / 1e9 for r in runs], "{:.2f}") + " GB/s"
    cpu = _values(runs, "daemon_us_per_io")
    return cell + (f", {statistics.median(cpu):.1f} µs" if cpu else "")


def _registry_cost(on: list[dict[str, float]], off: list[dict[str, float]]) -> str:
    iops = 1 - statistics.median(_values(on, "iops")) / statistics.median(_values(off, "iops"))
    cpu_on, cpu_off = _values(on, "daemon_us_per_io"), _values(off, "daemon_us_per_io")
    cpu = f", {statistics.median(cpu_on) - statistics.median(cpu_off):+.2f} µs" if cpu_on and cpu_off else ""
    return f"{iops * 100:+.1f} %{cpu}"


def _short(name: str) -> str:
    return name.removeprefix("pmemfs ")


def _fmt(job: Job, result: dict[str, float]) -> str:
    if job.bs == "4k":
        iops = result["iops"]
        return f"{iops / 1e6:.2f}M IOPS" if iops >= 1e6 else f"{iops / 1000:.1f}k IOPS"
    return f"{result['bw_bytes'] / 1e9:.2f} GB/s"


def registry_microbench(repetitions: int) -> list[dict[str, float]]:
    """pin_user_pages + unpin_user_pages of ranges on the registry alone: no FUSE, no I/O."""
    npfns = REGISTRY_RANGES[-1]
    shared = mmap.mmap(-1, npfns * RECORD_DTYPE.itemsize, flags=mmap.MAP_SHARED)
    registry = PageRegistry(np.frombuffer(shared, dtype=RECORD_DTYPE), epoch=1)
    # The first reference to a chunk of records initialises it once; time the steady state.
    registry.pin_user_pages(0, npfns)
    registry.unpin_user_pages(0, npfns)
    rows = []
    for npages in REGISTRY_RANGES:
        pins, unpins = [], []
        for _ in range(repetitions):
            start = time.perf_counter()
            registry.pin_user_pages(0, npages)
            pinned = time.perf_counter()
            registry.unpin_user_pages(0, npages)
            pins.append(pinned - start)
            unpins.append(time.perf_counter() - pinned)
        pin_us, unpin_us = statistics.median(pins) * 1e6, statistics.median(unpins) * 1e6
        rows.append({"npages": npages, "pin_us": pin_us, "unpin_us": unpin_us, "pin_unpin_us": pin_us + unpin_us})
    return rows


def print_registry(rows: list[dict[str, float]], repetitions: int) -> None:
    print(f"\nPage registry alone: pin_user_pages + unpin_user_pages, median of {repetitions}, µs\n")
    print("| range | pages | pin | unpin | pin + unpin | per page |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        npages = int(row["npages"])
        per_page_ns = row["pin_unpin_us"] * 1000 / npages
        print(
            f"| {_size(npages * 4096)} | {npages} | {row['pin_us']:.1f} | {row['unpin_us']:.1f} "
            f"| {row['pin_unpin_us']:.1f} | {per_page_ns:.1f} ns |"
        )


def _size(size_bytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size_bytes >= 1 << shift:
            return f"{size_bytes / (1 << shift):g} {unit}"
    return f"{size_bytes} B"


def scale_run(workdir: str, size: str, where: Placement) -> dict[str, Any]:
    """Create a big sparse image and mount it: how long until the mount answers, and the daemon's memory."""
    image, mountpoint = os.path.join(workdir, "scale.img"), os.path.join(workdir, "mnt")
    started = time.monotonic()
    pmemfs("create", image, "--size", size)
    created = time.monotonic()
    try:
        pmemfs("mount", image, mountpoint, prefix=where.daemon)
        mounted = time.monotonic()
        try:
            status = json.loads(pmemfs("status", mountpoint, "--json"))
            pids = [int(status["pid"]), *children_of(int(status["pid"]))]
            rss = {pid: proc_status(pid).get("VmRSS", 0) for pid in pids}
        finally:
            pmemfs("umount", mountpoint)
    finally:
        os.unlink(image)
    return {"size": size, "create_s": created - started, "mount_s": mounted - created, "rss_bytes": rss}


def children_of(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and proc_status(int(p)).get("PPid") == pid]


def proc_status(pid: int) -> dict[str, int]:
    """The numeric fields of /proc/PID/status that scale_run reads (kB fields in bytes); {} once gone."""
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "PPid":
                    fields[key] = int(value)
                elif key == "VmRSS":
                    fields[key] = int(value.split()[0]) * 1024
    return fields


def print_scale(scale: dict[str, Any]) -> None:
    rss = scale["rss_bytes"]
    processes = ", ".join(f"pid {pid} {size / (1 << 20):.1f} MiB" for pid, size in rss.items())
    print(
        f"\nScale: a {scale['size']} image: create {scale['create_s']:.2f} s, mount until it answers "
        f"{scale['mount_s']:.2f} s; daemon RSS {sum(rss.values()) / (1 << 20):.1f} MiB ({processes})"
    )


def machine_info(where: Placement) -> dict[str, Any]:
    def version(command: list[str]) -> str:
        result = subprocess.run(command, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else "unknown"

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "placement": where.description,
        "fio": version(["fio", "--version"]),
        "libfuse": version(["pkg-config", "--modversion", "fuse3"]),
        "pyfuse3": pyfuse3.__version__,
        "trio": trio.__version__,
        "python": platform.python_version(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument(
        "--runtime", type=float, default=DEFAULT_RUNTIME_S, help="seconds per job and pass, after a 0.5 s ramp"
    )
    parser.add_argument(
        "--passes", type=int, default=DEFAULT_PASSES, help=f"passes (default and least for a verdict: {DEFAULT_PASSES})"
    )
    parser.add_argument("--pin", action="store_true", help="fio on CPU 0, every daemon on CPU 1 (default: unpinned)")
    parser.add_argument("--scale-size", default="1T", help="image size for the scale run (default 1T)")
    parser.add_argument("--registry-repetitions", type=int, default=101)
    parser.add_argument("--dir", default=os.path.join(ROOT, "build", "bench"), help="where the image lives")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--jobs", action="append", help="only the jobs whose name contains this (repeatable): a quick look"
    )
    parser.add_argument("--columns", action="append", help="only the columns whose name contains this (repeatable)")
    args = parser.parse_args()
    jobs = [job for job in JOBS if _chosen(job.name, args.jobs)]

    # A SIGTERM ends the run through the finally blocks, like Ctrl-C: nothing stays mounted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    where = placement(args.pin)
    notes = []
    passthrough_hp, why_not = passthrough_hp_binary()
    if why_not:
        notes.append(why_not)
        print(why_not, file=sys.stderr)

    os.makedirs(args.dir, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        workdir = cleanup.enter_context(work_directory(args.dir))
        image_size = parse_size(args.size)
        # Room for pmemfs's image and the other daemons' file of the same size, with slack.
        tmpfs_dir = cleanup.enter_context(private_tmpfs(workdir, 2 * image_size))
        image_dir, shared_files = os.path.join(tmpfs_dir, "pmemfs"), os.path.join(tmpfs_dir, "files")
        os.mkdir(image_dir)
        os.mkdir(shared_files)
        image = os.path.join(image_dir, "bench.img")
        created = json.loads(pmemfs("create", image, "--size", args.size))
        data_size = created["size"]
        disk = Target(os.path.join(workdir, HOST_DISK_FILE), 0, data_size)
        for target in (disk, Target(os.path.join(shared_files, "data"), 0, data_size)):
            prefill(target.filename, target.offset, target.size)
        with pmemfs_target(workdir, image, [], where) as target:
            prefill(target.filename, target.offset, target.size)
        all_columns = columns(workdir, image, disk, shared_files, passthrough_hp, where)
        all_columns = [column for column in all_columns if _chosen(column.name, args.columns)]
        results = run_matrix(all_columns, jobs, args.passes, args.runtime, where, started)
    registry = registry_microbench(args.registry_repetitions)
    with work_directory(args.dir) as workdir:
        scale = scale_run(workdir, args.scale_size, where)
    elapsed_s = time.monotonic() - started

    machine = machine_info(where)
    notes.append(
        "mmap jobs are buffered loads and stores through a MAP_SHARED mapping: pmemfs columns map dax0, "
        "every other column the same file as its other jobs"
    )
    if args.passes < DEFAULT_PASSES:
        notes.append(f"{args.passes} pass(es): too few for a spread, so no ratio can be called met")
    print(
        f"\nfio direct=1, {args.size} image ({_size(data_size)} served by every target, every FUSE daemon's bytes "
        f"on one tmpfs), {args.runtime:g} s per job after a {RAMP_S:g} s ramp, median (min-max) of {args.passes} "
        f"passes in rotating order; {machine['cpus']} CPUs {machine['cpu_model']}, "
        f"kernel {machine['kernel']}, libfuse {machine['libfuse']}, pyfuse3 {machine['pyfuse3']}; {where.description}\n"
    )
    print_table(results, jobs, [column.name for column in all_columns])
    print_daemon_cpu(results, jobs, [column.name for column in all_columns])
    print()
    for note in notes:
        print(f"Note: {note}.")
    print_registry(registry, args.registry_repetitions)
    print_scale(scale)
    print(f"\nelapsed: {elapsed_s:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "size": args.size,
                    "served_bytes": data_size,
                    "runtime_s": args.runtime,
                    "ramp_s": RAMP_S,
                    "passes": args.passes,
                    "notes": notes,
                    "results": medians_of(results),
                    "passes_results": results,
                    "registry": registry,
                    "scale": scale,
                    "elapsed_s": elapsed_s,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
