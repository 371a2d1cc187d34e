"""``pmemfs check``: one check per invariant of an image, and the repairs that cannot lose data."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from .client import Progress, no_progress
from .errors import CorruptImage, PmemfsError, UsageError
from .infoblock import (
    BADBLOCKS_MAX,
    COPY_NAMES,
    HEADER_BLOCK_SIZE,
    HEADER_OFFSET,
    INFOBLOCK_OFFSET,
    INFOBLOCK_SIZE,
    MIN_IMAGE_SIZE,
    PAGE_SIZE,
    RESERVED_HEAD,
    SECTOR_SIZE,
    Geometry,
    Header,
    HeaderBlock,
    InfoBlock,
)
from .region import lock_image, open_image


@dataclasses.dataclass
class Report:
    lines: list[str] = dataclasses.field(default_factory=list)
    problems: int = 0

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def good(self, text: str) -> None:
        self.lines.append(f"ok      {text}")

    def bad(self, text: str) -> None:
        self.problems += 1
        self.lines.append(f"BAD     {text}")

    def note(self, text: str) -> None:
        self.lines.append(f"note    {text}")

    def fixed(self, text: str, *, was_problem: bool = True) -> None:
        self.problems -= was_problem
        self.lines.append(f"FIXED   {text}")


class ImageChecker:
    """Reads the image once, then each ``check_*`` method tests one invariant."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        try:
            self.file_size = os.fstat(fd).st_size
            head = os.pread(fd, INFOBLOCK_OFFSET + INFOBLOCK_SIZE, 0)
        except OSError as err:
            raise PmemfsError(f"cannot read {path}: {err.strerror}", errno=err.errno) from None
        self.header_block = head[:HEADER_BLOCK_SIZE]
        self.info_block = head[INFOBLOCK_OFFSET:]
        self.header_state: HeaderBlock | None = None
        self.header: Header | None = None
        self.infoblock: InfoBlock | None = None
        self.geometry: Geometry | None = None
        self.report = Report()

    def run(self, repair: bool, progress: Progress) -> Report:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("file size", self.check_file_size),
            ("header", lambda: self.check_header(repair)),
            ("info block", self.check_infoblock),
            ("identity", self.check_identity),
            ("badblocks", lambda: self.check_badblocks(repair)),
            ("clean shutdown", self.check_clean),
        ]
        if repair:
            steps.append(("repairs", self.repair_blocks))
        for done, (name, step) in enumerate(steps):
            progress(f"{self.path}: {name}", done, len(steps))
            step()
        return self.report

    def check_file_size(self) -> None:
        if self.file_size < RESERVED_HEAD:
            self.report.bad(f"the file has {self.file_size} bytes, too short to be a pmemfs image")
        elif self.file_size < MIN_IMAGE_SIZE or self.file_size % PAGE_SIZE:
            self.report.bad(
                f"file size {self.file_size} is not a valid image size (multiple of 4 KiB, at least 16 MiB)"
            )
        else:
            self.report.good(f"file size {self.file_size}")

    def check_header(self, repair: bool) -> None:
        try:
            state = HeaderBlock.decode(self.header_block)
        except CorruptImage as err:
            self.report.bad(str(err))
            return
        header = state.header
        if header.image_size != self.file_size:
            self.report.bad(f"header: image_size {header.image_size} but the file has {self.file_size} bytes")
            return
        self.header_state, self.header = state, header
        if state.current is None:
            self.report.good("header: magic, version 1, checksum, image_size")
            self.report.note("header: format version 1; the next mount rewrites it as version 2 (two copies)")
            return
        current = COPY_NAMES[state.current]
        self.report.good(f"header: magic, version, checksum, image_size (copy {current}, sequence {state.sequence})")
        restore = state.restore()
        if restore is None:
            return
        # Not a problem: a power cut during an update leaves exactly this, and the current copy is whole.
        damaged = COPY_NAMES[1 - state.current]
        self.report.note(
            f"header: copy {damaged} is damaged ({state.damage[1 - state.current]}); copy {current} is current"
        )
        if repair:
            self._write(HEADER_OFFSET + restore[0], restore[1])
            self.report.fixed(f"header: copy {damaged} rewritten from copy {current}", was_problem=False)

    def check_infoblock(self) -> None:
        try:
            infoblock = InfoBlock.unpack(self.info_block)
            geometry = infoblock.geometry(self.file_size)
        except CorruptImage as err:
            self.report.bad(str(err))
            return
        self.infoblock, self.geometry = infoblock, geometry
        self.report.good(
            f"info block: {geometry.mode} map={geometry.map} dataoff={geometry.dataoff} npfns={geometry.npfns} "
            f"end_trunc={geometry.end_trunc} align={geometry.align}"
        )

    def check_identity(self) -> None:
        if not (self.header and self.infoblock):
            return
        ib = self.infoblock
        if self.header.uuid != ib.uuid:
            self.report.bad("header uuid differs from the info block's")
        elif (self.header.mode, self.header.map, self.header.align) != (ib.mode_name, ib.map_name, ib.align):
            self.report.bad("header mode/map/align differ from the info block's")
        else:
            self.report.good("header and info block agree (uuid, mode, map, align)")

    def check_badblocks(self, repair: bool) -> None:
        if not (self.header and self.header_state and self.geometry):
            return
        if len(self.header.badblocks) > BADBLOCKS_MAX:
            # Dropping extents would forget poison, so there is no safe repair.
            self.report.bad(
                f"badblocks: {len(self.header.badblocks)} extents do not fit a version-2 header ({BADBLOCKS_MAX}); "
                "mount it with the pmemfs that wrote it and clear some first"
            )
            return
        sectors = self.geometry.data_size // SECTOR_SIZE
        inside = tuple((s, c) for s, c in self.header.badblocks if c > 0 and s + c <= sectors)
        outside = len(self.header.badblocks) - len(inside)
        if not outside:
            self.report.good(f"badblocks: {len(inside)} extent(s), all inside the data area")
            return
        self.report.bad(f"badblocks: {outside} extent(s) outside the data area ({sectors} sectors) or empty")
        if repair:
            header = self.header.replace(badblocks=inside)
            offset, copy = self.header_state.update(header)
            self._write(HEADER_OFFSET + offset, copy)
            self.header = header
            self.report.fixed(f"badblocks: dropped {outside} extent(s) outside the data area")

    def check_clean(self) -> None:
        if self.header and not self.header.clean:
            self.report.note("image is marked in use: its daemon did not shut down cleanly; the next mount counts it")

    def repair_blocks(self) -> None:
        """Rebuild whichever of header and info block is damaged from the one that is intact."""
        if self.header and not self.infoblock:
            try:
                geometry = Geometry.compute(
                    self.file_size, mode=self.header.mode, map=self.header.map, align=self.header.align
                )
            except UsageError as err:
                self.report.note(f"info block not rebuilt: the header describes no valid image ({err})")
                return
            self._write(INFOBLOCK_OFFSET, InfoBlock.for_geometry(geometry, self.header.uuid).pack())
            self.report.fixed("info block rebuilt from the header's uuid, mode, map and align")
        elif self.infoblock and self.geometry and not self.header and self.file_size >= MIN_IMAGE_SIZE:
            # Counters are lost; marked unclean so the next mount says the image was not shut down cleanly.
            header = Header.for_geometry(self.geometry, self.infoblock.uuid, 0).replace(flags=0)
            self._write(HEADER_OFFSET, HeaderBlock.initial(header))
            self.report.fixed("header rebuilt from the info block (counters reset)")

    def _write(self, offset: int, block: bytes) -> None:
        os.pwrite(self.fd, block, offset)
        os.fdatasync(self.fd)


def check_image(path: str, *, repair: bool = False, progress: Progress = no_progress) -> Report:
    """Check (and with ``repair``, repair) the image at ``path``; ``progress(text, done, total)``
    hears of each invariant as its check starts."""
    fd = open_image(path, writable=repair)
    try:
        if repair:
            lock_image(fd, path)
        return ImageChecker(path, fd).run(repair, progress)
    finally:
        os.close(fd)
