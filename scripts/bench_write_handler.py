#!/usr/bin/env python3
"""What the write (or read) handler costs per request, in process: no mount, no FUSE, no other process.

Builds the daemon's objects as ``daemon.run`` does (region, registry, badblocks, sessions, tree)
over a temporary image and calls ``PmemOperations.write`` (``--read``: ``read``) directly, as the
serving loop does, for 4 KiB O_DIRECT requests into pages already allocated. Run it with one checkout's package on
PYTHONPATH, then another's, to compare them in one sitting:

    PYTHONPATH=/path/to/main python scripts/bench_write_handler.py
    PYTHONPATH=. python scripts/bench_write_handler.py [--log-writes]

``--log-writes`` measures a mount recording a write log (logwrites.py) for comparison. Prints the
median and the best of ``--rounds`` rounds of ``--writes`` writes, in ns per write (on a shared
machine the best round is the steadier figure).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--log-writes", action="store_true")
    parser.add_argument("--read", action="store_true", help="time the read handler instead")
    args = parser.parse_args()

    import pmemfs
    from pmemfs.badblocks import BadBlocks
    from pmemfs.fs import PMEM0_INODE, PmemOperations
    from pmemfs.memmap import open_registry
    from pmemfs.region import Region
    from pmemfs.sessions import PinSessions

    with tempfile.TemporaryDirectory() as workdir:
        image = os.path.join(workdir, "pmem.img")
        subprocess.run([sys.executable, "-m", "pmemfs", "create", image, "--size", "64M", "--map", "mem"],
                       check=True, capture_output=True)  # fmt: skip
        region = Region.open(image)
        registry, _ = open_registry(region, previous_epoch=0, epoch=1, shared=region.shared)
        badblocks = BadBlocks(region.data_size // 512, region.badblock_store(), region.shared)
        extra: dict[str, object] = {}
        write_log = None
        if args.log_writes:
            from pmemfs.logwrites import WriteLog

            write_log = WriteLog.create(os.path.join(workdir, "w.log"), region, region.shared, 1 << 40)
            extra["write_log"] = write_log
        sessions = PinSessions(registry, region, badblocks, **extra)  # type: ignore[arg-type]
        ops = PmemOperations(region, registry, badblocks, sessions, [], **extra)  # type: ignore[arg-type]
        fh = ops._new_fh(PMEM0_INODE, True, os.getpid())
        buf = b"x" * 4096
        pages = 256
        for page in range(pages):  # allocate them first: the steady state is a store through the mapping
            region.write(page * 4096, buf)
        write, read = ops.write, ops.read
        per_write = []
        for _ in range(args.rounds):
            start = time.perf_counter_ns()
            for n in range(args.writes):
                coroutine = read(fh, (n % pages) * 4096, 4096) if args.read else write(fh, (n % pages) * 4096, buf)
                try:
                    coroutine.send(None)
                except StopIteration:
                    pass
                registry.end_transfer()  # what the serving loop does once the reply is out
            per_write.append((time.perf_counter_ns() - start) / args.writes)
        if write_log is not None:
            write_log.close(clean=False)
        region.close(clean=False)
    print(
        f"{os.path.dirname(pmemfs.__file__)}: {'with' if args.log_writes else 'no'} write log: "
        f"median {statistics.median(per_write):.0f} ns, best {min(per_write):.0f} ns per 4 KiB "
        f"{'read' if args.read else 'write'} "
        f"(rounds: {', '.join(f'{t:.0f}' for t in per_write)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
