"""Drive a mounted region, whoever mounted it: its data files and what its control files offer.

``Mount(mountpoint)`` is what the CLI's commands and :class:`pmemfs.MountedRegion` (which adds
the region's life cycle) are built on; it talks to the daemon only through the mount.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

from . import client
from .errors import PmemfsError, UsageError

# typing.TYPE_CHECKING would load typing, a twentieth of the CLI's start-up; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .dax import DaxMapping

DATA_FILES = client.DATA_FILES
# How long the pin checks wait for references the kernel drops after the fact (a release is sent
# after the last close; a page-cache fill's get_page ends with its reply).
SETTLE_S = 2.0


class Pin:
    """A pin held through ``.pmemfs/pin``: what :meth:`Mount.pin` yields."""

    # A plain class: a dataclass or NamedTuple would load typing/inspect, a tenth of the CLI's start-up.
    __slots__ = ("id", "file", "offset", "length", "kind")

    def __init__(self, id: int, file: str, offset: int, length: int, kind: str) -> None:
        self.id, self.file, self.offset, self.length, self.kind = id, file, offset, length, kind

    def __repr__(self) -> str:
        return f"Pin(id={self.id}, file={self.file!r}, offset={self.offset}, length={self.length}, kind={self.kind!r})"


class Mount:
    """A pmemfs mount, whoever started it: its data files and what its control files offer.

    Every method raises the project's errors (:class:`pmemfs.PmemfsError` and its subclasses)
    with the message the CLI would print.
    """

    def __init__(self, mountpoint: str | os.PathLike[str]) -> None:
        self.mountpoint = os.path.abspath(mountpoint)

    @property
    def pmem0(self) -> str:
        """The PMEM "ram disk" (what ``/dev/pmem0`` is to direct-I/O code)."""
        return os.path.join(self.mountpoint, "pmem0")

    @property
    def dax0(self) -> str:
        """The device-dax style view of the same media, for mmap load/store."""
        return os.path.join(self.mountpoint, "dax0")

    def status(self) -> dict[str, Any]:
        """``.pmemfs/status``: geometry, counters, registry, badblocks, shutdowns."""
        return client.read_status(self.mountpoint)

    def pages(self) -> dict[str, Any]:
        """``.pmemfs/pages``: the referenced page ranges and every holder."""
        return client.read_pages(self.mountpoint)

    def trace(self) -> list[str]:
        """The page registry's recent events, oldest first, one line each."""
        return client.read_control(self.mountpoint, "trace").splitlines()

    def trace_events(self) -> dict[str, Any]:
        """``.pmemfs/trace.json``: the same events as dicts with exact times (``events``), and ``now_ns``."""
        return json.loads(client.read_control(self.mountpoint, "trace.json"))  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def tracing_io(self) -> Iterator[None]:
        """Trace every I/O transfer too (not only pins and sessions) while the block runs."""
        with client.PinSession(self.mountpoint) as session:
            session.trace_io(True)
            yield

    def badblocks(self) -> list[tuple[int, int]]:
        """The poisoned 512-byte blocks of the data area, as (first block, count)."""
        return client.read_badblocks(self.mountpoint)

    def inject_error(self, block: int, count: int = 1) -> None:
        """Poison ``count`` 512-byte blocks from ``block`` (of the data area), like ``ndctl inject-error``."""
        with client.PinSession(self.mountpoint) as session:
            session.inject(block, count)

    def uninject_error(self, block: int, count: int = 1) -> None:
        """Take blocks off the poison list, leaving their data as it is."""
        with client.PinSession(self.mountpoint) as session:
            session.uninject(block, count)

    def clear_errors(self) -> list[tuple[int, int]]:
        """Zero every poisoned block, which clears its poison; return the blocks that were poisoned."""
        before = self.badblocks()
        with client.PinSession(self.mountpoint) as session:
            session.clear_errors()
        return before

    def mark(self, name: str) -> None:
        """Add the mark ``name`` to the write log (a mount made with ``log_writes``): what
        ``pmemfs replay --to NAME`` replays to, and xfstests' ``_log_writes_mark`` does."""
        with client.PinSession(self.mountpoint) as session:
            session.mark(name)

    def zero(
        self, offset: int, length: int, *, timeout_s: float = 30.0, progress: client.Progress = client.no_progress
    ) -> None:
        """Bulk-zero a byte range of the data area, waiting up to ``timeout_s`` for pinned pages in it;
        ``progress(text, done, total)`` hears how it goes."""
        client.zero(self.mountpoint, offset, length, timeout_s=timeout_s, progress=progress)

    @contextlib.contextmanager
    def pin(self, file: str, offset: int, length: int, *, longterm: bool = False) -> Iterator[Pin]:
        """Hold a pin on a byte range of ``pmem0`` or ``dax0`` while the block runs.

        ``longterm`` is FOLL_LONGTERM (an RDMA registration): refused on pmem0 (fsdax) with
        :class:`pmemfs.PmemfsError` errno EOPNOTSUPP, allowed on dax0 (devdax).
        """
        if file not in DATA_FILES:
            raise UsageError(f"cannot pin {file!r}: the files are {' and '.join(DATA_FILES)}")
        with client.PinSession(self.mountpoint) as session:
            held = session.pin(file, offset, length, longterm=longterm)
            try:
                yield Pin(**held)  # type: ignore[arg-type]
            finally:
                # Closing the session would drop it too, but the kernel sends that release later:
                # unpin now so that the page is idle when the block is left.
                with contextlib.suppress(PmemfsError):
                    session.unpin(int(held["id"]))  # type: ignore[call-overload]

    def dax(
        self, offset: int = 0, length: int | None = None, *, allow_poison: bool = False, allocate: bool = True
    ) -> DaxMapping:
        """A zero-copy mapping of the media (:func:`pmemfs.dax.open_dax`); close it, or use it in ``with``."""
        from .dax import open_dax  # numpy: only for those who map

        return open_dax(self.mountpoint, offset, length, allow_poison=allow_poison, allocate=allocate)

    def assert_no_pins(self, timeout_s: float = SETTLE_S) -> None:
        """Raise AssertionError naming the holders unless no page is referenced or pinned.

        Waits up to ``timeout_s`` for references the kernel drops asynchronously (the release of a
        file closed a moment ago).
        """
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        if client.poll_until(lambda: self.status()["registry"]["referenced_pages"] == 0, timeout_s, 0.05):
            return
        lines = client.format_pages(self.pages())
        raise AssertionError(f"pages of {self.mountpoint} are still referenced:\n" + "\n".join(lines))

    def assert_balanced(self, timeout_s: float = SETTLE_S) -> None:
        """:meth:`assert_no_pins`, and every pin acquired since the mount was released, no put unbalanced."""
        __tracebackhide__ = True
        self.assert_no_pins(timeout_s)
        registry = self.status()["registry"]
        problems = []
        if registry["nr_foll_pin_acquired"] != registry["nr_foll_pin_released"]:
            problems.append(
                f"nr_foll_pin_acquired {registry['nr_foll_pin_acquired']} != "
                f"nr_foll_pin_released {registry['nr_foll_pin_released']}"
            )
        if registry["nr_get_page"] != registry["nr_put_page"]:
            problems.append(f"nr_get_page {registry['nr_get_page']} != nr_put_page {registry['nr_put_page']}")
        if registry["nr_unbalanced"]:
            problems.append(f"{registry['nr_unbalanced']} unbalanced put(s) or unpin(s)")
        if problems:
            raise AssertionError(f"the page registry of {self.mountpoint} is unbalanced: " + "; ".join(problems))

    def unmount(self, *, timeout_s: float = 30.0) -> str:
        """``pmemfs umount``: refuse if busy, drain references, unmount, wait for the clean exit."""
        return client.unmount(self.mountpoint, timeout_s=timeout_s)
