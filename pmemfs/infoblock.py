"""The on-media format: pmemfs header at 0, kernel ``struct nd_pfn_sb`` at 4 KiB, and their geometry.

Layouts follow DESIGN.md section 1 and Linux ``drivers/nvdimm/pfn.h`` so that
``ndctl read-infoblock`` and a Linux guest read the same namespace we do.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid as uuidlib
from typing import Any

import numpy as np

from .errors import CorruptImage, UsageError
from .sizes import format_size, parse_size  # noqa: F401  (parse_size is re-exported)

PAGE_SIZE = 4096
PAGE_SHIFT = 12
assert 1 << PAGE_SHIFT == PAGE_SIZE
SECTOR_SIZE = 512
HEADER_OFFSET = 0
INFOBLOCK_OFFSET = 4096
INFOBLOCK_SIZE = 4096
# Info block plus the 4 KiB the kernel leaves in front of it (nd_pfn_init: size - SZ_8K).
RESERVED_HEAD = 8192
MIN_IMAGE_SIZE = 16 << 20
DEFAULT_ALIGN = 2 << 20
# x86-64 supports these mapping sizes; the kernel refuses a devdax info block with any other.
SUPPORTED_ALIGNS = (4096, 2 << 20, 1 << 30)
PAGE_STRUCT_SIZE = 64  # MAX_STRUCT_PAGE_SIZE

PFN_SIG = b"NVDIMM_PFN_INFO\0"
DAX_SIG = b"NVDIMM_DAX_INFO\0"
PFN_MODE_RAM = 1  # map=mem: the memmap lives in DRAM
PFN_MODE_PMEM = 2  # map=dev: the memmap is carved out of the device

MODES = {"fsdax": PFN_SIG, "devdax": DAX_SIG}
MAPS = {"mem": PFN_MODE_RAM, "dev": PFN_MODE_PMEM}

# struct nd_pfn_sb v1.4 up to page_struct_size; padding follows, checksum is the last 8 bytes.
_PFN_SB = struct.Struct("<16s16s16sIHHQQIIIIIH")


def fletcher64(block: bytes | bytearray | memoryview) -> int:
    """nd_fletcher64 over little-endian u32 words: lo wraps at 2^32, hi accumulates lo."""
    words = np.frombuffer(block, dtype="<u4").astype(np.uint64)
    # Only the low 32 bits of hi survive the final shift, and 1024 words keep every sum far below 2^64.
    lo = np.cumsum(words) & 0xFFFFFFFF
    hi = int(lo.sum()) & 0xFFFFFFFF
    return (hi << 32) | int(lo[-1])


def with_checksum(block: bytes | bytearray) -> bytes:
    """``block`` with nd_fletcher64 of itself (last 8 bytes zeroed) stored in its last 8 bytes."""
    sealed = bytearray(block)
    sealed[-8:] = bytes(8)
    struct.pack_into("<Q", sealed, len(sealed) - 8, fletcher64(sealed))
    return bytes(sealed)


def _checksum_ok(block: bytes) -> bool:
    return with_checksum(block) == block


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where things are in an image, computed as the kernel's nd_pfn_init does for a namespace at 0."""

    size: int
    mode: str  # fsdax | devdax
    map: str  # dev | mem
    align: int
    dataoff: int
    npfns: int
    end_trunc: int

    @classmethod
    def compute(cls, size: int, *, mode: str = "fsdax", map: str = "dev", align: int = DEFAULT_ALIGN) -> Geometry:
        validate_image_size(size)
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}: use fsdax or devdax")
        if map not in MAPS:
            raise UsageError(f"unknown map {map!r}: use dev or mem")
        align = max(align, DEFAULT_ALIGN)
        if align not in SUPPORTED_ALIGNS:
            raise UsageError(f"align {format_size(align)} is not a supported mapping size: use 2M or 1G")
        npfns0 = (size - RESERVED_HEAD) // PAGE_SIZE
        end_trunc = size - _align_down(size, align)
        if map == "dev":
            dataoff = _align_up(RESERVED_HEAD + PAGE_STRUCT_SIZE * npfns0, align)
        else:
            dataoff = _align_up(RESERVED_HEAD, align)
        if dataoff + end_trunc >= size:
            raise UsageError(
                f"size {format_size(size)} leaves no data area with align {format_size(align)}: "
                f"use at least {format_size(dataoff + end_trunc + align)}"
            )
        npfns = (size - dataoff - end_trunc) // PAGE_SIZE
        return cls(size, mode, map, align, dataoff, npfns, end_trunc)

    @property
    def data_size(self) -> int:
        return self.npfns * PAGE_SIZE

    @property
    def memmap_size(self) -> int:
        """Bytes of the carve-out that hold struct pages (map=dev), else 0."""
        return self.npfns * PAGE_STRUCT_SIZE if self.map == "dev" else 0

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "map": self.map,
            "size": self.data_size,
            "raw_size": self.size,
            "align": self.align,
            "dataoff": self.dataoff,
            "npfns": self.npfns,
            "end_trunc": self.end_trunc,
            "memmap_bytes": self.memmap_size,
        }


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _align_down(value: int, align: int) -> int:
    return value // align * align


