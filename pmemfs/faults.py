"""Faults injected on purpose, to test the daemon's error boundary through a real mount.

``PMEMFS_FAULTS="region.flush=OSError,region.read=MemoryError,registry.statistics=RuntimeError"``
in the daemon's environment makes each named method of a daemon collaborator raise that exception
the first time the daemon calls it (in whichever serving process: two racing may both fail); the
calls after that go through. Unset (as always outside the tests), nothing is touched.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
from collections.abc import Callable, Mapping
from typing import Any

from .errors import PmemfsError

log = logging.getLogger("pmemfs")
ENVIRONMENT = "PMEMFS_FAULTS"
EXCEPTIONS: dict[str, Callable[[], BaseException]] = {
    "OSError": lambda: OSError(errno.EIO, "injected I/O error"),
    "MemoryError": lambda: MemoryError("injected"),
    "RuntimeError": lambda: RuntimeError("injected bug"),
    "ValueError": lambda: ValueError("injected bad value"),
    # What pmemfs's own code raises for a filesystem that cannot punch holes (vfat, NFSv3).
    "EOPNOTSUPP": lambda: PmemfsError("injected: operation not supported", errno=errno.EOPNOTSUPP),
}


def install(collaborators: Mapping[str, object], spec: str | None = None) -> list[str]:
    """Arm the faults that ``spec`` (default: the environment) names; return what was armed."""
    spec = os.environ.get(ENVIRONMENT, "") if spec is None else spec
    items = [part.strip() for part in spec.split(",") if part.strip()]
    if not items:
        return []
    # A byte a fault, shared with the serving processes forked later: 1 once it has fired.
    fired = memoryview(mmap.mmap(-1, len(items), flags=mmap.MAP_SHARED))
    for index, item in enumerate(items):
        target, _, kind = item.partition("=")
        owner_name, _, method = target.partition(".")
        owner = collaborators.get(owner_name)
        if owner is None or not hasattr(owner, method) or kind not in EXCEPTIONS:
            raise ValueError(f"{ENVIRONMENT}: cannot inject {item!r}")
        setattr(owner, method, _failing_once(getattr(owner, method), EXCEPTIONS[kind], fired, index))
    log.warning("injecting faults (%s): %s", ENVIRONMENT, ", ".join(items))
    return items


def _failing_once(
    method: Callable[..., Any], make: Callable[[], BaseException], fired: memoryview, index: int
) -> Callable[..., Any]:
    @functools.wraps(method)
    def failing(*args: Any, **kwargs: Any) -> Any:
        if not fired[index]:
            fired[index] = 1
            raise make()
        return method(*args, **kwargs)

    return failing
