"""The public Python API: mount a region for a program or a test, drive it, always unmount it.

    with pmemfs.open_region(size="256M") as region:       # a fresh image in a temporary directory
        fd = os.open(region.pmem0, os.O_RDWR | os.O_DIRECT)
        ...
        region.inject_error(block=8, count=1)
        with region.pin("dax0", 0, 1 << 20, longterm=True):
            ...
        region.kill()                                      # kill -9 of every daemon process
        region.remount()
        region.crash()                                     # a power cut: unflushed dax0 stores are lost
        region.remount()
        region.assert_balanced()

The region's life cycle (image, daemon, mount, crash, remount) over :mod:`pmemfs.client`; what a
mount offers is :class:`pmemfs.mount.Mount`'s. Kept free of numpy, pyfuse3 and trio: ``import
pmemfs`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator

from . import client, owners
from .errors import MountError, PmemfsError, UsageError
from .mount import Mount
from .options import DEFAULT_SPIN_US, MAX_SPIN_US, MAX_WORKERS, default_workers
from .sizes import parse_size
from .writelog import DEFAULT_MAX_BYTES


def daemon_arguments(serve: str = "fast", workers: int | None = None, spin_us: int | None = None) -> tuple[str, ...]:
    """The daemon's serving options, checked (UsageError), with the CLI's defaults filled in."""
    if serve not in ("fast", "trio"):
        raise UsageError(f"serve must be 'fast' or 'trio', not {serve!r}")
    if serve == "trio" and workers not in (None, 1):
        raise UsageError("workers need the fast path: the trio loop serves from one process")
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"workers must be between 1 and {MAX_WORKERS}, not {workers}")
    spin_us = DEFAULT_SPIN_US if spin_us is None else spin_us
    if not 0 <= spin_us <= MAX_SPIN_US:
        raise UsageError(f"spin_us must be between 0 and {MAX_SPIN_US}, not {spin_us}")
    workers = workers or (default_workers() if serve == "fast" else 1)
    return ("--serve", serve, "--workers", str(workers), "--spin-us", str(spin_us))


def log_arguments(log_writes: str | os.PathLike[str] | None, log_writes_max: int | str) -> tuple[str, ...]:
    """The daemon's write-log options (``mount --log-writes``), or none."""
    if log_writes is None:
        return ()
    return ("--log-writes", os.path.abspath(log_writes), "--log-writes-max", str(_size(log_writes_max)))


class MountedRegion(Mount):
    """A region :func:`open_region` mounted and will unmount: a :class:`Mount` that can also crash
    (:meth:`crash`, :meth:`kill`) and come back (:meth:`remount`)."""

    def __init__(
        self, image: str, mountpoint: str, workdir: str, *, daemon_args: tuple[str, ...], remove_workdir: bool = False
    ) -> None:
        super().__init__(mountpoint)
        self.image = os.path.abspath(image)
        self.workdir = workdir
        self._remove_workdir = remove_workdir
        #: The daemon's log; it outlives the daemon, so a test can read what a crashed one said.
        self.log = os.path.join(workdir, "daemon.log")
        self._daemon_args = daemon_args
        self._daemon: subprocess.Popen[bytes] | None = None
        #: How long leaving the ``with`` block waits for page references to drain before it gives up.
        self.unmount_timeout_s = 30.0
        #: Trace every I/O transfer, in every mount of the region (a session held open for it).
        self.trace_io = False
        self._tracer: client.PinSession | None = None

    @property
    def mounted(self) -> bool:
        """True while a daemon of ours serves the region (False after :meth:`kill`)."""
        return self._daemon is not None

    @property
    def pid(self) -> int:
        """The daemon's pid (the parent of its serving processes)."""
        if self._daemon is None:
            raise MountError(f"{self.mountpoint}: the region is not mounted (killed; call remount())")
        return self._daemon.pid

    def _start(self, log_args: tuple[str, ...] = ()) -> None:
        """Mount, recording a write log when ``log_args`` say so: a log is never written over, so
        each mount is given its own (or none)."""
        self._daemon = client.spawn_daemon(
            self.image, self.mountpoint, log_path=self.log, daemon_args=self._daemon_args + log_args
        )
        if self.trace_io:
            try:
                self._tracer = client.PinSession(self.mountpoint)
                self._tracer.trace_io(True)
            except BaseException:
                self.kill()  # a region half set up is no region: nobody would unmount it
                raise

    def _drop_tracer(self) -> None:
        # Before an unmount, which a control file held open would make fail (EBUSY).
        if self._tracer is not None:
            with contextlib.suppress(OSError):  # on a dead mount the release fails too
                self._tracer.close()
            self._tracer = None

    def kill(self) -> list[int]:
        """kill -9 every process of the daemon, as a crash would, and clear the dead mount.

        What a write that returned stored survives (it is in the image's shared mapping); the next
        :meth:`remount` counts an unclean shutdown. Returns the pids killed.
        """
        return self._take_down(power_cut=False)

    def crash(self) -> list[int]:
        """A power cut (``pmemfs crash``): serving stops at once, requests in flight fail, nothing
        more reaches the image, and ``dax0`` stores never msync'd are lost. Every write
        acknowledged on ``pmem0`` and every flushed ``dax0`` store survives; a filesystem mounted
        from a loop device over ``pmem0`` goes with the power (unmounted lazily); the next
        :meth:`remount` counts an unclean shutdown; a write log ends at the last completed write.
        Returns the pids stopped."""
        return self._take_down(power_cut=True)

    def _take_down(self, *, power_cut: bool) -> list[int]:
        if self._daemon is None:
            raise MountError(f"{self.mountpoint}: the region is not mounted, there is no daemon to stop")
        daemon, self._daemon = self._daemon, None
        stop = client.power_cut if power_cut else client.kill_daemon
        killed = stop(self.image, self.mountpoint, daemon.pid)
        daemon.wait()
        self._drop_tracer()
        if power_cut:
            client.cleanup_after_power_cut(self.mountpoint)
        else:
            client.cleanup_dead_mount(self.mountpoint)
        return killed

    def remount(
        self, *, log_writes: str | os.PathLike[str] | None = None, log_writes_max: int | str = DEFAULT_MAX_BYTES
    ) -> None:
        """Unmount (cleanly, if a daemon serves) and mount the same image again, recording a new
        write log in ``log_writes`` if given."""
        if self._daemon is not None:
            self._unmount()
        self._start(log_arguments(log_writes, log_writes_max))

    def unmount(self, *, timeout_s: float = 30.0) -> str:
        """Unmount cleanly now (:meth:`remount` mounts again); raise, the mount still up, if busy."""
        if self._daemon is None:
            raise MountError(f"{self.mountpoint}: the region is not mounted")
        self._unmount(timeout_s)
        return f"unmounted {self.mountpoint}"

    def _unmount(self, timeout_s: float = 30.0) -> None:
        assert self._daemon is not None
        self._drop_tracer()
        # Someone may have unmounted it behind our back (pmemfs umount): then the daemon is exiting.
        if client.fuse_mount_entry(self.mountpoint):
            client.unmount(self.mountpoint, timeout_s=timeout_s)
        try:
            self._daemon.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise MountError(f"the daemon of {self.mountpoint} did not exit within {timeout_s:g} s") from None
        self._daemon = None

    def close(self, *, raise_errors: bool = True) -> None:
        """Unmount, whatever it takes. When a clean unmount fails (a file left open, a pin never
        released), kill the daemon, clear the mount, and raise MountError saying why."""
        try:
            if self._daemon is not None:
                try:
                    self._unmount(self.unmount_timeout_s)
                except PmemfsError as err:
                    self.kill()
                    if raise_errors:
                        raise MountError(
                            f"{err}\n(pmemfs could not unmount {self.mountpoint} cleanly, so it killed the daemon; "
                            "the image counts an unclean shutdown)"
                        ) from None
        finally:
            _release(self.workdir, self.mountpoint, self._remove_workdir)

    def __enter__(self) -> MountedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(raise_errors=exc[0] is None)

    def __repr__(self) -> str:
        return f"<MountedRegion {self.image} at {self.mountpoint}{'' if self.mounted else ' (not mounted)'}>"


