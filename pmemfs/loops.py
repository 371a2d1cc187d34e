"""Which loop devices a file backs, as the kernel reports it in sysfs."""

from __future__ import annotations

import glob


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
