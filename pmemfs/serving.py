"""How requests are served: pyfuse3's trio loop, or a blocking loop with no event loop on the data path.

pyfuse3 reaches its async library through one module attribute (the slot that
``pyfuse3.asyncio.enable()`` fills). The fast path puts a backend there whose ``wait_readable``
returns at once, which turns pyfuse3's session loop into a plain read -> dispatch -> reply loop:
no scheduler pass, no epoll re-arm, no lock hand-off per request. That holds only while no
handler ever really awaits, which is true of every pmemfs handler. In a worker process the
backend's ``wait_readable`` goes further: it runs the compiled lane (lane.pyx), which serves reads
and writes itself and returns only with a request for pyfuse3. This module knows nothing of pmem.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import logging
import os
import signal
import socket
import struct
import sys
import types
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from .lane import DeviceClosed, Lane, Spinner
from .options import DEFAULT_SPIN_US, MAX_WORKERS, default_workers  # noqa: F401  (re-exported)

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


@dataclasses.dataclass(frozen=True)
class LaneHandlers:
    """The synchronous cores of the read and write handlers, for the serving processes' lane."""

    read: Callable[[int, int, int], Any]
    write: Callable[[int, int, memoryview], int]


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

    def __init__(
        self,
        before_read: Callable[[], None],
        stop: Callable[[], bool] = lambda: False,
        spin_us: int = 0,
        lane: Lane | None = None,
    ) -> None:
        self.before_read = before_read
        self.stop = stop
        self.spin_ns = spin_us * 1000
        self.spin: Spinner | None = None
        self.lane = lane
        self.terminating = False
        self.session_fd = -1
        self.lowlevel = self
        self.from_thread = self
        self.Lock = _Lock
        self.open_nursery = _Nursery

    def current_trio_token(self) -> str:
        return "pmemfs-blocking"

    def current_task(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(name="pmemfs-serving")

    async def wait_readable(self, fd: int) -> None:
        self.session_fd = fd
        self.before_read()
        if self.lane is not None:
            # Reads and writes are served in there; what comes back is a request for libfuse.
            try:
                self.lane.forward_replies()
                self.lane.serve()
            except DeviceClosed:
                raise _Closed from None
            return
        if self.spin_ns and not self.terminating:
            if self.spin is None:
                self.spin = Spinner(fd, self.spin_ns)
            self.spin.wait(self._terminating)
        if self.terminating or self.stop():
            raise _Closed

    def _terminating(self) -> bool:
        return self.terminating

    def notify_closing(self, fd: int) -> None:
        self.terminating = True


def _run_to_completion(coroutine: Any) -> None:
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("a request handler suspended: the blocking loop cannot serve it")


def serve_blocking(
    before_read: Callable[[], None],
    *,
    stop: Callable[[], bool] = lambda: False,
    handle_signals: bool = True,
    spin_us: int = 0,
    lane: Lane | None = None,
) -> BlockingBackend:
    """Serve the mounted session in this process with the blocking loop until it ends, or until
    ``stop()`` says so before the next read; poll ``spin_us`` after each reply (``lane.Spinner``).
    With a ``lane``, reads and writes are served by it and only the rest by pyfuse3."""
    backend = BlockingBackend(before_read, stop, spin_us, lane)

    def terminate(signum: int, frame: object) -> None:
        log.info("got %s, unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()

    previous = {sig: signal.signal(sig, terminate) for sig in TERMINATING_SIGNALS} if handle_signals else {}
    for sig in previous:
        # Let a signal interrupt the blocking read of /dev/fuse, so the loop sees it at once.
        signal.siginterrupt(sig, True)
    setattr(pyfuse3, BACKEND_SLOT, backend)
    try:
        _run_to_completion(pyfuse3.main(min_tasks=1, max_tasks=1))
    finally:
        setattr(pyfuse3, BACKEND_SLOT, trio)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return backend


# Worker processes. FUSE_INIT is answered before any fork (forking first made most requests fail
# with EIO); each worker then reads its own clone of the session's /dev/fuse fd, so the kernel
# fails a dead worker's pending requests instead of leaving them hanging. Only the parent
# unmounts and handles signals.
FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
PR_SET_PDEATHSIG = 1
POLL_S = 0.05


def _clone_device(session_fd: int) -> int:
    """A new fd on the session's connection (FUSE_DEV_IOC_CLONE): this process's own queue reader."""
    clone = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(clone, FUSE_DEV_IOC_CLONE, struct.pack("I", session_fd))
    return clone


def _lane_in_place_of(session_fd: int, handlers: LaneHandlers, after_reply: Callable[[], None], spin_us: int) -> Lane:
    """Read this process's requests from its own clone of the device, and put one end of a socket
    pair where libfuse expects the device (the session's fd number), for the requests it serves."""
    device = _clone_device(session_fd)
    ours, libfuses = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    os.dup2(libfuses.fileno(), session_fd, inheritable=False)
    libfuses.close()
    relay = ours.detach()
    return Lane(device, relay, handlers.read, handlers.write, after_reply, _errno_of, Spinner(device, spin_us * 1000))


# This process's lane, once it serves from one (a worker process).
_lane: Lane | None = None


def lane_counts() -> dict[str, int] | None:
    """What this process's lane served itself and relayed to libfuse, or None without a lane."""
    return None if _lane is None else _lane.counts()


def _errno_of(err: BaseException) -> int:
    """What a request answers for an exception out of a handler's core (it raises only FUSEError)."""
    return err.errno if isinstance(err, pyfuse3.FUSEError) else errno.EIO


def _worker_main(
    column: int,
    session_fd: int,
    handlers: LaneHandlers,
    before_read: Callable[[], None],
    become: Callable[[int], None],
    parent: int,
    signal_mask: set[int | signal.Signals],
    spin_us: int,
) -> None:
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in TERMINATING_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
        # A worker must not outlive its parent: nobody would unmount or mark the image clean.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            return  # the parent died before PDEATHSIG was armed
        become(column)
        # One spinner: a second would take the client's CPU too on a two-CPU machine (measured).
        global _lane
        _lane = _lane_in_place_of(session_fd, handlers, before_read, spin_us if column == 1 else 0)
        serve_blocking(before_read, handle_signals=False, lane=_lane)
        code = 0
    except BaseException:
        log.exception("serving process %d failed", column)
    finally:
        logging.shutdown()
        os._exit(code)


def serve_workers(
    nworkers: int,
    *,
    handlers: LaneHandlers,
    before_read: Callable[[], None],
    initialized: Callable[[], bool],
    become: Callable[[int], None],
    mountpoint: str,
    spin_us: int = 0,
) -> None:
    """Answer FUSE_INIT here, then serve from ``nworkers`` forked processes until unmounted.

    ``become(column)`` runs in each worker before it serves (it switches the registry to its own
    column). A worker that dies takes the mount down cleanly: lazy unmount, the others finish
    what they hold, the parent reaps them all.
    """
    nworkers = min(nworkers, MAX_WORKERS)
    # Until trio listens, a signal must wait rather than kill the parent half-way (a dead mount,
    # a dirty image): block them, and let each worker and then the supervisor unblock them.
    signal_mask = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING_SIGNALS)
    workers: dict[int, int] = {}
    try:
        backend = serve_blocking(before_read, stop=initialized, handle_signals=False)
        if not initialized():
            return  # unmounted before FUSE_INIT finished
        parent = os.getpid()
        for column in range(1, nworkers + 1):
            pid = os.fork()
            if pid == 0:
                _worker_main(column, backend.session_fd, handlers, before_read, become, parent, signal_mask, spin_us)
            workers[pid] = column
        log.info("serving from %d worker processes: %s", nworkers, sorted(workers))
        trio.run(_supervise, workers, mountpoint, signal_mask)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
        # Whatever went wrong here, no worker may go on serving an image about to be closed.
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


async def _supervise(workers: dict[int, int], mountpoint: str, signal_mask: set[int | signal.Signals]) -> None:
    going_down = False

    async def go_down(why: str) -> None:
        nonlocal going_down
        if going_down:
            return
        log.info("%s: unmounting", why)
        # Lazy: open files keep being served by the workers left until they are closed.
        result = await trio.run_process(["fusermount3", "-u", "-z", mountpoint], check=False, capture_stderr=True)
        if result.returncode == 0:
            going_down = True
        else:
            log.error("fusermount3 -u -z %s failed: %s", mountpoint, result.stderr.decode(errors="replace").strip())

    async with trio.open_nursery() as nursery:

        async def on_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(*TERMINATING_SIGNALS) as signals:
                task_status.started()
                async for signum in signals:
                    await go_down(f"got {signal.Signals(signum).name}")

        await nursery.start(on_signals)
        signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)  # trio listens now
        while workers:
            await trio.sleep(POLL_S)
            for pid, column in list(workers.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
                del workers[pid]
                if status:
                    log.error("serving process %d (pid %d) died: %s", column, pid, _describe(status))
                    await go_down("a serving process died")
        nursery.cancel_scope.cancel()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


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


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    """How the mount is served, decided once before anything is built: what ``status`` shows is
    what runs."""

    mode: str  # "fast" or "trio"
    workers: int
    spin_us: int

    def as_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "workers": self.workers, "spin_us": self.spin_us}


