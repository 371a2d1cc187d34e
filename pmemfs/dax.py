"""Zero-copy DAX mappings of a mounted region, and direct I/O into and out of them (DAX-GUP).

``open_dax(mountpoint)`` maps the image's data area itself (the daemon publishes the image path
and ``dataoff`` in its status), so loads and stores hit the media with no copy and O_DIRECT readers
of ``pmem0`` see them at once. Direct I/O between another file and the mapping pins the mapping's
pages in the daemon's registry for the duration of the transfer, as ``get_user_pages()`` pins
ZONE_DEVICE pages; a long-term pin (an RDMA-style registration) is a context manager.

    with open_dax("/mnt/pmem") as dax:
        dax.array[0:4096] = 7                       # a store into the media
        fd = os.open("input", os.O_RDONLY | os.O_DIRECT)
        dax.read_direct_into(fd, 0, 1 << 20, 1 << 20)
        with dax.longterm_pin(0, 2 << 20):
            ...
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

import numpy as np

from .client import PinSession, read_badblocks, read_status
from .errors import InvalidRange, MediaError, NoSpace, PmemfsError
from .infoblock import PAGE_SIZE, SECTOR_SIZE
from .region import single_page_folios


class DaxMapping:
    """A shared mapping of [offset, offset + length) of a mounted region's data area."""

    def __init__(
        self, mountpoint: str, offset: int, length: int, *, allocate: bool = True, allow_poison: bool = False
    ) -> None:
        status = read_status(mountpoint)
        image, dataoff, data_size = status["image"], int(status["dataoff"]), int(status["size"])
        if offset % PAGE_SIZE or offset < 0 or length <= 0 or offset + length > data_size:
            raise InvalidRange(
                f"range {offset}+{length}: must start on a page and lie inside the {data_size}-byte data area"
            )
        if status.get("write_log"):
            raise PmemfsError(
                f"{mountpoint} records a write log: stores into a direct mapping of the image never reach the "
                "daemon, so the log could not hold them; map dax0 instead (msync makes its stores durable)",
                errno=errno.EOPNOTSUPP,
            )
        if os.stat(image).st_uid != os.geteuid():
            raise PmemfsError(f"{image}: only the owner of the image may map it directly", errno=errno.EACCES)
        self.mountpoint = mountpoint
        self.offset = offset
        self.length = length
        # Real DAX reports poison before a program trips over it (a load from it is a machine check).
        self.poisoned = poisoned_ranges(mountpoint, offset, length)
        if self.poisoned and not allow_poison:
            ranges = ", ".join(f"{o}+{n}" for o, n in self.poisoned)
            raise MediaError(f"the range holds poisoned bytes at {ranges} (mapping-relative); pass allow_poison=True")
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            if allocate:
                # A store into a hole of a full filesystem is a SIGBUS: allocate before handing out the mapping.
                try:
                    os.posix_fallocate(fd, dataoff + offset, length)
                except OSError as err:
                    if err.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise NoSpace(f"{image}: no space to allocate {length} bytes for the mapping") from None
                    if err.errno != errno.EOPNOTSUPP:
                        raise
            with open(fd, "r+b", closefd=False) as image_file:
                self._memmap = np.memmap(
                    image_file, dtype=np.uint8, mode="r+", offset=dataoff + offset, shape=(length,)
                )
            single_page_folios(fd, self._memmap._mmap)  # type: ignore[attr-defined]
        finally:
            os.close(fd)
        self.array: np.ndarray = self._memmap.view(np.ndarray)
        self.view = self.array.data
        self._session = PinSession(mountpoint)

    def _check_direct(self, fd: int, file_offset: int, dax_offset: int, length: int) -> None:
        if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise InvalidRange("the file must be open with O_DIRECT for a direct transfer")
        if (file_offset | dax_offset | length) % SECTOR_SIZE or length <= 0:
            raise InvalidRange(f"offsets and length must be multiples of {SECTOR_SIZE}")
        if dax_offset < 0 or dax_offset + length > self.length:
            raise InvalidRange(f"range {dax_offset}+{length} is outside the mapping ({self.length} bytes)")

    @contextlib.contextmanager
    def _pinned(self, dax_offset: int, length: int, *, longterm: bool = False) -> Iterator[None]:
        pin = self._session.pin("dax0", self.offset + dax_offset, length, longterm=longterm)
        try:
            yield
        finally:
            self._session.unpin(int(pin["id"]))  # type: ignore[call-overload]

    def read_direct_into(self, fd: int, file_offset: int, dax_offset: int, length: int) -> int:
        """O_DIRECT read from ``fd`` straight into the mapping; its pages are pinned while the DMA runs."""
        self._check_direct(fd, file_offset, dax_offset, length)
        with self._pinned(dax_offset, length):
            return os.preadv(fd, [self.view[dax_offset : dax_offset + length]], file_offset)

    def write_direct_from(self, fd: int, file_offset: int, dax_offset: int, length: int) -> int:
        """O_DIRECT write to ``fd`` straight out of the mapping; its pages are pinned while the DMA runs."""
        self._check_direct(fd, file_offset, dax_offset, length)
        with self._pinned(dax_offset, length):
            return os.pwritev(fd, [self.view[dax_offset : dax_offset + length]], file_offset)

    @contextlib.contextmanager
    def longterm_pin(self, dax_offset: int, length: int) -> Iterator[None]:
        """Hold a FOLL_LONGTERM pin on part of the mapping, like an RDMA memory registration."""
        if dax_offset < 0 or dax_offset + length > self.length:
            raise InvalidRange(f"range {dax_offset}+{length} is outside the mapping ({self.length} bytes)")
        with self._pinned(dax_offset, length, longterm=True):
            yield

    def persist(self) -> None:
        """msync the mapping: stores are in the image's page cache at once, this puts them on its disk."""
        self._memmap.flush()

    def close(self) -> None:
        self._session.close()
        del self.view, self.array, self._memmap

    def __enter__(self) -> DaxMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def poisoned_ranges(mountpoint: str, offset: int, length: int) -> list[tuple[int, int]]:
    """Poisoned byte ranges inside [offset, offset + length), relative to ``offset``."""
    found = []
    for sector, count in read_badblocks(mountpoint):
        lo, hi = max(sector * SECTOR_SIZE, offset), min((sector + count) * SECTOR_SIZE, offset + length)
        if lo < hi:
            found.append((lo - offset, hi - lo))
    return found


def open_dax(
    mountpoint: str, offset: int = 0, length: int | None = None, *, allocate: bool = True, allow_poison: bool = False
) -> DaxMapping:
    """Map [offset, offset + length) of the data area of the region mounted at ``mountpoint``.

    Raises MediaError naming the poisoned ranges, if any, unless ``allow_poison``; then they are
    in ``mapping.poisoned`` and loads from them read whatever the media holds.
    """
    if length is None:
        length = int(read_status(mountpoint)["size"]) - offset
    return DaxMapping(mountpoint, offset, length, allocate=allocate, allow_poison=allow_poison)
