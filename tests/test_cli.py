"""The CLI's promises for bad input: exit 2 for usage, exit 1 for a bad image, one line, nothing modified."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types

import pytest
from conftest import create_image, mounted, pmemfs, sha256_of


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


# Each corruption is (offset, bytes) patches; a header corruption damages both copies, A at 0 and
# B at 2048, since one intact copy is enough to open the image.
CORRUPTIONS = {
    "magic": ([(0, b"XXXX"), (2048, b"XXXX")], "bad magic"),
    "header checksum": ([(200, b"\x01"), (2048 + 200, b"\x01")], "header: checksum mismatch in both copies"),
    "info-block signature": ([(4096, b"NVDIMM_BAD_INFO\0")], "signature mismatch"),
    "info-block checksum": ([(4096 + 3000, b"\x01")], "info block: checksum mismatch"),
}


def patch(path: str, patches: list[tuple[int, bytes]]) -> None:
    with open(path, "r+b") as f:
        for offset, data in patches:
            f.seek(offset)
            f.write(data)


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_corrupt_images_are_refused_and_left_unchanged(tmp_path, what: str) -> None:  # type: ignore[no-untyped-def]
    path = create_image(tmp_path / "x.img", "64M")
    patches, says = CORRUPTIONS[what]
    patch(path, patches)
    before = sha256_of(path)
    os.mkdir(tmp_path / "mnt")
    for args in (["info", path], ["check", path], ["mount", path, str(tmp_path / "mnt")]):
        result = pmemfs(*args, check=False)
        assert result.returncode == 1, args
        assert says in result.stdout + result.stderr, (args, result.stdout, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and "internal error" not in result.stderr
    assert sha256_of(path) == before
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.parametrize("copy", ["A", "B"])
def test_one_damaged_header_copy_still_opens_and_check_restores_it(tmp_path, capsys, copy: str) -> None:  # type: ignore[no-untyped-def]
    from pmemfs.cli import main

    def run(*args: str) -> str:
        capsys.readouterr()
        assert main(list(args)) == 0
        return capsys.readouterr().out

    path = create_image(tmp_path / "x.img", "64M")
    good = read_head(path)
    damage = [({"A": 0, "B": 2048}[copy] + 200, b"\x01")]
    patch(path, damage)
    assert "mounts:             0" in run("info", path)
    assert f"note    header: copy {copy} is damaged (checksum mismatch)" in run("check", path)
    assert f"FIXED   header: copy {copy} rewritten from copy" in run("check", path, "--repair")
    assert read_head(path) == good
    patch(path, damage)
    with mounted(path, str(tmp_path / "mnt")) as mount:
        assert mount.status()["mounts"] == 1
    assert "mounts:             1\nunclean shutdowns:  0" in run("info", path)
    assert "damaged" not in run("check", path)  # the mount's two updates rewrote the damaged copy first


def read_head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


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
    from pmemfs.infoblock import HeaderBlock

    path = create_image(tmp_path / "x.img", "64M")
    with open(path, "r+b") as f:
        state = HeaderBlock.decode(f.read(4096))
        offset, copy = state.update(state.header.replace(badblocks=((8, 2), (10**9, 4))))
        f.seek(offset)
        f.write(copy)
    assert "sectors 1000000000-1000000003" in pmemfs("info", path).stdout
    result = pmemfs("check", path, check=False)
    assert result.returncode == 1 and "outside the data area" in result.stdout
    mount = pmemfs("mount", path, str(tmp_path), check=False)
    assert mount.returncode == 1 and "outside the data area" in mount.stderr and "check --repair" in mount.stderr
    assert "FIXED" in pmemfs("check", path, "--repair").stdout
    assert "sectors 8-9\n" in pmemfs("info", path).stdout + "\n"
    assert "1000000000" not in pmemfs("info", path).stdout


def test_an_info_block_for_an_image_under_16m_is_corrupt_not_a_usage_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Geometry.compute's size check is a usage error for create, but an image that claims the size is damaged."""
    from pmemfs.infoblock import HeaderBlock

    path = create_image(tmp_path / "x.img", "16M")
    with open(path, "r+b") as f:
        header = HeaderBlock.decode(f.read(4096)).header
        f.seek(0)
        f.write(HeaderBlock.initial(header.replace(image_size=8 << 20)))
        f.truncate(8 << 20)
    for args in (["info", path], ["mount", path, str(tmp_path)]):
        result = pmemfs(*args, check=False)
        assert result.returncode == 1 and "info block: image size 8388608 is under the minimum" in result.stderr
        assert len(result.stderr.splitlines()) == 1
    result = pmemfs("check", path, "--repair", check=False)
    assert result.returncode == 1 and "BAD" in result.stdout and "internal error" not in result.stderr