def validate_image_size(size: int) -> None:
    if size < MIN_IMAGE_SIZE:
        raise UsageError(f"image size {size} is under the minimum: use at least {format_size(MIN_IMAGE_SIZE)}")
    if size % PAGE_SIZE:
        lower, upper = _align_down(size, PAGE_SIZE), _align_up(size, PAGE_SIZE)
        raise UsageError(f"image size {size} is not a multiple of 4 KiB: use {lower} or {upper}")


@dataclasses.dataclass(frozen=True)
class InfoBlock:
    """A decoded ``struct nd_pfn_sb``."""

    signature: bytes
    uuid: bytes
    parent_uuid: bytes
    flags: int
    version_major: int
    version_minor: int
    dataoff: int
    npfns: int
    mode: int
    start_pad: int
    end_trunc: int
    align: int
    page_size: int
    page_struct_size: int

    @classmethod
    def for_geometry(cls, geometry: Geometry, uuid: bytes) -> InfoBlock:
        return cls(
            signature=MODES[geometry.mode],
            uuid=uuid,
            parent_uuid=bytes(16),
            flags=0,
            version_major=1,
            version_minor=4,
            dataoff=geometry.dataoff,
            npfns=geometry.npfns,
            mode=MAPS[geometry.map],
            start_pad=0,
            end_trunc=geometry.end_trunc,
            align=geometry.align,
            page_size=PAGE_SIZE,
            page_struct_size=PAGE_STRUCT_SIZE,
        )

    def pack(self) -> bytes:
        block = bytearray(INFOBLOCK_SIZE)
        _PFN_SB.pack_into(block, 0, *dataclasses.astuple(self))
        return with_checksum(block)

    @classmethod
    def unpack(cls, block: bytes) -> InfoBlock:
        """Decode and validate as the kernel's nd_pfn_validate would; raise CorruptImage naming the field."""
        if len(block) < INFOBLOCK_SIZE:
            raise CorruptImage("info block: image too short to hold an nd_pfn_sb at 4 KiB")
        ib = cls(*_PFN_SB.unpack_from(block, 0))
        if ib.signature not in (PFN_SIG, DAX_SIG):
            raise CorruptImage(f"info block: signature mismatch ({ib.signature.rstrip(bytes(1))!r})")
        if not _checksum_ok(block[:INFOBLOCK_SIZE]):
            raise CorruptImage("info block: checksum mismatch")
        if (ib.version_major, ib.version_minor) < (1, 4):
            raise CorruptImage(f"info block: version {ib.version_major}.{ib.version_minor} is older than 1.4")
        if ib.mode not in (PFN_MODE_RAM, PFN_MODE_PMEM):
            raise CorruptImage(f"info block: mode {ib.mode} is neither 1 (map=mem) nor 2 (map=dev)")
        if ib.page_size != PAGE_SIZE:
            raise CorruptImage(f"info block: init failed, page size mismatch {ib.page_size}")
        if ib.page_struct_size < PAGE_STRUCT_SIZE:
            raise CorruptImage(f"info block: init failed, struct page size mismatch {ib.page_struct_size}")
        if ib.align not in SUPPORTED_ALIGNS:
            raise CorruptImage(f"info block: init failed, alignment mismatch: {ib.align:#x}")
        if ib.start_pad:
            raise CorruptImage(f"info block: start_pad {ib.start_pad} is not 0 for a namespace at offset 0")
        return ib

    @property
    def mode_name(self) -> str:
        return "devdax" if self.signature == DAX_SIG else "fsdax"

    @property
    def map_name(self) -> str:
        return "dev" if self.mode == PFN_MODE_PMEM else "mem"

    def geometry(self, size: int) -> Geometry:
        """The geometry this block describes for an image of ``size`` bytes, checked as the kernel checks it."""
        if self.dataoff >= size:
            raise CorruptImage(
                f"info block: pfn array size exceeds capacity (dataoff {self.dataoff:#x}, size {size:#x})"
            )
        if self.dataoff % self.align or self.dataoff % PAGE_SIZE:
            raise CorruptImage(f"info block: bad offset: {self.dataoff:#x} dax disabled align: {self.align:#x}")
        if (size - self.end_trunc) % DEFAULT_ALIGN:
            raise CorruptImage(f"info block: resource end misaligned (size {size:#x} - end_trunc {self.end_trunc:#x})")
        if self.dataoff >= size - self.end_trunc:
            raise CorruptImage("info block: bad offset with small namespace")
        try:
            expected = Geometry.compute(size, mode=self.mode_name, map=self.map_name, align=self.align)
        except UsageError as err:
            # What is a usage error when someone asks for this geometry is damage when an image claims it.
            raise CorruptImage(f"info block: {err}") from None
        for field in ("dataoff", "npfns", "end_trunc"):
            if getattr(self, field) != getattr(expected, field):
                raise CorruptImage(
                    f"info block: {field} is {getattr(self, field)}, but an image of {size} bytes "
                    f"with map={self.map_name} align={self.align:#x} needs {getattr(expected, field)}"
                )
        return expected


