"""How requests are served: pyfuse3's trio loop, or a blocking loop with no event loop on the data path.

pyfuse3 reaches its async library through one module attribute (the slot that
``pyfuse3.asyncio.enable()`` fills). The fast path puts a backend there whose ``wait_readable``
returns at once, which turns pyfuse3's session loop into a plain read -> dispatch -> reply loop:
no scheduler pass, no epoll re-arm, no lock hand-off per request. That holds only while no
handler ever really awaits, which is true of every pmemfs handler. This module knows nothing of
pmem.
"""

from __future__ import annotations

import logging
import signal
import sys
import types
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

log = logging.getLogger("pmemfs")

# The pyfuse3 release whose internals the fast path was written against, and its backend slot.
PYFUSE3_VERSION = "3.5.0"
BACKEND_SLOT = "trio"
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def fast_path_problem() -> str | None:
    """Why the fast path cannot be used with this pyfuse3, or None when it can."""
    version = getattr(pyfuse3, "__version__", "unknown")
    if version != PYFUSE3_VERSION:
        return f"pyfuse3 {version} is not the {PYFUSE3_VERSION} the fast path was built for"
    if getattr(pyfuse3, BACKEND_SLOT, None) is not sys.modules["trio"]:
        return f"pyfuse3 has no async backend slot named {BACKEND_SLOT!r} holding trio"
    return None


class _Closed(Exception):
    """What the backend's ``wait_readable`` raises once the session is terminating."""


class _Lock:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Nursery:
    """Runs each task to completion in turn: with max_tasks=1 pyfuse3 starts exactly one."""

    def __init__(self) -> None:
        self._tasks: list[Any] = []

    async def __aenter__(self) -> _Nursery:
        return self

    def start_soon(self, func: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        self._tasks.append(func(*args))

    async def __aexit__(self, *exc: object) -> None:
        while self._tasks:
            await self._tasks.pop(0)


class BlockingBackend:
    """A stand-in for trio in pyfuse3's slot, under which nothing ever suspends.

    ``before_read`` runs each time the session loop is about to read the next request: the reply
    to the previous one has been sent by then.
    """

    ClosedResourceError = _Closed

    def __init__(self, before_read: Callable[[], None]) -> None:
        self.before_read = before_read
        self.terminating = False
        self.lowlevel = self
        self.from_thread = self
        self.Lock = _Lock
        self.open_nursery = _Nursery

    def current_trio_token(self) -> str:
        return "pmemfs-blocking"

    def current_task(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(name="pmemfs-serving")

    async def wait_readable(self, fd: int) -> None:
        self.before_read()
        if self.terminating:
            raise _Closed

    def notify_closing(self, fd: int) -> None:
        self.terminating = True


def _run_to_completion(coroutine: Any) -> None:
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("a request handler suspended: the blocking loop cannot serve it")


def serve_blocking(before_read: Callable[[], None]) -> None:
    """Serve the mounted session in this process with the blocking loop until it ends."""
    backend = BlockingBackend(before_read)

    def terminate(signum: int, frame: object) -> None:
        log.info("got %s, unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()

    previous = {sig: signal.signal(sig, terminate) for sig in TERMINATING_SIGNALS}
    for sig in TERMINATING_SIGNALS:
        # Let a signal interrupt the blocking read of /dev/fuse, so the loop sees it at once.
        signal.siginterrupt(sig, True)
    setattr(pyfuse3, BACKEND_SLOT, backend)
    try:
        _run_to_completion(pyfuse3.main(min_tasks=1, max_tasks=1))
    finally:
        setattr(pyfuse3, BACKEND_SLOT, trio)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _ReplyHook(trio.abc.Instrument):
    """Calls ``before_read`` when trio is about to wait for I/O: every runnable task, the session
    loop included, has gone as far as it can, so the last reply is out. A hook costs a method
    call, where a task woken per request cost half the IOPS."""

    def __init__(self, before_read: Callable[[], None]) -> None:
        self.before_read = before_read

    def before_io_wait(self, timeout: float) -> None:
        self.before_read()


def serve_trio(before_read: Callable[[], None]) -> None:
    """Serve the mounted session with pyfuse3's own trio loop (the classic path)."""

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signal)
            # Handlers never await, so one worker task serves every request with no lock hand-off.
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            nursery.cancel_scope.cancel()

    trio.run(serve, instruments=[_ReplyHook(before_read)])


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(*TERMINATING_SIGNALS) as signals:
        async for signum in signals:
            log.info("got %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def serve(mode: str, before_read: Callable[[], None]) -> str:
    """Serve with ``mode`` ("fast" or "trio"); fall back to trio if the fast path is unavailable.

    Returns the mode actually used.
    """
    if mode == "fast":
        problem = fast_path_problem()
        if problem is None:
            serve_blocking(before_read)
            return "fast"
        log.warning("the fast data path is unavailable (%s): serving with the trio loop instead", problem)
    serve_trio(before_read)
    return "trio"
