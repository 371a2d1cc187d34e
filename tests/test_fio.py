"""fio with crc32c verification against pmem0: direct and buffered, then verify-only after a remount."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import Mount, mounted, pmemfs

pytestmark = [
    pytest.mark.usefixtures("serving_mode"),
    pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (make test installs it)"),
]


def fio(filename: str, *args: str) -> dict:
    # Run next to the mount so fio's verify state files land in the test's temporary directory.
    cwd = os.path.dirname(os.path.dirname(filename))
    command = [
        "fio", "--output-format=json", f"--filename={filename}", "--size=128M", "--verify=crc32c",
        "--verify_fatal=1", "--exitall_on_error", *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    for job in report["jobs"]:
        assert job["error"] == 0, job
    return report


WRITERS = {
    "libaio-qd16": ["--ioengine=libaio", "--iodepth=16", "--direct=1"],
    "psync": ["--ioengine=psync", "--direct=1"],
    "buffered": ["--ioengine=psync", "--direct=0"],
}


# Every engine in the default loop; the trio loop once, at depth (its other paths are the same handlers).
@pytest.mark.parametrize(
    "serving_mode, engine",
    [("fast", engine) for engine in WRITERS] + [("trio", "libaio-qd16")],
    indirect=["serving_mode"],
)
def test_fio_randwrite_verifies_then_verifies_again_after_remount(mount: Mount, engine: str) -> None:
    job = ["--name=verify", "--rw=randwrite", "--bsrange=4k-128k", "--offset=32M", *WRITERS[engine]]
    report = fio(mount.pmem0, *job, "--do_verify=1")
    assert report["jobs"][0]["write"]["io_bytes"] >= 128 << 20
    pmemfs("umount", mount.mountpoint)
    with mounted(mount.image, mount.mountpoint):
        fio(mount.pmem0, *job, "--verify_only", "--ioengine=psync", "--direct=1")


def test_fio_several_jobs_on_separate_ranges(mount: Mount) -> None:
    fio(
        mount.pmem0, "--name=jobs", "--rw=randrw", "--bs=4k", "--ioengine=libaio", "--iodepth=8", "--direct=1",
        "--numjobs=4", "--offset_increment=32M", "--size=32M", "--do_verify=1",
    )  # fmt: skip
