#!/usr/bin/env python3
"""`make run`: create a 1 GiB region, mount it, run a verifying fio job on pmem0, show status, unmount."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
IMAGE = os.path.join(BUILD, "pmem.img")
MOUNTPOINT = os.path.join(BUILD, "mnt")
PMEMFS = [sys.executable, "-m", "pmemfs"]


def pmemfs(*args: str) -> None:
    print("$ pmemfs " + " ".join(args), flush=True)
    subprocess.run(PMEMFS + list(args), check=True)


def main() -> int:
    os.makedirs(MOUNTPOINT, exist_ok=True)
    if not os.path.exists(IMAGE):
        pmemfs("create", IMAGE, "--size", "1G")
    pmemfs("mount", IMAGE, MOUNTPOINT)
    try:
        fio = [
            "fio", "--name=demo", f"--filename={MOUNTPOINT}/pmem0", "--rw=randwrite", "--bsrange=4k-128k",
            "--ioengine=libaio", "--iodepth=16", "--direct=1", "--size=256M", "--verify=crc32c",
            "--do_verify=1", "--group_reporting", "--verify_state_save=0",
        ]  # fmt: skip
        print("$ " + " ".join(fio), flush=True)
        subprocess.run(fio, check=True)
        pmemfs("status", MOUNTPOINT)
    finally:
        pmemfs("umount", MOUNTPOINT)
    print(f"\nThe image stays at {IMAGE}; mount it again with: pmemfs mount {IMAGE} {MOUNTPOINT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
