"""Unit tests of the on-media format: checksum, geometry, pack/unpack, validation."""

from __future__ import annotations

import struct

import pytest

from pmemfs.errors import CorruptImage, UsageError
from pmemfs.infoblock import (
    BADBLOCKS_MAX,
    HEADER_COPY_SIZE,
    Geometry,
    Header,
    HeaderBlock,
    InfoBlock,
    fletcher64,
    parse_size,
)


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
    decoded = HeaderBlock.decode(HeaderBlock.initial(header))
    assert (decoded.header, decoded.sequence, decoded.current, decoded.damage) == (header, 0, 0, (None, None))
    with pytest.raises(CorruptImage, match="bad magic"):
        HeaderBlock.decode(bytes(4096))


def test_header_v2_layout() -> None:
    """The offsets DESIGN.md and the format comment promise, read back with plain struct."""
    header = Header(64 << 20, bytes(range(16)), "devdax", "mem", 1 << 30, 1, 7, 3, 11, 13, ((5, 6), (9, 1)))
    copy = header.pack_copy(42)
    assert len(copy) == HEADER_COPY_SIZE == 2048 and BADBLOCKS_MAX == 119
    assert struct.unpack_from("<8sIIQ16sQQQQIIQI4xQ", copy) == (
        b"PMEMFS\0\x01",
        2,
        1,
        64 << 20,
        bytes(range(16)),
        7,
        3,
        11,
        13,
        1,
        1,
        1 << 30,
        2,
        42,
    )
    assert struct.unpack_from("<4Q", copy, 128) == (5, 6, 9, 1)
    assert struct.unpack_from("<Q", copy, 2040)[0] == reference_fletcher64(copy[:2040] + bytes(8))


def _at_sequence(header: Header, sequence: int, current: int) -> bytes:
    """A block whose copy ``current`` holds ``header`` at ``sequence`` and the other the header before it."""
    older = header.replace(mount_count=header.mount_count - 1).pack_copy((sequence - 1) % 2**64)
    copies = [older, older]
    copies[current] = header.pack_copy(sequence)
    return b"".join(copies)


HEADER = Header.for_geometry(Geometry.compute(1 << 30), b"w" * 16, 5).replace(mount_count=9, badblocks=((1, 2),))
STATES = {
    "new image": HeaderBlock.initial(HEADER),
    "A current": _at_sequence(HEADER, 8, 0),
    "B current": _at_sequence(HEADER, 9, 1),
    "sequence 2^64-1 in A": _at_sequence(HEADER, 2**64 - 1, 0),
    "sequence 0 in B after a wrap": _at_sequence(HEADER, 0, 1),
}


def _apply(block: bytes, write: tuple[int, bytes]) -> bytes:
    offset, data = write
    return block[:offset] + data + block[offset + len(data) :]


@pytest.mark.parametrize("state", list(STATES))
def test_a_torn_header_update_reads_as_the_old_or_the_new_header(state: str) -> None:
    old_block = STATES[state]
    old = HeaderBlock.decode(old_block)
    new_header = old.header.mounted(123_456)
    new_block = _apply(old_block, old.update(new_header))
    new = HeaderBlock.decode(new_block)
    assert new.header == new_header and new.sequence == (old.sequence + 1) % 2**64
    assert new.current != old.current
    seen = set()
    # A power cut leaves any subset of the eight 512-byte sectors written, in any order; a prefix
    # (new[:512k] + old[512k:]) is the case the disk's in-order writeback gives.
    for written in range(256):
        torn = b"".join((new_block if written >> k & 1 else old_block)[k * 512 : (k + 1) * 512] for k in range(8))
        decoded = HeaderBlock.decode(torn)
        assert (decoded.header, decoded.sequence) in ((old.header, old.sequence), (new_header, new.sequence))
        seen.add(decoded.header == new_header)
    assert seen == {False, True}
    for k in range(9):
        decoded = HeaderBlock.decode(new_block[: 512 * k] + old_block[512 * k :])
        assert decoded.header in (old.header, new_header)