# The pmemfs header. The kernel never reads these bytes. It repeats the info block's mode, map and
# align so that `pmemfs check --repair` can rebuild a damaged info block from it.
#
# Version 2: [0, 4096) holds two 2 KiB copies, A at 0 and B at 2048, each with its own sequence
# number and checksum. An update writes the new header, sequence + 1, over the copy that is not
# current and only then syncs, so a write torn by a power cut damages only the copy being written
# and the other one still holds the previous header. One copy, offsets in bytes, little-endian:
#      0 magic "PMEMFS\0\x01"   8 u32 version (2)     12 u32 flags            16 u64 image_size
#     24 uuid[16]              40 u64 mount_count    48 u64 unclean_shutdowns 56 u64 created_ns
#     64 u64 last_mount_ns     72 u32 map (1 mem, 2 dev)  76 u32 devdax (0, 1) 80 u64 align
#     88 u32 badblock_count    92 u32 reserved       96 u64 sequence        104 reserved
#    128 badblocks table: badblock_count x (u64 sector, u64 count), room for BADBLOCKS_MAX
#   2032 reserved              2040 u64 checksum: nd_fletcher64 of the copy with these 8 bytes zeroed
# Version 1 was one 4 KiB copy (the same fields up to badblock_count, table at 256, checksum at
# 4088); it is still read, and its first update rewrites it as version 2.
HEADER_MAGIC = b"PMEMFS\0\x01"
HEADER_VERSION = 2
HEADER_BLOCK_SIZE = 4096
HEADER_COPY_SIZE = 2048
FLAG_CLEAN = 1
U64_MAX = (1 << 64) - 1
_HEADER = struct.Struct("<8sIIQ16sQQQQIIQI4xQ")
BADBLOCKS_OFFSET = 128
_BADBLOCK = struct.Struct("<QQ")
BADBLOCKS_MAX = (HEADER_COPY_SIZE - 8 - BADBLOCKS_OFFSET) // _BADBLOCK.size
_V1_HEADER = struct.Struct("<8sIIQ16sQQQQIIQI")
_V1_BADBLOCKS_OFFSET = 256
_V1_BADBLOCKS_MAX = (HEADER_BLOCK_SIZE - 8 - _V1_BADBLOCKS_OFFSET) // _BADBLOCK.size
COPY_NAMES = ("A", "B")


