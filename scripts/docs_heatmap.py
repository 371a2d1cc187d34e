#!/usr/bin/env python3
"""`make docs`: the README's pictures, made from a scripted scenario into docs/_build/ (git-ignored).

A 1 GiB region; fio does direct random I/O on pmem0 for a few seconds while a client holds a
long-term pin on dax0 (an RDMA registration, say) and a short-term pin on pmem0, and one block is
poisoned. Meanwhile: `pmemfs top --once` (docs/_build/top.txt), `pmemfs pages --heatmap`
(docs/_build/heatmap.png and .svg) and `pmemfs trace --perfetto` (docs/_build/trace.json).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pmemfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "_build")
MiB = 1 << 20
FIO_SECONDS = 4


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pmemfs", *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"pmemfs {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed: apt-get install fio (make test installs it)")
    with pmemfs.open_region(size="1G", mode="fsdax") as region:
        fio = subprocess.Popen(
            ["fio", "--name=docs", f"--filename={region.pmem0}", "--rw=randrw", "--bs=4k", "--ioengine=libaio",
             "--iodepth=8", "--direct=1", "--size=256M", "--time_based", f"--runtime={FIO_SECONDS}",
             "--output=/dev/null"],
        )  # fmt: skip
        try:
            with (
                region.pin("dax0", 512 * MiB, 64 * MiB, longterm=True),
                region.pin("pmem0", 128 * MiB, 2 * MiB),
            ):
                region.inject_error(block=900 * MiB // 512, count=8)
                time.sleep(1.5)  # fio up to speed, the pins a little older
                top = cli("top", region.mountpoint, "--once", "--interval", "1")
                for name in ("heatmap.png", "heatmap.svg"):
                    print(cli("pages", region.mountpoint, "--heatmap", os.path.join(OUT, name)).strip())
                print(cli("trace", region.mountpoint, "--perfetto", os.path.join(OUT, "trace.json")).strip())
        finally:
            fio.wait()
        region.clear_errors()
    with open(os.path.join(OUT, "top.txt"), "w") as f:
        f.write(top)
    print(top)
    print(f"wrote {OUT}/top.txt; the README shows docs/_build/heatmap.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
