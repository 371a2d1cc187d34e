"""Client side of a mount: start a daemon and wait until it answers, read its status, unmount.

Everything here talks to the daemon only through the mount (``.pmemfs/status``) and to the
kernel through fusermount3 and losetup, so it works on a mount started by anyone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from .errors import MountError, PmemfsError
from .loops import loop_devices_for
from .writelog import MARK_MAX

# How long a starting daemon may go without a sign of progress before the CLI gives up on it.
MOUNT_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.02
# The kernel sends a file's release after its last close: how long a count of open files may lag
# behind the processes that had them open.
RELEASE_GRACE_S = 2.0
DATA_FILES = ("pmem0", "dax0")
# What the kernel answers on a FUSE mount whose daemon is gone (newer kernels say ECONNABORTED).
DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)
# progress(text, done, total): how long work tells the CLI how it goes (views/progress.py shows it).
Progress = Callable[..., None]


def print_progress(text: str, done: float | None = None, total: float | None = None) -> None:
    """Progress for callers that ask for none in particular (the Python API): a line on stderr."""
    print(f"pmemfs: {text}", file=sys.stderr, flush=True)


def no_progress(text: str, done: float | None = None, total: float | None = None) -> None:
    pass


def poll_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = POLL_INTERVAL_S) -> bool:
    """Call ``predicate`` until it is true (return True) or ``timeout_s`` has passed (return False).

    Every wait of the client is one of these: nothing in a daemon ever waits for a client.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def default_log_path(mountpoint: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.abspath(mountpoint)).strip("-")
    return os.path.join(tempfile.gettempdir(), f"pmemfs-{name}.log")


def fuse_mount_entry(mountpoint: str) -> str | None:
    """The filesystem type /proc/mounts gives for a FUSE mount at ``mountpoint``, else None."""
    target = os.path.abspath(mountpoint)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, where, fstype, *_ = line.split()
            if where.replace("\\040", " ") == target and fstype.startswith("fuse"):
                return fstype
    return None


def fuse_mounts_under(directory: str) -> list[str]:
    """The FUSE mountpoints inside ``directory`` (itself included)."""
    root = os.path.abspath(directory)
    with open("/proc/mounts") as mounts:
        targets = [(line.split()[1].replace("\\040", " "), line.split()[2]) for line in mounts]
    return [
        where for where, fstype in targets if fstype.startswith("fuse") and os.path.commonpath([root, where]) == root
    ]


def mount_is_dead(mountpoint: str) -> bool:
    # statfs always reaches the daemon; a stat could be answered from the kernel's attribute cache.
    try:
        os.statvfs(mountpoint)
    except OSError as err:
        return err.errno in DEAD_MOUNT_ERRNOS
    return False


def read_status(mountpoint: str) -> dict:
    return json.loads(read_control(mountpoint, "status"))


def read_pages(mountpoint: str) -> dict:
    return json.loads(read_control(mountpoint, "pages"))


def read_badblocks(mountpoint: str) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in read_control(mountpoint, "badblocks").splitlines()]  # type: ignore[misc]


def read_control(mountpoint: str, name: str) -> str:
    path = os.path.join(mountpoint, ".pmemfs", name)
    try:
        with open(path) as f:
            return f.read()
    except OSError as err:
        if err.errno in DEAD_MOUNT_ERRNOS:
            raise MountError(
                f"{mountpoint}: the pmemfs daemon has died: run `pmemfs umount {mountpoint}` to clean up"
            ) from None
        raise MountError(f"{mountpoint} is not a pmemfs mount ({err.strerror})") from None


