"""The Python API for trio code: ``open_region_async`` and a handle whose blocking calls run in threads.

    async with pmemfs.open_region_async(size="64M") as region:
        await region.inject_error(8)
        async with region.pin("dax0", 0, 4096, longterm=True):
            ...
        await region.assert_balanced()

Every call of :class:`pmemfs.MountedRegion` that waits (on the daemon, on a drain) runs in a worker
thread, so the event loop goes on; mounting and unmounting are shielded from cancellation, so a
cancelled task never leaves a region mounted.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .api import MountedRegion, open_region
from .mount import SETTLE_S, Pin
from .writelog import DEFAULT_MAX_BYTES

if TYPE_CHECKING:
    from .dax import DaxMapping

T = TypeVar("T")


async def _in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(functools.partial(function, *args, **kwargs))


@contextlib.asynccontextmanager
async def _in_threads(manager: AbstractContextManager[T]) -> AsyncIterator[T]:
    """Enter and exit a blocking context manager in worker threads, both shielded: a cancel while
    it is entered must not lose what it set up, nor one while it is left stop the clean-up."""
    with trio.CancelScope(shield=True):
        value = await trio.to_thread.run_sync(manager.__enter__)
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
        yield value
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            if not await trio.to_thread.run_sync(manager.__exit__, type(exc), exc, exc.__traceback__):
                raise
    else:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(manager.__exit__, None, None, None)


class AsyncMountedRegion:
    """:class:`pmemfs.MountedRegion` for trio code: the same attributes, and the same methods as
    coroutines (context managers as ``async with``). ``AsyncMountedRegion(region)`` wraps a region
    that was opened blocking (the ``pmem`` fixture, say)."""

    def __init__(self, region: MountedRegion) -> None:
        #: The blocking handle, for calls that do not wait (the paths) or code that runs in a thread.
        self.sync = region

    @property
    def mountpoint(self) -> str:
        return self.sync.mountpoint

    @property
    def image(self) -> str:
        return self.sync.image

    @property
    def pmem0(self) -> str:
        return self.sync.pmem0

    @property
    def dax0(self) -> str:
        return self.sync.dax0

    @property
    def log(self) -> str:
        return self.sync.log

    @property
    def mounted(self) -> bool:
        return self.sync.mounted

    @property
    def pid(self) -> int:
        return self.sync.pid

    async def status(self) -> dict[str, Any]:
        return await _in_thread(self.sync.status)

    async def pages(self) -> dict[str, Any]:
        return await _in_thread(self.sync.pages)

    async def trace(self) -> list[str]:
        return await _in_thread(self.sync.trace)

    async def badblocks(self) -> list[tuple[int, int]]:
        return await _in_thread(self.sync.badblocks)

    async def inject_error(self, block: int, count: int = 1) -> None:
        await _in_thread(self.sync.inject_error, block, count)

    async def uninject_error(self, block: int, count: int = 1) -> None:
        await _in_thread(self.sync.uninject_error, block, count)

    async def clear_errors(self) -> list[tuple[int, int]]:
        return await _in_thread(self.sync.clear_errors)

    async def zero(self, offset: int, length: int, *, timeout_s: float = 30.0) -> None:
        await _in_thread(self.sync.zero, offset, length, timeout_s=timeout_s)

    def pin(
        self, file: str, offset: int, length: int, *, longterm: bool = False
    ) -> contextlib.AbstractAsyncContextManager[Pin]:
        return _in_threads(self.sync.pin(file, offset, length, longterm=longterm))

    def tracing_io(self) -> contextlib.AbstractAsyncContextManager[None]:
        return _in_threads(self.sync.tracing_io())

    async def dax(
        self, offset: int = 0, length: int | None = None, *, allow_poison: bool = False, allocate: bool = True
    ) -> DaxMapping:
        return await _in_thread(self.sync.dax, offset, length, allow_poison=allow_poison, allocate=allocate)

    async def assert_no_pins(self, timeout_s: float = SETTLE_S) -> None:
        await _in_thread(self.sync.assert_no_pins, timeout_s)

    async def assert_balanced(self, timeout_s: float = SETTLE_S) -> None:
        await _in_thread(self.sync.assert_balanced, timeout_s)

    # A cancel while these run lets the thread finish (trio waits for it): never half a crash.
    async def kill(self) -> list[int]:
        return await _in_thread(self.sync.kill)

    async def crash(self) -> list[int]:
        return await _in_thread(self.sync.crash)

    async def mark(self, name: str) -> None:
        await _in_thread(self.sync.mark, name)

    async def remount(
        self, *, log_writes: str | os.PathLike[str] | None = None, log_writes_max: int | str = DEFAULT_MAX_BYTES
    ) -> None:
        await _in_thread(self.sync.remount, log_writes=log_writes, log_writes_max=log_writes_max)

    async def unmount(self, *, timeout_s: float = 30.0) -> str:
        return await _in_thread(self.sync.unmount, timeout_s=timeout_s)

    def __repr__(self) -> str:
        return f"<AsyncMountedRegion {self.image} at {self.mountpoint}>"


@contextlib.asynccontextmanager
async def open_region_async(
    image: str | os.PathLike[str] | None = None,
    size: int | str = "256M",
    mode: str = "fsdax",
    map: str = "dev",
    workers: int | None = None,
    *,
    directory: str | os.PathLike[str] | None = None,
    mountpoint: str | os.PathLike[str] | None = None,
    align: int | str = "2M",
    serve: str = "fast",
    spin_us: int | None = None,
    unmount_timeout_s: float = 30.0,
    trace_io: bool = False,
    log_writes: str | os.PathLike[str] | None = None,
    log_writes_max: int | str = DEFAULT_MAX_BYTES,
) -> AsyncIterator[AsyncMountedRegion]:
    """:func:`pmemfs.open_region` for trio code: ``async with``, the same arguments, an
    :class:`AsyncMountedRegion`. The region is unmounted on the way out even when the task is cancelled."""
    manager = open_region(
        image, size, mode, map, workers,
        directory=directory, mountpoint=mountpoint, align=align, serve=serve, spin_us=spin_us,
        unmount_timeout_s=unmount_timeout_s, trace_io=trace_io, log_writes=log_writes, log_writes_max=log_writes_max,
    )  # fmt: skip
    async with _in_threads(manager) as region:
        yield AsyncMountedRegion(region)
