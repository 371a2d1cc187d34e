"""ndctl is an independent reader and writer of the info block: it must agree with every image we create."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import create_image

SIZES = ["16M", "1G", "1G+1M", "3G+4K", "1T"]
GEOMETRY_FIELDS = ("dataoff", "npfns", "end_trunc", "align", "mode", "page_size", "page_struct_size")

pytestmark = pytest.mark.skipif(shutil.which("ndctl") is None, reason="ndctl is not installed (make test installs it)")


def ndctl_read(path: str) -> dict:
    result = subprocess.run(["ndctl", "read-infoblock", "-V", "-j", "-i", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    blocks = json.loads(result.stdout)
    assert len(blocks) == 1, f"ndctl verified {len(blocks)} info blocks: {result.stderr}"
    return blocks[0]


def ndctl_reference(size: str, map_: str, mode: str) -> dict:
    writer = subprocess.run(
        ["ndctl", "write-infoblock", "-s", size, "-M", map_, "-m", mode, "-c"],
        capture_output=True,
    )
    assert writer.returncode == 0, writer.stderr
    reader = subprocess.run(["ndctl", "read-infoblock", "-j"], input=writer.stdout, capture_output=True)
    assert reader.returncode == 0, reader.stderr
    return json.loads(reader.stdout)[0]


def size_in_bytes(size: str) -> str:
    from pmemfs.infoblock import parse_size

    return str(parse_size(size))


@pytest.mark.parametrize("map_", ["dev", "mem"])
@pytest.mark.parametrize("size", SIZES)
def test_ndctl_accepts_and_agrees(tmp_path, size: str, map_: str) -> None:  # type: ignore[no-untyped-def]
    path = create_image(tmp_path / "x.img", size, "--map", map_)
    ours = ndctl_read(path)
    reference = ndctl_reference(size_in_bytes(size), map_, "fsdax")
    assert {f: ours[f] for f in GEOMETRY_FIELDS} == {f: reference[f] for f in GEOMETRY_FIELDS}
    assert ours["signature"] == "NVDIMM_PFN_INFO" and ours["version"] == "1.4"


def test_devdax_signature(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = create_image(tmp_path / "x.img", "1G", "--mode", "devdax")
    ours = ndctl_read(path)
    reference = ndctl_reference(size_in_bytes("1G"), "dev", "devdax")
    assert ours["signature"] == reference["signature"] == "NVDIMM_DAX_INFO"
    assert {f: ours[f] for f in GEOMETRY_FIELDS} == {f: reference[f] for f in GEOMETRY_FIELDS}