@dataclasses.dataclass(frozen=True)
class Header:
    """The pmemfs header: identity, clean flag, counters, geometry choices, badblocks table."""

    image_size: int
    uuid: bytes
    mode: str
    map: str
    align: int
    flags: int = FLAG_CLEAN
    mount_count: int = 0
    unclean_shutdowns: int = 0
    created_ns: int = 0
    last_mount_ns: int = 0
    # (first sector, sector count) extents relative to the data area.
    badblocks: tuple[tuple[int, int], ...] = ()

    @classmethod
    def for_geometry(cls, geometry: Geometry, uuid: bytes, created_ns: int) -> Header:
        return cls(geometry.size, uuid, geometry.mode, geometry.map, geometry.align, created_ns=created_ns)

    @property
    def clean(self) -> bool:
        return bool(self.flags & FLAG_CLEAN)

    def replace(self, **changes: object) -> Header:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def mounted(self, now_ns: int) -> Header:
        """This header as a mount records itself: in use, one more mount, one more unclean shutdown if
        it was not marked clean. A counter stops at 2^64-1: it cannot wrap, and an image that says it
        was mounted 2^64-1 times must still mount."""
        return self.replace(
            flags=self.flags & ~FLAG_CLEAN,
            mount_count=min(self.mount_count + 1, U64_MAX),
            unclean_shutdowns=min(self.unclean_shutdowns + (0 if self.clean else 1), U64_MAX),
            last_mount_ns=now_ns,
        )

    def pack_copy(self, sequence: int) -> bytes:
        """One 2 KiB copy of this header (version 2) with ``sequence``, checksummed."""
        if len(self.badblocks) > BADBLOCKS_MAX:
            raise ValueError(f"badblocks table holds at most {BADBLOCKS_MAX} extents")
        copy = bytearray(HEADER_COPY_SIZE)
        _HEADER.pack_into(
            copy,
            0,
            HEADER_MAGIC,
            HEADER_VERSION,
            self.flags,
            self.image_size,
            self.uuid,
            self.mount_count,
            self.unclean_shutdowns,
            self.created_ns,
            self.last_mount_ns,
            MAPS[self.map],
            int(self.mode == "devdax"),
            self.align,
            len(self.badblocks),
            sequence,
        )
        for i, (sector, count) in enumerate(self.badblocks):
            _BADBLOCK.pack_into(copy, BADBLOCKS_OFFSET + i * _BADBLOCK.size, sector, count)
        return with_checksum(copy)

    def as_dict(self) -> dict[str, object]:
        return {
            "uuid": str(uuidlib.UUID(bytes=self.uuid)),
            "clean": self.clean,
            "mounts": self.mount_count,
            "unclean_shutdowns": self.unclean_shutdowns,
            "badblock_count": sum(count for _, count in self.badblocks),
        }


@dataclasses.dataclass(frozen=True)
class HeaderBlock:
    """[0, 4096) decoded: the current header, its sequence and copy, and why each copy is not valid.

    The one place that reads and writes the header: ``decode`` a block read from the image, then
    ``update`` says what to write, and where, to replace the current header with a new one.
    """

    header: Header
    sequence: int
    current: int | None  # 0: copy A, 1: copy B, None: a version-1 header (one copy over the whole block)
    damage: tuple[str | None, str | None]  # why each copy is not a valid version-2 copy; None when it is

    @property
    def version(self) -> int:
        return 1 if self.current is None else HEADER_VERSION

    @classmethod
    def decode(cls, block: bytes) -> HeaderBlock:
        """Decode and validate both copies; the valid one with the newer sequence wins. Raise
        CorruptImage saying what is wrong when neither copy, nor the block as version 1, is valid."""
        if len(block) < HEADER_BLOCK_SIZE:
            raise CorruptImage("header: file too short to be a pmemfs image")
        copies = [_decode_copy(block[i * HEADER_COPY_SIZE : (i + 1) * HEADER_COPY_SIZE]) for i in (0, 1)]
        damage = (copies[0] if isinstance(copies[0], str) else None, copies[1] if isinstance(copies[1], str) else None)
        valid = [(i, copy) for i, copy in enumerate(copies) if not isinstance(copy, str)]
        if valid:
            current, (header, sequence) = valid[0]
            if len(valid) == 2 and _newer(valid[1][1][1], sequence):
                current, (header, sequence) = valid[1]
            return cls(header, sequence, current, damage)
        magic, version = struct.unpack_from("<8sI", block)
        if magic == HEADER_MAGIC and version == 1:
            decoded = _decode_v1(block[:HEADER_BLOCK_SIZE])
            if isinstance(decoded, str):
                raise CorruptImage(f"header: {decoded} (format version 1)")
            return cls(decoded, 0, None, damage)
        reason_a, reason_b = damage
        assert reason_a is not None and reason_b is not None
        if reason_a.startswith("bad magic") and reason_b.startswith("bad magic"):
            raise CorruptImage(f"header: {reason_a}, not a pmemfs image")
        if reason_a == reason_b:
            raise CorruptImage(f"header: {reason_a} in both copies")
        raise CorruptImage(f"header: copy A: {reason_a}; copy B: {reason_b}")

    @staticmethod
    def initial(header: Header) -> bytes:
        """The whole block for a new image (or a rebuilt header): both copies, sequence 0."""
        return header.pack_copy(0) * 2

    def update(self, header: Header) -> tuple[int, bytes]:
        """(offset, bytes) that replace the current header with ``header``: the next sequence, over
        the copy that is not current. Write them, then fdatasync.

        A version-1 header is replaced by writing copy B, which breaks version 1's checksum (it covers
        the whole block) before copy B is whole: that one write, the upgrade, is not atomic.
        """
        target = 1 if self.current is None else 1 - self.current
        # Sequences compare modulo 2^64 (see _newer), so the one after 2^64-1 is 0 and still newer.
        return target * HEADER_COPY_SIZE, header.pack_copy((self.sequence + 1) & U64_MAX)

    def restore(self) -> tuple[int, bytes] | None:
        """(offset, bytes) that rewrite a damaged copy from the current one, or None if none is damaged."""
        if self.current is None or self.damage[1 - self.current] is None:
            return None
        return (1 - self.current) * HEADER_COPY_SIZE, self.header.pack_copy(self.sequence)


