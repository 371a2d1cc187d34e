"""The CLI's promises for bad input: exit 2 for usage, exit 1 for a bad image, one line, nothing modified."""

from __future__ import annotations

import os
import time

import pytest
from conftest import create_image, pmemfs, sha256_of


@pytest.mark.parametrize(
    "args, says",
    [
        ([], "required"),
        (["create", "x.img"], "--size"),
        (["create", "x.img", "--size", "lots"], "bad size"),
        (["create", "x.img", "--size", "1G", "--mode", "sector"], "invalid choice"),
        (["mount"], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, monkeypatch, args: list[str], says: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    result = pmemfs(*args, check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr
    assert not os.path.exists("x.img")


@pytest.mark.parametrize("size, nearest", [("1G+100", "1073741824 or 1073745920"), ("8M", "at least 16M")])
def test_create_refuses_invalid_sizes_naming_a_valid_one(tmp_path, size: str, nearest: str) -> None:  # type: ignore[no-untyped-def]
    result = pmemfs("create", str(tmp_path / "x.img"), "--size", size, check=False)
    assert result.returncode == 2 and nearest in result.stderr
    assert not (tmp_path / "x.img").exists()


def test_create_is_sparse_and_fast(tmp_path) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    path = create_image(tmp_path / "big.img", "1T")
    assert time.monotonic() - start < 5  # includes the interpreter start-up; creation itself is a few syscalls
    assert os.stat(path).st_size == 1 << 40
    assert os.stat(path).st_blocks * 512 < 1 << 20


def test_create_does_not_overwrite_without_force(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = create_image(tmp_path / "x.img", "16M")
    before = sha256_of(path)
    result = pmemfs("create", path, "--size", "32M", check=False)
    assert result.returncode == 2 and "--force" in result.stderr
    assert sha256_of(path) == before
    pmemfs("create", path, "--size", "32M", "--force")
    assert os.stat(path).st_size == 32 << 20


CORRUPTIONS = {
    "magic": (0, b"XXXX", "bad magic"),
    "header checksum": (200, b"\x01", "header: checksum mismatch"),
    "info-block signature": (4096, b"NVDIMM_BAD_INFO\0", "signature mismatch"),
    "info-block checksum": (4096 + 3000, b"\x01", "info block: checksum mismatch"),
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_corrupt_images_are_refused_and_left_unchanged(tmp_path, what: str) -> None:  # type: ignore[no-untyped-def]
    path = create_image(tmp_path / "x.img", "64M")
    offset, patch, says = CORRUPTIONS[what]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(patch)
    before = sha256_of(path)
    os.mkdir(tmp_path / "mnt")
    for args in (["info", path], ["check", path], ["mount", path, str(tmp_path / "mnt")]):
        result = pmemfs(*args, check=False)
        assert result.returncode == 1, args
        assert says in result.stdout + result.stderr, (args, result.stdout, result.stderr)
    assert sha256_of(path) == before
    assert not os.path.ismount(tmp_path / "mnt")


def test_impossible_geometry_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An info block with a consistent checksum but npfns that does not fit the file."""
    from pmemfs.infoblock import Geometry, InfoBlock

    path = create_image(tmp_path / "x.img", "64M")
    with open(path, "r+b") as f:
        f.seek(4096)
        ib = InfoBlock.unpack(f.read(4096))
        g = Geometry.compute(64 << 20)
        f.seek(4096)
        f.write(InfoBlock(**{**ib.__dict__, "npfns": g.npfns * 2}).pack())
    before = sha256_of(path)
    result = pmemfs("mount", path, str(tmp_path), check=False)
    assert result.returncode == 1 and "npfns" in result.stderr
    assert sha256_of(path) == before


def test_check_repairs_an_info_block_from_the_header(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = create_image(tmp_path / "x.img", "64M", "--mode", "devdax")
    with open(path, "rb") as f:
        good = f.read(8192)
    with open(path, "r+b") as f:
        f.seek(4096 + 56)
        f.write(b"\xff" * 8)  # dataoff
    assert pmemfs("check", path, check=False).returncode == 1
    repaired = pmemfs("check", path, "--repair")
    assert "FIXED" in repaired.stdout
    with open(path, "rb") as f:
        assert f.read(8192) == good
    assert pmemfs("check", path).returncode == 0


def test_wrong_file_size_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = create_image(tmp_path / "x.img", "64M")
    os.truncate(path, 80 << 20)
    result = pmemfs("info", path, check=False)
    assert result.returncode == 1 and "image_size" in result.stderr


def test_check_flags_and_repairs_badblocks_outside_the_data_area(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pmemfs.infoblock import Header

    path = create_image(tmp_path / "x.img", "64M")
    with open(path, "r+b") as f:
        header = Header.unpack(f.read(4096))
        f.seek(0)
        f.write(header.replace(badblocks=((8, 2), (10**9, 4))).pack())
    assert "sectors 1000000000-1000000003" in pmemfs("info", path).stdout
    result = pmemfs("check", path, check=False)
    assert result.returncode == 1 and "outside the data area" in result.stdout
    assert "FIXED" in pmemfs("check", path, "--repair").stdout
    assert "sectors 8-9\n" in pmemfs("info", path).stdout + "\n"
    assert "1000000000" not in pmemfs("info", path).stdout
