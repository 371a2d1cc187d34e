"""The on-media format: pmemfs header at 0, kernel ``struct nd_pfn_sb`` at 4 KiB, and their geometry.

Layouts follow DESIGN.md section 1 and Linux ``drivers/nvdimm/pfn.h`` so that
``ndctl read-infoblock`` and a Linux guest read the same namespace we do.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid as uuidlib

import numpy as np

from .errors import CorruptImage, UsageError

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
_CHECKSUM_OFFSET = INFOBLOCK_SIZE - 8


def fletcher64(block: bytes | bytearray | memoryview) -> int:
    """nd_fletcher64 over little-endian u32 words: lo wraps at 2^32, hi accumulates lo."""
    words = np.frombuffer(block, dtype="<u4").astype(np.uint64)
    # Only the low 32 bits of hi survive the final shift, and 1024 words keep every sum far below 2^64.
    lo = np.cumsum(words) & 0xFFFFFFFF
    hi = int(lo.sum()) & 0xFFFFFFFF
    return (hi << 32) | int(lo[-1])


def _checksummed(block: bytearray) -> bytearray:
    block[_CHECKSUM_OFFSET:] = b"\0" * 8
    struct.pack_into("<Q", block, _CHECKSUM_OFFSET, fletcher64(block))
    return block


def _checksum_ok(block: bytes) -> bool:
    stored = struct.unpack_from("<Q", block, _CHECKSUM_OFFSET)[0]
    zeroed = bytearray(block)
    zeroed[_CHECKSUM_OFFSET:] = b"\0" * 8
    return stored == fletcher64(zeroed)


def parse_size(text: str) -> int:
    """Parse '1G', '512M', '4096', '3G+4K' style sizes (binary suffixes)."""
    total = 0
    for part in text.strip().split("+"):
        part = part.strip().upper().removesuffix("IB").removesuffix("B")
        if not part:
            raise ValueError(f"bad size {text!r}")
        shift = {"K": 10, "M": 20, "G": 30, "T": 40}.get(part[-1], 0)
        digits = part[:-1] if shift else part
        if not digits.isdigit():
            raise ValueError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix")
        total += int(digits) << shift
    return total


def format_size(size_bytes: int) -> str:
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size_bytes and size_bytes % (1 << shift) == 0:
            return f"{size_bytes >> shift}{suffix}"
    return str(size_bytes)


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
        return bytes(_checksummed(block))

    @classmethod
    def unpack(cls, block: bytes) -> InfoBlock:
        """Decode and validate as the kernel's nd_pfn_validate would; raise CorruptImage naming the field."""
        if len(block) < INFOBLOCK_SIZE:
            raise CorruptImage("info block: image too short to hold an nd_pfn_sb at 4 KiB")
        ib = cls(*_PFN_SB.unpack_from(block, 0))
        if ib.signature not in (PFN_SIG, DAX_SIG):
            raise CorruptImage(f"info block: signature mismatch ({ib.signature.rstrip(bytes(1))!r})")
        if not _checksum_ok(block):
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
        expected = Geometry.compute(size, mode=self.mode_name, map=self.map_name, align=self.align)
        for field in ("dataoff", "npfns", "end_trunc"):
            if getattr(self, field) != getattr(expected, field):
                raise CorruptImage(
                    f"info block: {field} is {getattr(self, field)}, but an image of {size} bytes "
                    f"with map={self.map_name} align={self.align:#x} needs {getattr(expected, field)}"
                )
        return expected


# The pmemfs header. The kernel never reads these bytes. It repeats the info block's mode, map and
# align so that `pmemfs check --repair` can rebuild a damaged info block from it.
HEADER_MAGIC = b"PMEMFS\0\x01"
HEADER_VERSION = 1
FLAG_CLEAN = 1
_HEADER = struct.Struct("<8sIIQ16sQQQQIIQI")
BADBLOCKS_OFFSET = 256
_BADBLOCK = struct.Struct("<QQ")
BADBLOCKS_MAX = (_CHECKSUM_OFFSET - BADBLOCKS_OFFSET) // _BADBLOCK.size


@dataclasses.dataclass(frozen=True)
class Header:
    """The pmemfs header at byte 0: identity, clean flag, counters, geometry choices, badblocks table."""

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

    def pack(self) -> bytes:
        if len(self.badblocks) > BADBLOCKS_MAX:
            raise ValueError(f"badblocks table holds at most {BADBLOCKS_MAX} extents")
        block = bytearray(PAGE_SIZE)
        _HEADER.pack_into(
            block,
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
        )
        for i, (sector, count) in enumerate(self.badblocks):
            _BADBLOCK.pack_into(block, BADBLOCKS_OFFSET + i * _BADBLOCK.size, sector, count)
        return bytes(_checksummed(block))

    @classmethod
    def unpack(cls, block: bytes) -> Header:
        if len(block) < PAGE_SIZE:
            raise CorruptImage("header: file too short to be a pmemfs image")
        (
            magic,
            version,
            flags,
            image_size,
            uuid,
            mounts,
            unclean,
            created,
            last_mount,
            map_code,
            devdax,
            align,
            nbad,
        ) = _HEADER.unpack_from(block, 0)
        if magic != HEADER_MAGIC:
            raise CorruptImage(f"header: bad magic {magic!r}, not a pmemfs image")
        if not _checksum_ok(block):
            raise CorruptImage("header: checksum mismatch")
        if version != HEADER_VERSION:
            raise CorruptImage(
                f"header: format version {version} is not supported (this pmemfs reads {HEADER_VERSION})"
            )
        if map_code not in (PFN_MODE_RAM, PFN_MODE_PMEM) or devdax not in (0, 1):
            raise CorruptImage(f"header: map {map_code} / devdax {devdax} are not valid values")
        if nbad > BADBLOCKS_MAX:
            raise CorruptImage(f"header: badblock_count {nbad} exceeds the table's {BADBLOCKS_MAX} extents")
        badblocks = tuple(_BADBLOCK.unpack_from(block, BADBLOCKS_OFFSET + i * _BADBLOCK.size) for i in range(nbad))
        return cls(
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

    def as_dict(self) -> dict[str, object]:
        return {
            "uuid": str(uuidlib.UUID(bytes=self.uuid)),
            "clean": self.clean,
            "mounts": self.mount_count,
            "unclean_shutdowns": self.unclean_shutdowns,
            "badblock_count": sum(count for _, count in self.badblocks),
        }