def _v1_block(header: Header) -> bytes:
    """A version-1 header as pmemfs 0.1 wrote it: one 4 KiB copy, table at 256, checksum at 4088."""
    block = bytearray(4096)
    struct.pack_into(
        "<8sIIQ16sQQQQIIQI", block, 0, b"PMEMFS\0\x01", 1, header.flags, header.image_size, header.uuid,
        header.mount_count, header.unclean_shutdowns, header.created_ns, header.last_mount_ns,
        2 if header.map == "dev" else 1, int(header.mode == "devdax"), header.align, len(header.badblocks),
    )  # fmt: skip
    for i, (sector, count) in enumerate(header.badblocks):
        struct.pack_into("<QQ", block, 256 + 16 * i, sector, count)
    struct.pack_into("<Q", block, 4088, reference_fletcher64(bytes(block)))
    return bytes(block)


def test_version_1_headers_are_read_and_upgraded() -> None:
    v1_block = _v1_block(HEADER)
    old = HeaderBlock.decode(v1_block)
    assert (old.header, old.version, old.sequence) == (HEADER, 1, 0)
    new_header = HEADER.mounted(1)
    offset, data = old.update(new_header)
    assert offset == 2048  # copy B: version 1's fields (and so the previous header) stay in place in A
    upgraded = HeaderBlock.decode(_apply(v1_block, (offset, data)))
    assert (upgraded.header, upgraded.version, upgraded.current, upgraded.sequence) == (new_header, 2, 1, 1)
    assert upgraded.damage[0] == "unsupported format version 1"
    again = HeaderBlock.decode(_apply(_apply(v1_block, (offset, data)), upgraded.update(HEADER)))
    assert (again.header, again.current, again.damage) == (HEADER, 0, (None, None))
    # The one update that is not atomic: version 1's checksum covers copy B, so a torn upgrade leaves
    # neither a version-1 header nor a whole copy B (check --repair rebuilds it from the info block).
    torn = _apply(v1_block, (offset, data[:512]))
    with pytest.raises(CorruptImage, match="checksum mismatch"):
        HeaderBlock.decode(torn)


def test_both_copies_damaged_says_why() -> None:
    block = bytearray(HeaderBlock.initial(HEADER))
    block[200] ^= 1
    assert HeaderBlock.decode(bytes(block)).current == 1  # one damaged copy: the other one serves
    block[2048 + 200] ^= 1
    with pytest.raises(CorruptImage, match="checksum mismatch in both copies"):
        HeaderBlock.decode(bytes(block))
    block[8] = 3  # copy A's version
    with pytest.raises(CorruptImage, match="copy A: unsupported format version 3; copy B: checksum mismatch"):
        HeaderBlock.decode(bytes(block))


def test_counters_saturate_instead_of_overflowing() -> None:
    worn = HEADER.replace(flags=0, mount_count=2**64 - 1, unclean_shutdowns=2**64 - 1)
    mounted = worn.mounted(2**64 - 1)
    assert (mounted.mount_count, mounted.unclean_shutdowns) == (2**64 - 1, 2**64 - 1)
    assert HeaderBlock.decode(HeaderBlock.initial(mounted)).header == mounted


def test_an_infoblock_for_an_impossible_size_is_a_corrupt_image() -> None:
    """The size check is a usage error for `create`, but damage when an existing image claims it."""
    ib = InfoBlock.unpack(InfoBlock.for_geometry(Geometry.compute(64 << 20), bytes(16)).pack())
    with pytest.raises(CorruptImage, match="info block: image size 8388608 is under the minimum"):
        ib.geometry(8 << 20)


@pytest.mark.parametrize(
    "text, value", [("4096", 4096), ("16M", 16 << 20), ("1G+1M", (1 << 30) + (1 << 20)), ("1t", 1 << 40)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value
