"""Who mounted a region that the Python API made: a claim beside its mountpoint.

A process that dies without unmounting (a test run killed by SIGKILL, a cancelled CI job) leaves
its daemon serving, since daemons run in their own session. The claim lets a later run tell such an
orphan (its owner is gone) from a region another live process is using, and take only the orphan
down. A pid alone could have been reused by then: the claim also holds the process's start time.
"""

from __future__ import annotations

import contextlib
import json
import os

from . import client
from .errors import PmemfsError

CLAIM = "owner.json"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def claim(workdir: str, image: str, mountpoint: str) -> None:
    """Record this process as the owner of the region mounted at ``mountpoint`` (in ``workdir``)."""
    record = {"pid": os.getpid(), "start": _start_time(os.getpid()), "image": image, "mountpoint": mountpoint}
    partial = os.path.join(workdir, f".{CLAIM}.{os.getpid()}")
    with open(partial, "w") as f:
        json.dump(record, f)
    os.replace(partial, os.path.join(workdir, CLAIM))  # whole or absent, whenever we are killed


def release(workdir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(workdir, CLAIM))


def orphans(root: str) -> list[dict[str, object]]:
    """The claims of regions mounted under ``root`` whose owner process is gone."""
    found = []
    for mountpoint in client.fuse_mounts_under(root):
        try:
            with open(os.path.join(os.path.dirname(mountpoint), CLAIM)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue  # not a region of the API's: someone else's business
        if record.get("mountpoint") != mountpoint or not isinstance(record.get("start"), int):
            continue
        if _start_time(int(record["pid"])) != record["start"]:
            found.append(record)
    return found


def sweep(root: str, timeout_s: float = 5.0) -> list[str]:
    """Take down every orphaned region under ``root``: unmount it cleanly if it can be, else kill
    its daemon and clear the mount. Returns their mountpoints."""
    swept = []
    for record in orphans(root):
        mountpoint, image = str(record["mountpoint"]), str(record["image"])
        try:
            client.unmount(mountpoint, timeout_s=timeout_s)
        except PmemfsError:
            client.kill_daemon(image, mountpoint)
            client.cleanup_dead_mount(mountpoint)
        release(os.path.dirname(mountpoint))
        swept.append(mountpoint)
    return swept