def plan(mode: str, workers: int = 1, spin_us: int = DEFAULT_SPIN_US) -> ServingPlan:
    """Serve with ``mode`` ("fast" or "trio"), from ``workers`` processes on the fast path; the trio
    loop in one process if the fast path is unavailable (logged)."""
    if mode == "fast":
        problem = fast_path_problem()
        if problem is None:
            return ServingPlan("fast", max(1, min(workers, MAX_WORKERS)), spin_us)
        log.warning("the fast data path is unavailable (%s): serving with the trio loop instead", problem)
    return ServingPlan("trio", 1, 0)


def serve(
    chosen: ServingPlan,
    before_read: Callable[[], None],
    handlers: LaneHandlers,
    *,
    initialized: Callable[[], bool] = lambda: True,
    become: Callable[[int], None] = lambda column: None,
    mountpoint: str = "",
) -> None:
    """Serve the mounted session as ``chosen`` says until it is unmounted. ``before_read`` runs
    each time a serving process is about to read the next request (the last reply is out)."""
    if chosen.mode == "trio":
        serve_trio(before_read)
    elif chosen.workers > 1:
        serve_workers(
            chosen.workers,
            handlers=handlers,
            before_read=before_read,
            initialized=initialized,
            become=become,
            mountpoint=mountpoint,
            spin_us=chosen.spin_us,
        )
    else:
        serve_blocking(before_read, spin_us=chosen.spin_us)
