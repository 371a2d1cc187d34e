"""A 1 TiB region: created sparse, mounted without touching every page, daemon memory flat."""

from __future__ import annotations

import os

import pytest
from conftest import DirectFile, create_image, mounted

pytestmark = pytest.mark.usefixtures("serving_mode")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_one_tib_image(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = create_image(tmp_path / "big.img", "1T")
    with mounted(image, str(tmp_path / "mnt")) as mount:
        size = os.stat(mount.pmem0).st_size
        status = mount.status()
        assert size == status["size"] == status["npfns"] * 4096 > (1 << 40) * 98 // 100
        last = os.urandom(4096)
        with DirectFile(mount.pmem0) as direct:
            direct.pwrite(last, size - 4096)
            assert direct.pread(4096, size - 4096) == last
            assert direct.pread(4096, size // 2) == bytes(4096)
        status = mount.status()
        assert status["counters"]["direct_writes"] == 1
        assert rss_bytes(status["pid"]) < 200 << 20
    assert os.stat(image).st_blocks * 512 < 64 << 20
