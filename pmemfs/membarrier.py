"""A memory barrier in every serving process at once: membarrier(2).

Two processes that each store to one shared cell and then load the other's (a transfer pins its
page then looks for a zero under way; a zero publishes its range then looks for pinned pages) can
both miss the other's store on x86, where a load may pass an earlier store. Putting a barrier on
both sides would cost every transfer; membarrier puts it on the rare side only: once it returns,
every other running thread has passed a full barrier since the call began.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("pmemfs")

_SYSCALL = {"x86_64": 324, "aarch64": 283, "ppc64le": 365, "s390x": 356, "riscv64": 283}.get(platform.machine())
CMD_GLOBAL = 1  # every thread of the system; costs a grace period (~10 ms)
CMD_GLOBAL_EXPEDITED = 2  # the processes that registered for it; microseconds
CMD_REGISTER_GLOBAL_EXPEDITED = 4
_libc = ctypes.CDLL(None, use_errno=True)
_warned = False


def _membarrier(command: int) -> bool:
    return _SYSCALL is not None and _libc.syscall(_SYSCALL, command, 0) == 0


def register() -> None:
    """Let ``barrier()`` reach this process the fast way; done by each serving process (not inherited by fork)."""
    _membarrier(CMD_REGISTER_GLOBAL_EXPEDITED)


def barrier() -> None:
    """A full memory barrier in every serving process before this returns (see the module's doc)."""
    global _warned
    if _membarrier(CMD_GLOBAL_EXPEDITED) or _membarrier(CMD_GLOBAL):
        return
    if not _warned:
        _warned = True
        log.warning("membarrier(2) is unavailable: a zero racing an O_DIRECT transfer is not excluded")
