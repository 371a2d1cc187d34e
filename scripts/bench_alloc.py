#!/usr/bin/env python3
"""What allocating the image a page at a time costs, and reading holes without the mapping.

Two checkouts side by side in one sitting (--before and --after, each a directory whose pmemfs/
runs), interleaved passes, the median shown. Each job gets a fresh sparse image, so a write lands
in a page allocated or not yet allocated as a real run on a new image would; "written" jobs run on
an image that fio filled first. After each job on a fresh image the table gives what the image
allocated per byte written (a page at a time: about 1; 2 MiB at a time: up to 512).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = [
    # name, fio arguments, whether the image is filled first
    ("4k randwrite QD1 psync, new image", ["--rw=randwrite", "--bs=4k", "--ioengine=psync", "--iodepth=1"], False),
    ("4k randwrite QD16 libaio, new image", ["--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=16"], False),
    ("4k randwrite QD16 libaio, written", ["--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=16"], True),
    ("4k randread QD16 libaio, holes", ["--rw=randread", "--bs=4k", "--ioengine=libaio", "--iodepth=16"], False),
    ("4k randread QD16 libaio, written", ["--rw=randread", "--bs=4k", "--ioengine=libaio", "--iodepth=16"], True),
    ("1M read QD4 libaio, holes", ["--rw=read", "--bs=1M", "--ioengine=libaio", "--iodepth=4"], False),
    ("1M write QD4 libaio, new image", ["--rw=write", "--bs=1M", "--ioengine=libaio", "--iodepth=4"], False),
]


def fio(filename: str, args: list[str], runtime_s: int | None) -> dict:
    command = ["fio", "--name=alloc", "--output-format=json", f"--filename={filename}", "--direct=1", "--size=1G"]
    if runtime_s:
        command += ["--time_based", f"--runtime={runtime_s}", "--ramp_time=1"]
    command += ["--randrepeat=0", *args]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return {"iops": job["read"]["iops"] + job["write"]["iops"], "bytes": job["write"]["io_bytes"]}


def run_job(checkout: str, workdir: str, job: tuple[str, list[str], bool], runtime_s: int) -> dict:
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": checkout}
    image, mountpoint = os.path.join(workdir, "alloc.img"), os.path.join(workdir, "mnt")
    os.makedirs(mountpoint, exist_ok=True)

    def pmemfs(*args: str) -> None:
        command = [sys.executable, "-m", "pmemfs", *args]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/")
        if result.returncode:
            raise SystemExit(f"pmemfs {' '.join(args)} ({checkout}): {result.stderr.strip()}")

    pmemfs("create", image, "--size", "1100M", "--force")
    pmemfs("mount", image, mountpoint)
    try:
        pmem0 = os.path.join(mountpoint, "pmem0")
        name, args, filled = job
        if filled:
            fio(pmem0, ["--rw=write", "--bs=1M", "--ioengine=psync"], None)
        before = os.stat(image).st_blocks * 512
        result = fio(pmem0, args, runtime_s)
        result["allocated"] = os.stat(image).st_blocks * 512 - before
        return result
    finally:
        pmemfs("umount", mountpoint)
        os.unlink(image)
        print(f"{job[0]}, {checkout}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="checkout to compare against (e.g. a git worktree)")
    parser.add_argument("--after", default=ROOT, help="checkout under test (default: this one)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=2, help="seconds per job and pass (after a 1 s ramp)")
    parser.add_argument("--dir", default=os.path.join(ROOT, "build"), help="where the scratch image lives")
    args = parser.parse_args()
    checkouts = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    results: dict[tuple[str, str], list[dict]] = {}
    os.makedirs(args.dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        for n in range(args.passes):
            order = list(checkouts.items()) if n % 2 == 0 else list(reversed(checkouts.items()))
            for job in JOBS:
                for label, checkout in order:
                    results.setdefault((job[0], label), []).append(run_job(checkout, workdir, job, args.runtime))
    print(f"before: {checkouts['before']}\nafter:  {checkouts['after']}\n")
    print("| job | before IOPS | after IOPS | after / before | allocated per byte written, before | after |")
    print("|---|---|---|---|---|---|")
    for name, *_ in JOBS:
        row = []
        for label in ("before", "after"):
            runs = results[(name, label)]
            iops = statistics.median(r["iops"] for r in runs)
            written = sum(r["bytes"] for r in runs)
            allocated = sum(r["allocated"] for r in runs)
            row.append((iops, allocated / written if written else None))
        ratio = row[1][0] / row[0][0] if row[0][0] else float("nan")
        amplification = " | ".join(f"{a:.1f}" if a is not None else "-" for _, a in row)
        print(f"| {name} | {row[0][0] / 1000:.1f}k | {row[1][0] / 1000:.1f}k | {ratio:.2f}x | {amplification} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