def _check_mountpoint(mountpoint: str) -> None:
    if fuse_mount_entry(mountpoint):
        if not mount_is_dead(mountpoint):
            raise MountError(f"{mountpoint} is already mounted: unmount it first")
        # The daemon of this mount died (kill -9, OOM): its image lock went with it, so clear
        # the stale mount the way `pmemfs umount` would and carry on.
        print(f"pmemfs: cleaning up a dead mount at {mountpoint}", file=sys.stderr)
        cleanup_dead_mount(mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory: create it first")


def open_log(log_path: str, *, default: bool) -> int:
    """Open the daemon's log for appending, safely: never blocking (a FIFO), never anything but a
    regular file, created 0600. The default path is a predictable name in a shared directory, so
    there a symbolic link is not followed and the file must be ours."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    flags |= os.O_NOFOLLOW if default else 0
    hint = "remove it, or pass --log FILE" if default else "pass another --log FILE"
    try:
        fd = os.open(log_path, flags, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP and default:
            raise MountError(f"log file {log_path} is a symbolic link: pmemfs does not follow it ({hint})") from None
        raise MountError(f"cannot open log file {log_path}: {err.strerror} ({hint})") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif default and st.st_uid != os.geteuid():
        problem = f"belongs to another user (uid {st.st_uid})"
    if problem:
        os.close(fd)
        raise MountError(f"log file {log_path} {problem} ({hint})")
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.fchmod(fd, 0o600)  # the log names images and holders: the owner's business
    os.set_blocking(fd, True)
    return fd


def spawn_daemon(
    image: str,
    mountpoint: str,
    *,
    log_path: str | None = None,
    debug: bool = False,
    daemon_args: tuple[str, ...] = (),
    progress: Progress = print_progress,
) -> subprocess.Popen[bytes]:
    """Start a background daemon and return it once the mount answers requests.

    A caller that lives on after the mount (the Python API) keeps the process to reap it.
    """
    _check_mountpoint(mountpoint)
    default = log_path is None
    log_path = os.path.abspath(log_path or default_log_path(mountpoint))
    log_fd = open_log(log_path, default=default)
    read_end, write_end = os.pipe()
    package_dir = os.path.dirname(os.path.abspath(__file__))
    # -P and cwd "/": nothing from the caller's working directory can shadow the package, and the
    # daemon runs the same pmemfs as this command (it checks --package-dir).
    command = [sys.executable, "-P", "-m", "pmemfs.daemon", os.path.abspath(image), os.path.abspath(mountpoint)]
    command += ["--ready-fd", str(write_end), "--log", log_path, "--package-dir", package_dir, *daemon_args]
    command += ["--debug"] if debug else []
    try:
        daemon = subprocess.Popen(
            command,
            pass_fds=[write_end],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            cwd="/",
        )
    finally:
        os.close(log_fd)
    os.close(write_end)
    try:
        try:
            failure = _read_until_eof(read_end, daemon, progress)
        finally:
            os.close(read_end)
        if failure:
            daemon.wait()
            raise MountError(failure)
        wait_until_answering(mountpoint, daemon)
    except BaseException:
        # A daemon nobody will talk to (it failed, did not answer, or we were interrupted while it
        # started) must not stay behind, nor a mount it made; its workers follow it (PR_SET_PDEATHSIG).
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait()
        if fuse_mount_entry(mountpoint) and mount_is_dead(mountpoint):  # ours, now dead; never another's
            cleanup_dead_mount(mountpoint)
        raise
    return daemon


def _read_until_eof(fd: int, daemon: subprocess.Popen, progress: Progress = print_progress) -> str:
    """The daemon's start-up failure (empty once it has mounted), reading its ready pipe to EOF.
    A daemon that says it is making progress (``progress ...`` lines) is waited for however long
    that takes; one silent for MOUNT_TIMEOUT_S is given up on."""
    received, message = b"", []
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], POLL_INTERVAL_S * 5)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        received += chunk
        *lines, received = received.split(b"\n")
        for line in lines + ([received] if not chunk else []):
            text = line.decode(errors="replace").strip()
            if text.startswith("progress "):
                deadline = time.monotonic() + MOUNT_TIMEOUT_S
                text = text.removeprefix("progress ")
                percent = re.search(r"(\d+)%$", text)
                progress(text, int(percent.group(1)) if percent else None, 100 if percent else None)
            elif text:
                message.append(text)
        if not chunk:
            return "\n".join(message)
    daemon.kill()
    return f"the daemon made no progress for {MOUNT_TIMEOUT_S:.0f} s and was stopped"


def wait_until_answering(
    mountpoint: str, daemon: subprocess.Popen | None = None, timeout_s: float = MOUNT_TIMEOUT_S
) -> None:
    """Poll until the mount's status file can be read (FUSE_INIT done), or the daemon exits."""
    status = os.path.join(mountpoint, ".pmemfs", "status")

    def daemon_exited() -> bool:
        return daemon is not None and daemon.poll() is not None

    if not poll_until(lambda: os.path.exists(status) or daemon_exited(), timeout_s):
        raise MountError(f"{mountpoint} did not answer within {timeout_s:.0f} s")
    if not os.path.exists(status):
        raise MountError(f"the daemon exited with status {daemon.returncode} before the mount answered")  # type: ignore[union-attr]


def attach_loop(mountpoint: str) -> str:
    pmem0 = os.path.join(os.path.abspath(mountpoint), "pmem0")
    result = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", pmem0], capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(f"losetup could not attach {pmem0}: {result.stderr.strip()}")
    return result.stdout.strip()


def _mounted_devices() -> dict[str, str]:
    with open("/proc/mounts") as mounts:
        return {line.split()[0]: line.split()[1] for line in mounts}


def detach_loops(mountpoint: str) -> list[str]:
    """Detach the loop devices over pmem0, refusing first if one is mounted or open: losetup -d of
    an open loop device succeeds and only detaches it at its last close, taking it from its user."""
    pmem0 = os.path.join(os.path.abspath(mountpoint), "pmem0")
    devices = loop_devices_for(pmem0)
    mounted = _mounted_devices()
    for device in devices:
        if device in mounted:
            raise MountError(f"{device} (over {pmem0}) is mounted at {mounted[device]}: unmount it first")
    users = processes_using_paths({device: os.path.basename(device) for device in devices})
    if users:
        raise MountError(f"{mountpoint} is busy: {'; '.join(users)}. Nothing was stopped: end or close those first")
    for device in devices:
        result = subprocess.run(["losetup", "-d", device], capture_output=True, text=True)
        if result.returncode != 0:
            raise MountError(f"losetup could not detach {device}: {result.stderr.strip()}")
    return devices


def cleanup_dead_mount(mountpoint: str) -> None:
    detach_loops(mountpoint)
    # Lazy: a dead FUSE mount cannot answer the requests a plain unmount would wait on.
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


def daemon_processes(image: str, mountpoint: str) -> list[int]:
    """The live processes serving ``image`` at ``mountpoint``: the daemon and the workers it forked,
    found by their command line, which the workers share with their parent and keep if it dies."""
    wanted = ["-m", "pmemfs.daemon", os.path.abspath(image), os.path.abspath(mountpoint)]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(argv[i : i + len(wanted)] == wanted for i in range(len(argv))):
            found.append(int(entry))
    return sorted(found)


def kill_daemon(image: str, mountpoint: str, pid: int | None = None, *, timeout_s: float = 10.0) -> list[int]:
    """kill -9 every process serving ``image`` at ``mountpoint``, as a crash would, and wait until
    they are gone; return their pids. The mount is left dead: see :func:`cleanup_dead_mount`."""
    killed: set[int] = set()

    def all_dead() -> bool:
        # The parent first: once it is gone nothing forks another worker, so a scan after it is whole.
        for victim in ([pid] if pid and not killed else []) + daemon_processes(image, mountpoint):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
            killed.add(victim)
        return not any(process_alive(victim) for victim in killed)

    if not poll_until(all_dead, timeout_s):
        alive = sorted(victim for victim in killed if process_alive(victim))
        raise PmemfsError(f"daemon processes {alive} of {mountpoint} did not die within {timeout_s:g} s of SIGKILL")
    return sorted(killed)


def power_cut(image: str, mountpoint: str, pid: int) -> list[int]:
    """Stop serving ``image`` at ``mountpoint`` at once, as a power cut would, and return the pids.

    Every serving process is stopped (SIGSTOP) before any is killed, so that nothing more reaches
    the image once the cut begins: not another request, not a writeback of ``dax0``'s page cache
    (those stores are lost, as unflushed stores are). A store under way when its process stopped
    is cut where it was. Then SIGKILL, as :func:`kill_daemon`: the header stays marked in use, so
    the next mount counts an unclean shutdown. The mount is left dead (:func:`cleanup_after_power_cut`).
    """
    for victim in sorted({pid, *daemon_processes(image, mountpoint)}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGSTOP)
    return kill_daemon(image, mountpoint, pid)


def cleanup_after_power_cut(mountpoint: str) -> list[str]:
    """Take down what went with the power: a filesystem mounted from a loop device over ``pmem0`` is
    unmounted lazily (its device is gone; it cannot be unmounted cleanly), then the loop devices
    and the dead mount are cleared. Returns what was unmounted, as lines to show."""
    pmem0 = os.path.join(os.path.abspath(mountpoint), "pmem0")
    mounted = _mounted_devices()
    taken: list[str] = []
    for device in loop_devices_for(pmem0):
        if device in mounted:
            subprocess.run(["umount", "-l", mounted[device]], capture_output=True)
            taken.append(f"{mounted[device]} (from {device}) was unmounted lazily")
    cleanup_dead_mount(mountpoint)
    return taken


def open_files(mountpoint: str) -> int:
    """How many pmem0/dax0 handles the daemon has open (a mapping holds one until it is unmapped)."""
    return int(read_status(mountpoint).get("open_files", 0))


def processes_using(mountpoint: str) -> list[str]:
    """Who has pmem0 or dax0 open or mapped, as "pid 123 (fio) has pmem0 open"."""
    return processes_using_paths({os.path.join(os.path.abspath(mountpoint), name): name for name in DATA_FILES})


def processes_using_paths(targets: dict[str, str]) -> list[str]:
    """Who has one of ``targets`` (path: name to say) open or mapped, from /proc, which names them
    without asking the mount anything."""
    found: list[str] = []
    if not targets:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue  # this process counts too: a program that mounted a region may hold its files
        uses: set[str] = set()
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    name = targets.get(os.readlink(f"/proc/{entry}/fd/{fd}"))
                    if name:
                        uses.add(f"has {name} open")
            with open(f"/proc/{entry}/maps") as maps:
                for line in maps:
                    name = targets.get(line.rstrip("\n").split(maxsplit=5)[-1])
                    if name:
                        uses.add(f"has {name} mapped")
            with open(f"/proc/{entry}/comm") as comm:
                command = comm.read().strip()
        except OSError:
            continue  # gone meanwhile, or not ours to look at
        found += [f"pid {entry} ({command}) {use}" for use in sorted(uses)]
    return found


def refuse_if_busy(mountpoint: str) -> None:
    """Raise MountError naming who has pmem0/dax0 open, if anyone does: an unmount must never
    break I/O under way, as umount(8) of a busy filesystem disturbs nothing."""
    if open_files(mountpoint) == 0:
        return
    users = processes_using(mountpoint)
    if not users and poll_until(lambda: open_files(mountpoint) == 0, RELEASE_GRACE_S):
        return  # a release was on its way
    users = users or processes_using(mountpoint)
    if users:
        raise MountError(
            f"{mountpoint} is busy: {'; '.join(users)}. Nothing was stopped: end or close those, "
            "then run pmemfs umount again"
        )
    raise MountError(
        f"{mountpoint} is busy: {open_files(mountpoint)} pmem0/dax0 handle(s) open, held by no process visible "
        f"here (another PID namespace?). Nothing was stopped; if nothing uses the mount, `fusermount3 -u "
        f"{mountpoint}` unmounts it cleanly"
    )


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class PinSession:
    """A client's pin session: ``.pmemfs/pin`` held open; its pins last until :meth:`close`."""

    def __init__(self, mountpoint: str) -> None:
        path = os.path.join(mountpoint, ".pmemfs", "pin")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise MountError(f"cannot open {path}: {err.strerror} (is {mountpoint} a pmemfs mount?)") from None

    def _command(self, command: str, what: str, errors: dict[int, str] | None = None) -> None:
        try:
            os.write(self.fd, command.encode())
        except OSError as err:
            hint = (errors or PIN_ERRORS).get(err.errno or 0, err.strerror or "error")
            raise PmemfsError(f"{what}: {hint}", errno=err.errno) from None

    def mark(self, name: str) -> None:
        self._command(f"mark {name}", f"mark {name!r}", MARK_ERRORS)

    def pin(self, file: str, offset: int, length: int, *, longterm: bool = False) -> dict[str, object]:
        before = {p["id"] for p in self.pins()}
        kind = "longterm " if longterm else ""
        self._command(
            f"pin {file} {offset} {length}{' longterm' if longterm else ''}", f"{kind}pin of {file} {offset}+{length}"
        )
        return next(p for p in self.pins() if p["id"] not in before)

    def unpin(self, pin_id: int) -> None:
        self._command(f"unpin {pin_id}", f"unpin {pin_id}")

    def zero(self, offset: int, length: int) -> None:
        self._command(f"zero {offset} {length}", f"zero {offset}+{length}")

    def inject(self, sector: int, count: int) -> None:
        self._command(f"inject {sector} {count}", f"inject-error at sectors {sector}+{count}")

    def uninject(self, sector: int, count: int) -> None:
        self._command(f"uninject {sector} {count}", f"uninject of sectors {sector}+{count}")

    def clear_errors(self) -> None:
        self._command("clear-errors", "clear-errors")

    def trace_io(self, on: bool) -> None:
        self._command(f"trace-io {'on' if on else 'off'}", "tracing I/O transfers")

    def hold_opens(self) -> None:
        self._command("hold-opens", "holding opens of pmem0/dax0 back")

    def release_opens(self) -> None:
        self._command("release-opens", "letting opens of pmem0/dax0 go on")

    def kill_device(self) -> None:
        self._command("kill", "killing the device reference")

    def revive_device(self) -> None:
        self._command("revive", "reviving the device reference")

    def pins(self) -> list[dict[str, object]]:
        # Read from offset 0: writes move the file position, and the daemon renders the listing
        # afresh for every read at 0.
        listing = b""
        while chunk := os.pread(self.fd, 65536, len(listing)):
            listing += chunk
        pins = []
        for line in listing.decode().splitlines():
            pin_id, file, offset, length, kind = line.split()
            pins.append({"id": int(pin_id), "file": file, "offset": int(offset), "length": int(length), "kind": kind})
        return pins

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def first_busy(mountpoint: str, offset: int, length: int) -> tuple[int, list[dict]] | None:
    """The first referenced page in a byte range and its holders, from ``.pmemfs/pages``."""
    first_pfn, end_pfn = offset // 4096, -(-(offset + length) // 4096)
    for r in read_pages(mountpoint)["ranges"]:
        if r["pfn"] < end_pfn and first_pfn < r["pfn"] + r["npages"]:
            return max(r["pfn"], first_pfn), r["holders"]
    return None


def zero(
    mountpoint: str, offset: int, length: int, *, timeout_s: float = 30.0, progress: Progress = no_progress
) -> None:
    """Bulk-zero a range, waiting (polling, like dax_layout_busy_page) while pages in it are referenced."""
    with PinSession(mountpoint) as session:
        what = f"zeroing {length} bytes at offset {offset}"
        progress(what)

        def zeroed() -> bool:
            try:
                session.zero(offset, length)
            except PmemfsError as err:
                if err.errno != errno.EBUSY:
                    raise
                # Who holds it costs the daemon a scan of the registry: asked only when someone is shown.
                busy = first_busy(mountpoint, offset, length) if progress is not no_progress else None
                if busy:
                    holder = f": {holder_summary(oldest(busy[1]))}" if busy[1] else ""
                    progress(f"waiting for busy page {busy[0]}{holder}")
                return False
            return True

        if not poll_until(zeroed, timeout_s, POLL_INTERVAL_S * 5):
            busy = first_busy(mountpoint, offset, length)
            where = f"page {busy[0]} (offset {busy[0] * 4096})" if busy else "a page"
            holders = "; ".join(describe_holder(h) for h in busy[1]) if busy else "holder unknown"
            raise PmemfsError(f"zero {offset}+{length}: {where} stayed busy for {timeout_s:g} s: {holders}")


PIN_ERRORS = {
    errno.EOPNOTSUPP: "pmem0 is fsdax: long-term pins are not supported there (use dax0)",
    errno.ENXIO: "the device is being torn down (an unmount is draining references)",
    errno.EINVAL: "invalid request: the range must lie inside the data area",
    errno.ENOSPC: "no space: the image's filesystem, or the badblocks table, is full",
    errno.EBUSY: "pages in the range are referenced",
}


MARK_ERRORS = {
    errno.ENODEV: "this mount records no write log (mount it with --log-writes LOGFILE)",
    errno.ENOSPC: "the write log is full",
    errno.EINVAL: f"not a mark name: printable characters without spaces, at most {MARK_MAX} bytes",
}


def drain_references(
    mountpoint: str, session: PinSession, timeout_s: float, progress: Progress = no_progress
) -> list[dict[str, object]]:
    """Kill the device reference and wait for every page reference to go; return the holders left.

    Only once no data file is open, and none can open meanwhile: the session first holds opens of
    pmem0/dax0 back (the daemon refuses, EBUSY, if one is open), so no transfer ever sees the kill.
    """
    try:
        session.hold_opens()
    except PmemfsError as err:
        if err.errno != errno.EBUSY:
            raise
        refuse_if_busy(mountpoint)  # names who, if anyone can be named
        raise MountError(f"{mountpoint} is busy: pmem0 or dax0 was opened meanwhile. Nothing was stopped") from None
    session.kill_device()
    first: list[int] = []

    def drained() -> bool:
        left = read_status(mountpoint)["registry"]["referenced_pages"]
        if left and progress is not no_progress:  # the holders cost the daemon a scan of the registry
            first[:] = first or [left]
            holders = read_pages(mountpoint)["holders"]
            who = f"; oldest: {holder_summary(oldest(holders))}" if holders else ""
            progress(f"{left} referenced page(s) to drain{who}", first[0] - left, first[0])
        return left == 0

    if poll_until(drained, timeout_s, POLL_INTERVAL_S * 5):
        return []
    return read_pages(mountpoint)["holders"]


def oldest(holders: list[dict]) -> dict:
    """The holder that has held its reference longest: the one an unmount waits on."""
    return max(holders, key=lambda h: h["age_s"])


def command_name(pid: int) -> str:
    """A process's command name (``comm``), or "gone" if it has exited."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "gone"


def holder_summary(holder: dict) -> str:
    """A holder in a few words, for a progress line: who (pid and command), what, where, for how long."""
    return (
        f"pid {holder['pid']} ({command_name(holder['pid'])}) {holder['kind']} on {holder['file']} "
        f"{holder['offset']}+{holder['length']}, {holder['age_s']:.1f} s"
    )


def describe_holder(holder: dict) -> str:
    return (
        f"pid {holder['pid']} holds a {holder['kind']} reference on {holder['file']} "
        f"offset {holder['offset']} length {holder['length']} "
        f"(pages {holder['pfn']}-{holder['pfn'] + holder['npages'] - 1}) "
        f"for {holder['age_s']:.1f} s"
    )


def format_pages(pages: dict) -> list[str]:
    """``.pmemfs/pages`` as ``pmemfs pages`` prints it: a line a referenced range, one a holder."""
    lines = [] if pages["ranges"] else ["no page is referenced"]
    for r in pages["ranges"]:
        end = r["pfn"] + r["npages"] - 1
        lines.append(
            f"pages {r['pfn']}-{end} (offset {r['pfn'] * 4096}, {r['npages'] * 4096} bytes): "
            f"refcount {r['refcount']}, {r['pins']} pin(s)"
        )
        lines += ["    " + describe_holder(holder) for holder in r["holders"]]
    return lines


def unmount(mountpoint: str, *, timeout_s: float = 30.0, progress: Progress = no_progress) -> str:
    """Detach loop devices, drain page references, unmount, and wait for the daemon to exit clean."""
    mountpoint = os.path.abspath(mountpoint)
    if not fuse_mount_entry(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    if mount_is_dead(mountpoint):
        cleanup_dead_mount(mountpoint)
        return f"cleaned up {mountpoint}: its daemon had died (the next mount counts an unclean shutdown)"
    status = read_status(mountpoint)
    detach_loops(mountpoint)
    refuse_if_busy(mountpoint)
    with PinSession(mountpoint) as session:
        holders = drain_references(mountpoint, session, timeout_s, progress)
        if holders:
            # On a timeout the mount goes on serving. Closing the session would revive the device
            # too, but the kernel sends that release later: say it now, before we exit.
            session.revive_device()
            session.release_opens()
    if holders:
        lines = "\n".join("  " + describe_holder(h) for h in holders)
        raise PmemfsError(
            f"{mountpoint}: page references did not drain within {timeout_s:g} s; still held:\n{lines}\n"
            "the mount stays up; drop the pins (end those processes) and run pmemfs umount again"
        )
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip()} (is a file on it still open?)")
    pid = int(status["pid"])
    if not poll_until(lambda: not process_alive(pid), timeout_s):
        raise PmemfsError(f"daemon {pid} did not exit within {timeout_s:.0f} s after unmount; see {status.get('log')}")
    return f"unmounted {mountpoint}"
