#!/usr/bin/env python3
"""The project's benchmark: one fio matrix against pmemfs and references, side by side in one run.

Every target runs the same jobs (direct=1, time based) in alternating passes; the table shows the
median of the passes and each target's ratio to pmemfs's first serving mode. Not a test: speed is
measured here and written down in the README, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PMEMFS = [sys.executable, "-m", "pmemfs"]


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    engine: str
    iodepth: int

    def fio_args(self) -> list[str]:
        return [f"--rw={self.rw}", f"--bs={self.bs}", f"--ioengine={self.engine}", f"--iodepth={self.iodepth}"]


JOBS = [
    Job("4k randread QD1 psync", "randread", "4k", "psync", 1),
    Job("4k randwrite QD1 psync", "randwrite", "4k", "psync", 1),
    Job("4k randread QD16 libaio", "randread", "4k", "libaio", 16),
    Job("4k randwrite QD16 libaio", "randwrite", "4k", "libaio", 16),
    Job("1M read QD1 psync", "read", "1M", "psync", 1),
    Job("1M write QD1 psync", "write", "1M", "psync", 1),
]


@dataclass
class Target:
    """A file fio can run on, plus the byte range of it that stands for the device."""

    name: str
    filename: str
    offset: int
    size: int


def run_fio(target: Target, job: Job, runtime_s: float) -> dict[str, float]:
    command = [
        "fio", "--name=bench", "--output-format=json", f"--filename={target.filename}", "--direct=1",
        f"--offset={target.offset}", f"--size={target.size}", "--time_based", f"--runtime={runtime_s}",
        "--ramp_time=1", "--randrepeat=0", "--norandommap", *job.fio_args(),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    report = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    side = report["read"] if "read" in job.rw else report["write"]
    return {"iops": side["iops"], "bw_bytes": side["bw_bytes"], "lat_us": side["lat_ns"]["mean"] / 1000}


@contextlib.contextmanager
def pmemfs_target(workdir: str, image: str, *mount_args: str) -> Iterator[Target]:
    mountpoint = os.path.join(workdir, "mnt")
    os.makedirs(mountpoint, exist_ok=True)
    subprocess.run(PMEMFS + ["mount", image, mountpoint, *mount_args], check=True, capture_output=True)
    try:
        pmem0 = os.path.join(mountpoint, "pmem0")
        yield Target("pmemfs", pmem0, 0, os.stat(pmem0).st_size)
    finally:
        subprocess.run(PMEMFS + ["umount", mountpoint], check=True, capture_output=True)


@contextlib.contextmanager
def host_target(target: Target) -> Iterator[Target]:
    yield target


# Column name, how to set it up, and which jobs it runs. The registry-off column measures what the
# page registry's bookkeeping (a pin and an unpin per direct transfer) costs, on the 4k jobs.
def targets(workdir: str, image: str, host: Target) -> list[tuple[str, Callable[[], Any], Callable[[Job], bool]]]:
    return [
        ("pmemfs", lambda: pmemfs_target(workdir, image), lambda job: True),
        ("pmemfs, registry off", lambda: pmemfs_target(workdir, image, "--no-references"), lambda job: job.bs == "4k"),
        ("host file", lambda: host_target(host), lambda job: True),
    ]


def prefill(target: Target) -> None:
    """Write the whole range once so that reads hit allocated blocks on every target."""
    subprocess.run(
        ["fio", "--name=fill", f"--filename={target.filename}", "--rw=write", "--bs=1M", "--direct=1",
         f"--offset={target.offset}", f"--size={target.size}", "--ioengine=psync", "--output=/dev/null"],
        check=True,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument("--runtime", type=float, default=5, help="seconds per job and pass (default 5)")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--dir", default=os.path.join(ROOT, "build", "bench"), help="where the image lives")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    os.makedirs(args.dir, exist_ok=True)
    workdir = tempfile.mkdtemp(dir=args.dir)
    image = os.path.join(workdir, "bench.img")
    created = json.loads(
        subprocess.run(
            PMEMFS + ["create", image, "--size", args.size], check=True, capture_output=True, text=True
        ).stdout
    )
    host = Target("host file", image, created["dataoff"], created["size"])
    # The host column reads the image file with O_DIRECT, so it measures the host's disk; pmemfs
    # serves the same bytes from its shared mapping (the page cache).

    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    started = time.monotonic()
    try:
        with pmemfs_target(workdir, image) as target:
            prefill(target)
        for pass_no in range(args.passes):
            for job in JOBS:
                for name, setup, runs in targets(workdir, image, host):
                    if runs(job):
                        with setup() as target:
                            result = run_fio(target, job, args.runtime)
                        results.setdefault(job.name, {}).setdefault(name, []).append(result)
            print(f"pass {pass_no + 1}/{args.passes} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    finally:
        os.unlink(image)
        os.rmdir(os.path.join(workdir, "mnt"))
        os.rmdir(workdir)

    medians = {
        job: {target: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for target, runs in by_target.items()}
        for job, by_target in results.items()
    }
    machine = (
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, kernel {platform.release()}, unpinned"
    )
    print(f"\nfio direct=1, {args.size} image, {args.runtime:g} s per job, median of {args.passes} passes; {machine}\n")
    print("| job | pmemfs | host file | pmemfs / host | pmemfs, registry off | registry overhead |")
    print("|---|---|---|---|---|---|")
    for job in JOBS:
        row = medians[job.name]
        ours, theirs = row["pmemfs"], row["host file"]
        cells = [job.name, _fmt(job, ours), _fmt(job, theirs), f"{ours['iops'] / theirs['iops']:.2f}x"]
        if "pmemfs, registry off" in row:
            off = row["pmemfs, registry off"]
            cells += [_fmt(job, off), f"{(1 - ours['iops'] / off['iops']) * 100:+.1f} %"]
        else:
            cells += ["", ""]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": machine, "size": args.size, "runtime_s": args.runtime, "results": medians}, f, indent=2
            )
    return 0


def _fmt(job: Job, result: dict[str, float]) -> str:
    if job.bs == "4k":
        return f"{result['iops'] / 1000:.1f}k IOPS"
    return f"{result['bw_bytes'] / 1e9:.2f} GB/s"


if __name__ == "__main__":
    sys.exit(main())
