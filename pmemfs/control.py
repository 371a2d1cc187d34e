"""The ``.pmemfs/`` control files: what each one shows, rendered as a snapshot when it is opened."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ControlFile:
    name: str
    render: Callable[[], bytes]


def loop_devices_for(path: str) -> list[str]:
    """The loop devices whose backing file is ``path`` (as the kernel reports it in sysfs)."""
    devices = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                if f.read().strip().removesuffix(" (deleted)") == path:
                    devices.append("/dev/" + backing.split("/")[3])
        except OSError:
            continue
    return sorted(devices)


def render_json(snapshot: dict[str, object]) -> bytes:
    return (json.dumps(snapshot, indent=2) + "\n").encode()


def daemon_identity(mountpoint: str) -> dict[str, object]:
    return {"mountpoint": mountpoint, "pid": os.getpid()}
