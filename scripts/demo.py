#!/usr/bin/env python3
"""`make run`: mount a 1 GiB region with the Python API, run a verifying fio job on pmem0, show status, unmount."""

from __future__ import annotations

import os
import subprocess
import sys

import pmemfs
from pmemfs.cli import format_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
IMAGE = os.path.join(BUILD, "pmem.img")
MOUNTPOINT = os.path.join(BUILD, "mnt")


def main() -> int:
    made = "reusing" if os.path.exists(IMAGE) else "creating"
    print(f"{made} {IMAGE} (1G), mounting it at {MOUNTPOINT}", flush=True)
    # The region is unmounted when the block is left, whatever fio did.
    with pmemfs.open_region(IMAGE, size="1G", directory=BUILD, mountpoint=MOUNTPOINT) as region:
        print(f"mounted (daemon pid {region.pid}, log {region.log})", flush=True)
        fio = [
            "fio", "--name=demo", f"--filename={region.pmem0}", "--rw=randwrite", "--bsrange=4k-128k",
            "--ioengine=libaio", "--iodepth=16", "--direct=1", "--size=256M", "--verify=crc32c",
            "--do_verify=1", "--group_reporting", "--verify_state_save=0",
        ]  # fmt: skip
        print("$ " + " ".join(fio), flush=True)
        subprocess.run(fio, check=True)
        print(format_status(region.status()))
        region.assert_balanced()  # every page fio's direct I/O pinned was released
    print(f"\nunmounted. The image stays at {IMAGE}; mount it again with: pmemfs mount {IMAGE} {MOUNTPOINT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
