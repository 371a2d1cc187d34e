"""Unit tests of the on-media format: checksum, geometry, pack/unpack, validation."""

from __future__ import annotations

import struct

import pytest

from pmemfs.errors import CorruptImage, UsageError
from pmemfs.infoblock import Geometry, Header, InfoBlock, fletcher64, parse_size


def reference_fletcher64(block: bytes) -> int:
    """drivers/nvdimm/core.c nd_fletcher64, word by word."""
    lo, hi = 0, 0
    for (word,) in struct.iter_unpack("<I", block):
        lo = (lo + word) & 0xFFFFFFFF
        hi = (hi + lo) & 0xFFFFFFFFFFFFFFFF
    return ((hi << 32) | lo) & 0xFFFFFFFFFFFFFFFF


@pytest.mark.parametrize("fill", [b"\0", b"\xff", bytes(range(256))])
def test_fletcher64_matches_the_kernel_loop(fill: bytes) -> None:
    block = (fill * 4096)[:4096]
    assert fletcher64(block) == reference_fletcher64(block)


def test_one_gib_geometry_matches_design() -> None:
    g = Geometry.compute(1 << 30)
    assert (g.dataoff, g.npfns, g.end_trunc, g.align) == (18 << 20, 257536, 0, 2 << 20)
    assert g.memmap_size == 257536 * 64


def test_map_mem_has_no_carve_out() -> None:
    g = Geometry.compute(1 << 30, map="mem")
    assert g.dataoff == 2 << 20 and g.memmap_size == 0


def test_unaligned_end_is_truncated() -> None:
    g = Geometry.compute((1 << 30) + (1 << 20))
    assert g.end_trunc == 1 << 20


@pytest.mark.parametrize(
    "size, hint", [((16 << 20) - 4096, "at least 16M"), ((1 << 30) + 100, "1073741824 or 1073745920")]
)
def test_bad_sizes_name_a_valid_size(size: int, hint: str) -> None:
    with pytest.raises(UsageError, match=hint):
        Geometry.compute(size)


def test_infoblock_roundtrip_and_corruption() -> None:
    g = Geometry.compute(1 << 30, mode="devdax")
    block = InfoBlock.for_geometry(g, b"u" * 16).pack()
    ib = InfoBlock.unpack(block)
    assert ib.mode_name == "devdax" and ib.geometry(1 << 30) == g
    flipped = bytearray(block)
    flipped[100] ^= 1
    with pytest.raises(CorruptImage, match="checksum"):
        InfoBlock.unpack(bytes(flipped))
    with pytest.raises(CorruptImage, match="signature"):
        InfoBlock.unpack(b"X" + block[1:])


def test_infoblock_geometry_must_add_up() -> None:
    g = Geometry.compute(1 << 30)
    ib = InfoBlock.for_geometry(g, bytes(16))
    with pytest.raises(CorruptImage, match="npfns"):
        InfoBlock.unpack(InfoBlock(**{**ib.__dict__, "npfns": ib.npfns + 1}).pack()).geometry(1 << 30)
    with pytest.raises(CorruptImage, match="bad offset"):
        InfoBlock.unpack(InfoBlock(**{**ib.__dict__, "dataoff": ib.dataoff + 4096}).pack()).geometry(1 << 30)


def test_header_roundtrip_keeps_badblocks() -> None:
    header = Header.for_geometry(Geometry.compute(1 << 30), b"v" * 16, 123).replace(badblocks=((8, 2), (100, 1)))
    assert Header.unpack(header.pack()) == header
    with pytest.raises(CorruptImage, match="magic"):
        Header.unpack(bytes(4096))


@pytest.mark.parametrize(
    "text, value", [("4096", 4096), ("16M", 16 << 20), ("1G+1M", (1 << 30) + (1 << 20)), ("1t", 1 << 40)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value
