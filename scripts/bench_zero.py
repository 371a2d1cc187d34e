#!/usr/bin/env python3
"""Zeroing 1 GiB of pmem: one bulk operation and one flush, against page at a time with a flush each.

Before the seed's fix the kernel zeroed a range with one clear_pmem() and one flush per 4 KiB page;
pmemfs zeroes the whole range at once (whole pages go back to holes) and flushes once. Both run in
the same sitting on the same image, through the same Region code the daemon uses. Page at a time
is slow enough that, past --budget seconds, the rest is extrapolated from the pages done (and
the output says so).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pmemfs.infoblock import PAGE_SIZE, parse_size  # noqa: E402
from pmemfs.region import Region, create_image  # noqa: E402


def fill(region: Region, length: int) -> None:
    block = os.urandom(1 << 20)
    for offset in range(0, length, len(block)):
        region.write(offset, block[: min(len(block), length - offset)])
    region.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", default="1G", help="bytes to zero (default 1G)")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for page at a time before extrapolating")
    parser.add_argument("--dir", default=os.path.join(ROOT, "build"), help="where the scratch image lives")
    args = parser.parse_args()
    length = parse_size(args.length)

    os.makedirs(args.dir, exist_ok=True)
    workdir = tempfile.mkdtemp(dir=args.dir)
    try:
        create_image(
            os.path.join(workdir, "zero.img"), length + (64 << 20), mode="fsdax", map="mem", align=2 << 20, force=False
        )
        region = Region.open(os.path.join(workdir, "zero.img"))
        try:
            fill(region, length)
            start = time.perf_counter()
            region.zero(0, length)
            bulk_s = time.perf_counter() - start
            assert not region.data[:length].any()
            allocated_after_bulk = region.allocated_bytes()

            fill(region, length)
            zeros = bytes(PAGE_SIZE)
            pages = length // PAGE_SIZE
            done = 0
            start = time.perf_counter()
            deadline = start + args.budget
            while done < pages and time.perf_counter() < deadline:
                region.write(done * PAGE_SIZE, zeros)
                region.flush()
                done += 1
            paged_s = (time.perf_counter() - start) * pages / done
        finally:
            region.close(clean=True)
    finally:
        shutil.rmtree(workdir)

    how = "measured" if done == pages else f"extrapolated from {done} of {pages} pages ({args.budget:g} s budget)"
    print(f"zeroing {args.length} of a pmemfs image on {os.uname().release}, {os.cpu_count()} CPUs")
    print("| method | time | throughput |")
    print("|---|---|---|")
    print(f"| one bulk operation, one flush | {bulk_s * 1000:.1f} ms | {length / bulk_s / 1e9:.1f} GB/s |")
    print(f"| page at a time, a flush each ({how}) | {paged_s:.1f} s | {length / paged_s / 1e6:.1f} MB/s |")
    print(f"bulk is {paged_s / bulk_s:,.0f}x faster; allocated after: {allocated_after_bulk >> 20} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
