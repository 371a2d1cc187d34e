"""pmemfs: a userspace persistent-memory emulator (PMEM ram disk, DAX view, page registry) over FUSE.

The public API: :func:`open_region` (and :func:`open_region_async` for trio code) mounts a region
and always unmounts it; :class:`Mount` drives any mount; the errors are :class:`PmemfsError` and
its subclasses. The pytest plugin (``pmemfs.pytest_plugin``) builds its fixtures on these.
"""

from __future__ import annotations

from .api import MountedRegion, open_region
from .errors import (
    CorruptImage,
    DeviceGone,
    ImageBusy,
    InvalidRange,
    LongtermNotSupported,
    MediaError,
    MountError,
    NoSpace,
    PageBusy,
    PmemfsError,
    UsageError,
)
from .mount import Mount, Pin

# typing.TYPE_CHECKING would load typing, a twentieth of the CLI's start-up; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .aio import AsyncMountedRegion, open_region_async

__version__ = "0.1.0"

__all__ = [
    "AsyncMountedRegion",
    "CorruptImage",
    "DeviceGone",
    "ImageBusy",
    "InvalidRange",
    "LongtermNotSupported",
    "MediaError",
    "Mount",
    "MountError",
    "MountedRegion",
    "NoSpace",
    "PageBusy",
    "Pin",
    "PmemfsError",
    "UsageError",
    "open_region",
    "open_region_async",
]


def __getattr__(name: str) -> Any:
    # The trio flavour loads trio: only for those who ask for it, so that the CLI starts fast.
    if name in ("AsyncMountedRegion", "open_region_async"):
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'pmemfs' has no attribute {name!r}")
