#!/usr/bin/env python3
"""How long a writer into a range stalls while `pmemfs zero` clears it, with gigabytes of the image dirty.

A transfer into pages being zeroed waits for the zero. If the zero's exclusive window held the
flush of the whole image (fdatasync, with --dirty bytes not yet written back), that wait is the
flush's length; with the flush outside the window it is the punch's. One run mounts an image,
dirties --dirty bytes of it through pmem0 (O_DIRECT stores into the image's page cache, outside
the zeroed range), starts a writer doing 4 KiB O_DIRECT writes into the range in a loop, zeroes
the range, and prints the writer's longest write and the zero's duration.

Compare checkouts in one sitting with --pmemfs-from DIR (a checkout whose pmemfs/ to run). The
kernel throttles writers at vm.dirty_ratio (2 GiB dirty on a 24 GiB machine): as root,
--dirty-ratio raises it (and the background ratio) for the run and puts both back afterwards.
"""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dirty_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dirty", default=3 << 30, type=int, help="bytes to dirty before zeroing (default 3 GiB)")
    parser.add_argument("--dir", default=os.path.join(ROOT, "build"), help="where the scratch image lives")
    parser.add_argument("--pmemfs-from", default=ROOT, help="the checkout whose pmemfs to run (default: this one)")
    parser.add_argument("--dirty-ratio", type=int, help="vm.dirty_ratio for the run (root; restored afterwards)")
    args = parser.parse_args()
    if args.dirty_ratio is None:
        return measure(args)
    knobs = {"/proc/sys/vm/dirty_ratio": args.dirty_ratio, "/proc/sys/vm/dirty_background_ratio": args.dirty_ratio - 5}
    saved = {path: open(path).read() for path in knobs}
    try:
        for path, value in knobs.items():
            with open(path, "w") as knob:
                knob.write(str(value))
        return measure(args)
    finally:
        for path, value in saved.items():
            with open(path, "w") as knob:
                knob.write(value)


def measure(args: argparse.Namespace) -> int:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.pmemfs_from)}
    pmemfs = [sys.executable, "-m", "pmemfs"]

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(pmemfs + list(command), check=True, capture_output=True, text=True, env=env, cwd="/")

    os.makedirs(args.dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        image, mountpoint = os.path.join(workdir, "stall.img"), os.path.join(workdir, "mnt")
        os.mkdir(mountpoint)
        size = args.dirty + (1 << 30)
        run("create", image, "--size", str(size), "--map", "mem")
        run("mount", image, mountpoint)
        try:
            pmem0 = os.path.join(mountpoint, "pmem0")
            zero_offset, zero_length = 0, 1 << 20
            block = mmap.mmap(-1, 1 << 20)
            block.write(os.urandom(1 << 20))
            fd = os.open(pmem0, os.O_RDWR | os.O_DIRECT)
            try:
                for offset in range(1 << 30, 1 << 30 | args.dirty, 1 << 20):
                    os.pwritev(fd, [block], offset)
                dirty_at_zero = dirty_bytes()
                stop, longest = threading.Event(), [0.0]
                page = memoryview(block)[:4096]

                def writer() -> None:
                    offset = 0
                    while not stop.is_set():
                        started = time.perf_counter()
                        os.pwritev(fd, [page], zero_offset + offset)
                        longest[0] = max(longest[0], time.perf_counter() - started)
                        offset = (offset + 4096) % zero_length

                thread = threading.Thread(target=writer)
                thread.start()
                time.sleep(0.2)
                started = time.perf_counter()
                run("zero", mountpoint, "--offset", str(zero_offset), "--length", str(zero_length))
                zero_s = time.perf_counter() - started
                time.sleep(0.2)
                stop.set()
                thread.join()
            finally:
                os.close(fd)
        finally:
            run("umount", mountpoint, "--timeout", "120")
    print(f"pmemfs from {os.path.abspath(args.pmemfs_from)}")
    print(f"dirty in the page cache when zeroing: {dirty_at_zero / 2**30:.2f} GiB")
    print(f"pmemfs zero of {zero_length} bytes (the command, start to end): {zero_s:.2f} s")
    print(f"longest 4 KiB O_DIRECT write into the range meanwhile: {longest[0] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