def _newer(a: int, b: int) -> bool:
    """Whether sequence ``a`` is newer than ``b``: RFC 1982 serial-number order, so that the
    sequence after 2^64-1 wraps to 0 and the two copies (one apart) still compare the right way."""
    return 0 < (a - b) & U64_MAX < 1 << 63


def _decode_copy(copy: bytes) -> tuple[Header, int] | str:
    """A version-2 copy as (header, sequence), or why it is not a valid one."""
    magic, version = struct.unpack_from("<8sI", copy)
    if magic != HEADER_MAGIC:
        return f"bad magic {magic!r}"
    if version != HEADER_VERSION:
        return f"unsupported format version {version}"
    if not _checksum_ok(copy):
        return "checksum mismatch"
    *fields, nbad, sequence = _HEADER.unpack_from(copy, 0)
    header = _validated(fields, nbad, copy, BADBLOCKS_OFFSET, BADBLOCKS_MAX)
    return header if isinstance(header, str) else (header, sequence)


def _decode_v1(block: bytes) -> Header | str:
    if not _checksum_ok(block):
        return "checksum mismatch"
    *fields, nbad = _V1_HEADER.unpack_from(block, 0)
    return _validated(fields, nbad, block, _V1_BADBLOCKS_OFFSET, _V1_BADBLOCKS_MAX)


def _validated(fields: list[Any], nbad: int, block: bytes, table_offset: int, table_max: int) -> Header | str:
    _magic, _version, flags, image_size, uuid, mounts, unclean, created, last_mount, map_code, devdax, align = fields
    if flags & ~FLAG_CLEAN:
        return f"unknown flags {flags:#x}"
    if map_code not in (PFN_MODE_RAM, PFN_MODE_PMEM):
        return f"map {map_code} is neither 1 (map=mem) nor 2 (map=dev)"
    if devdax not in (0, 1):
        return f"devdax {devdax} is neither 0 (fsdax) nor 1 (devdax)"
    if align not in SUPPORTED_ALIGNS:
        return f"align {align:#x} is not a supported mapping size"
    if nbad > table_max:
        return f"badblock_count {nbad} exceeds the table's {table_max} extents"
    badblocks = tuple(_BADBLOCK.unpack_from(block, table_offset + i * _BADBLOCK.size) for i in range(nbad))
    return Header(
        image_size,
        uuid,
        "devdax" if devdax else "fsdax",
        "dev" if map_code == PFN_MODE_PMEM else "mem",
        align,
        flags,
        mounts,
        unclean,
        created,
        last_mount,
        badblocks,
    )