def test_an_unexpected_exception_is_one_line_naming_a_bug(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import pmemfs.cli
    import pmemfs.region

    def broken(path: str) -> None:
        raise ValueError("unexpected\nvalue")

    monkeypatch.setattr(pmemfs.region, "read_image_info", broken)
    monkeypatch.delenv("PMEMFS_DEBUG", raising=False)
    assert pmemfs.cli.main(["info", "x.img"]) == 1
    err = capsys.readouterr().err
    assert err == "pmemfs: internal error: ValueError: unexpected value (this is a bug in pmemfs)\n"
    monkeypatch.setenv("PMEMFS_DEBUG", "1")
    assert pmemfs.cli.main(["info", "x.img"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("(this is a bug in pmemfs)\n")


def test_the_cli_waits_for_a_starting_daemon_as_long_as_it_makes_progress(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A daemon scanning a huge crashed image says it is moving: the CLI waits past its timeout
    for it, and gives up only on one that stays silent (killing it then, as before)."""
    from pmemfs import client

    monkeypatch.setattr(client, "MOUNT_TIMEOUT_S", 0.5)

    # Stands for the daemon: writes its lines to its ready pipe at once; then it exits (the pipe
    # closes: mounted), or with "hang" it goes silent until it is killed.
    daemon_script = (
        "import os, signal, sys\n"
        "fd, then = int(sys.argv[1]), sys.argv[2]\n"
        "for line in sys.argv[3:]:\n"
        "    os.write(fd, line.encode() + b'\\n')\n"
        "if then == 'hang':\n"
        "    signal.pause()\n"
    )

    def start(lines: list[bytes], then: str) -> tuple[int, subprocess.Popen]:
        read_end, write_end = os.pipe()
        daemon = subprocess.Popen(
            [sys.executable, "-c", daemon_script, str(write_end), then, *(x.decode() for x in lines)],
            pass_fds=[write_end],
        )
        os.close(write_end)
        return read_end, daemon

    # Each step of the daemon's work takes STEP_S on the CLI's clock, which only the progress it
    # reports moves: the five steps take three times the timeout in all, each well within it.
    step_s, clock, shown = 0.3, [0.0], []

    def one_step_done(text: str, done: int | None, total: int | None) -> None:
        shown.append(done)
        clock[0] += step_s

    steps = [b"progress reading the registry records: %d%%" % p for p in range(0, 100, 20)]
    read_end, daemon = start(steps, "exit")
    try:
        with monkeypatch.context() as patched:
            patched.setattr(client, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
            assert client._read_until_eof(read_end, daemon, one_step_done) == ""
        assert shown == [0, 20, 40, 60, 80] and clock[0] > 2 * client.MOUNT_TIMEOUT_S
        assert daemon.wait(timeout=10) == 0  # not killed
    finally:
        os.close(read_end)
    # Silent after one step: given up on once MOUNT_TIMEOUT_S of the real clock has passed.
    read_end, daemon = start([b"progress reading the registry records: 10%"], "hang")
    try:
        assert "made no progress" in client._read_until_eof(read_end, daemon)
        assert daemon.wait(timeout=10) == -signal.SIGKILL
    finally:
        os.close(read_end)


def test_offline_commands_and_the_client_load_nothing_of_the_daemon(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """create, info and check run without pyfuse3 or trio; the thin client imports nothing of the
    daemon's side (what serves requests, or the shared state serving processes use)."""
    image = str(tmp_path / "x.img")
    probe = (
        "import sys\n"
        "import pmemfs.client\n"
        "daemon_side = ('pyfuse3', 'trio', 'numpy', 'pmemfs.fs', 'pmemfs.pages', 'pmemfs.shared', 'pmemfs.region')\n"
        "loaded = {m for m in daemon_side if m in sys.modules}\n"
        "assert not loaded, f'client: {loaded}'\n"
        "from pmemfs import cli\n"
        "for argv in (['create', sys.argv[1], '--size', '64M'], ['info', sys.argv[1]], ['check', sys.argv[1]]):\n"
        "    assert cli.main(argv) == 0, argv\n"
        "serving_side = ('pyfuse3', 'trio', 'pmemfs.fs', 'pmemfs.serving', 'pmemfs.daemon')\n"
        "loaded = {m for m in serving_side if m in sys.modules}\n"
        "assert not loaded, f'cli: {loaded}'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, image], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