def _release(workdir: str, mountpoint: str, remove: bool) -> None:
    """Drop the claim on a region and (``remove``) its temporary directory, once nothing is mounted:
    a region still mounted (an interrupted unmount) keeps its claim for the next run's sweep, and
    rmtree must never go on into a mount."""
    if client.fuse_mount_entry(mountpoint):
        return
    owners.release(workdir)
    if remove and not client.fuse_mounts_under(workdir):
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def _size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    try:
        return parse_size(size)
    except ValueError as err:
        raise UsageError(str(err)) from None


@contextlib.contextmanager
def open_region(
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
) -> Iterator[MountedRegion]:
    """Mount a region for the ``with`` block and unmount it on the way out, whatever happened.

    ``image``: the image to serve; None makes a fresh one. An image that does not exist yet is
    created with ``size``, ``mode`` (fsdax/devdax), ``map`` (dev/mem) and ``align``; an existing
    one is served as it is. ``directory``: where the fresh image, the mountpoint (``mnt``) and the
    daemon's log (``daemon.log``) go, kept afterwards; by default a temporary directory, removed
    afterwards. ``workers``, ``serve``, ``spin_us``: as ``pmemfs mount`` takes them. ``trace_io``:
    :meth:`~Mount.trace` shows every I/O transfer too, not only pins and sessions (a control file is
    held open for it, so an unmount by anyone but the handle is refused as busy). ``log_writes``:
    record the first mount's writes, flushes and marks in this dm-log-writes log (``pmemfs mount
    --log-writes``), up to ``log_writes_max`` bytes.

    Leaving the block unmounts as ``pmemfs umount`` does, waiting up to ``unmount_timeout_s`` for
    page references to drain; if that fails (a file still open, a pin never released) the daemon is
    killed instead and, unless the block raised, MountError says why.
    """
    daemon_args = daemon_arguments(serve, workers, spin_us)
    workdir = os.path.abspath(directory) if directory is not None else None
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
    else:
        workdir = tempfile.mkdtemp(prefix="pmemfs-")
    owned_mountpoint = mountpoint is None
    try:
        image = os.path.join(workdir, "pmem.img") if image is None else os.fspath(image)
        if not os.path.exists(image):
            from .region import create_image  # numpy: only for those who create

            create_image(image, _size(size), mode=mode, map=map, align=_size(align), force=False)
        mountpoint = os.path.join(workdir, "mnt") if mountpoint is None else os.fspath(mountpoint)
        os.makedirs(mountpoint, exist_ok=True)
        region = MountedRegion(image, mountpoint, workdir, daemon_args=daemon_args, remove_workdir=directory is None)
        region.unmount_timeout_s, region.trace_io = unmount_timeout_s, trace_io
        if owned_mountpoint:
            # Before the mount: a run killed at any point leaves nothing that the next run's sweep
            # (pmemfs.owners) cannot recognise as an orphan.
            owners.claim(workdir, region.image, region.mountpoint)
        region._start(log_arguments(log_writes, log_writes_max))
    except BaseException:
        _release(workdir, os.path.join(workdir, "mnt"), directory is None)
        raise
    with region:
        yield region
