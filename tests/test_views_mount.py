"""The views through a real mount: top after a fio run, the heatmap of known pins read back as
pixels, the Perfetto timeline of a pin/unpin scenario, and progress on a pseudo-terminal, in a
pipe and with --quiet."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import PMEMFS, Mount, create_image, mounted, pmemfs
from test_views import read_cells

from pmemfs.client import PinSession
from pmemfs.errors import PmemfsError
from pmemfs.views import perfetto
from pmemfs.views.heatmap import Layout

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30


def fio(filename: str, *args: str) -> dict:
    command = ["fio", "--output-format=json", f"--filename={filename}", "--name=views", "--ioengine=psync", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]  # type: ignore[no-any-return]


def top_rows(text: str) -> dict[str, list[str]]:
    """The cells of each row of top's tables, by the row's first cell."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line)[1:-1]]
        if len(cells) > 2:
            rows[cells[0]] = cells
    return rows


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (make test installs it)")
def test_top_once_shows_the_counters_a_fio_run_produced_and_the_oldest_holder(mount: Mount) -> None:
    dax0 = os.path.join(mount.mountpoint, "dax0")
    written = fio(mount.pmem0, "--rw=write", "--bs=4k", "--size=4M", "--direct=1")["write"]
    read = fio(dax0, "--rw=read", "--bs=64k", "--size=1M", "--direct=0")["read"]
    assert (written["total_ios"], written["io_bytes"]) == (1024, 4 * MiB)
    with PinSession(mount.mountpoint) as session:
        session.pin("dax0", 8 * MiB, 2 * MiB, longterm=True)
        result = pmemfs("top", mount.mountpoint, "--once", "--interval", "0.2")
    rows = top_rows(result.stdout)
    # file, reads/s, writes/s, read, write, reads, writes, read bytes, written
    assert rows["pmem0 direct"][5:] == ["0", "1,024", "0 B", "4.0 MiB"], result.stdout
    assert rows["pmem0 buffered"][5:] == ["0", "0", "0 B", "0 B"], result.stdout
    dax0_reads, dax0_read_bytes = int(rows["dax0"][5].replace(",", "")), rows["dax0"][7]
    assert dax0_reads > 0 and dax0_read_bytes.endswith(("MiB", "KiB")) and rows["dax0"][6] == "0", result.stdout
    assert read["io_bytes"] == MiB
    assert rows["all"][6] == "1,024", result.stdout
    with open(f"/proc/{os.getpid()}/comm") as f:
        command = f.read().strip()
    holder = rows[str(os.getpid())]  # pid, command, file, offset, length, pages, kind, age
    assert holder[1:7] == [command, "dax0", str(8 * MiB), "2.0 MiB", "2048-2559", "longterm"], result.stdout
    assert rows["long-term pins"][1] == "1" and rows["pins in flight"][1] == "512 pages", result.stdout
    assert "fast loop" in result.stdout and "daemon" in result.stdout


def test_the_heatmap_colours_the_cells_of_the_pins_and_no_others(mount: Mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("PIL", reason="the heatmap needs the plot extra: pip install 'pmemfs[plot]'")
    npfns = mount.status()["npfns"]
    layout = Layout.for_device(npfns)
    bad_block = 200 * MiB // 512
    with PinSession(mount.mountpoint) as session:
        session.pin("pmem0", 0, 64 * 1024)
        session.pin("dax0", 100 * MiB, 2 * MiB, longterm=True)
        session.inject(bad_block, 1)
        png, svg = str(tmp_path / "pins.png"), str(tmp_path / "pins.svg")
        result = pmemfs("pages", mount.mountpoint, "--heatmap", png)
        pmemfs("pages", mount.mountpoint, "--heatmap", svg)
    assert result.stdout.startswith(f"wrote {png}: {layout.rows} rows of 1M")

    def cells(first_byte: int, length: int) -> set[tuple[int, int]]:
        first, last = first_byte // PAGE // layout.cell_pages, (first_byte + length - 1) // PAGE // layout.cell_pages
        return {divmod(cell, layout.columns) for cell in range(first, last + 1)}

    expected = dict.fromkeys(cells(0, 64 * 1024), "pinned")
    expected.update(dict.fromkeys(cells(100 * MiB, 2 * MiB), "long-term pinned"))
    expected.update(dict.fromkeys(cells(bad_block * 512, 512), "bad blocks"))
    assert read_cells(png) == expected
    assert read_cells(svg) == expected


def test_the_heatmap_of_a_1tib_device_shows_pins_at_its_far_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The size the command is made for: 32 MiB cells, 4 GiB rows; how long it took is printed, not judged."""
    pytest.importorskip("PIL", reason="the heatmap needs the plot extra: pip install 'pmemfs[plot]'")
    image = create_image(tmp_path / "big.img", "1T")
    with mounted(image, str(tmp_path / "mnt")) as mount:
        npfns = mount.status()["npfns"]
        layout = Layout.for_device(npfns)
        assert (layout.cell_bytes, layout.row_bytes) == (32 * MiB, 4 * GiB)
        last_page = (npfns - 1) * PAGE
        bad_block = 700 * GiB // 512
        with PinSession(mount.mountpoint) as session:
            session.pin("pmem0", 0, PAGE)
            session.pin("pmem0", 300 * GiB + 33 * MiB, 64 * MiB)  # across three cells
            session.pin("dax0", last_page, PAGE, longterm=True)
            session.inject(bad_block, 8)
            png, svg = str(tmp_path / "big.png"), str(tmp_path / "big.svg")
            started = time.perf_counter()
            pmemfs("pages", mount.mountpoint, "--heatmap", png)
            png_s = time.perf_counter() - started
            pmemfs("pages", mount.mountpoint, "--heatmap", svg)
            print(f"1 TiB heatmap: png {png_s:.2f} s, svg {time.perf_counter() - started - png_s:.2f} s")

    def cell(offset: int) -> tuple[int, int]:
        return divmod(offset // layout.cell_bytes, layout.columns)

    expected = {cell(0): "pinned", cell(last_page): "long-term pinned", cell(bad_block * 512): "bad blocks"}
    expected.update(dict.fromkeys([cell(300 * GiB + 32 * MiB * i) for i in (1, 2, 3)], "pinned"))
    assert read_cells(png) == expected
    assert read_cells(svg) == expected


def test_the_perfetto_timeline_of_pins_holds_exactly_their_slices(mount: Mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "trace.json")
    with PinSession(mount.mountpoint) as session:
        short = session.pin("pmem0", 0, 8192)
        session.pin("dax0", MiB, 4096, longterm=True)
        session.unpin(int(short["id"]))  # type: ignore[call-overload]
        with pytest.raises(PmemfsError):
            session.pin("pmem0", 0, 4096, longterm=True)  # fsdax refuses FOLL_LONGTERM
        result = pmemfs("trace", mount.mountpoint, "--perfetto", out)
    assert "2 slice(s)" in result.stdout and "ui.perfetto.dev" in result.stdout
    with open(out) as f:
        trace = json.load(f)
    assert perfetto.validate(trace) == []
    events = trace["traceEvents"]
    me = os.getpid()
    begins = [(e["name"], e["pid"], e["tid"], e["args"]["pages"], e["args"].get("end"))
              for e in events if e["ph"] == "B"]  # fmt: skip
    assert begins == [
        ("pin", me, 1001, "0+2", f"session pin {short['id']}"),
        ("longterm pin", me, 2001, "256+1", "still held when the trace was read"),
    ]
    spans = {e["name"]: e["ts"] for e in events if e["ph"] == "B"}
    pin_end = next(e["ts"] for e in events if e["ph"] == "E" and e["name"] == "pin")
    assert spans["pin"] < spans["longterm pin"] < pin_end  # overlapping, on tracks of their own files
    refused = [e for e in events if e["ph"] == "i" and e["name"] == "refused"]
    assert [(e["pid"], e["tid"], e["args"]["note"]) for e in refused] == [(me, 1001, "FOLL_LONGTERM on fsdax")]
    assert [e["args"]["pins"] for e in events if e["ph"] == "C"] == [1, 2, 1]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names[me].startswith(f"pid {me} (")


@contextlib.contextmanager
def pin_held(mount: Mount, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """A `pmemfs pin` of dax0's first two pages, killed after ``seconds`` (its pins drop as its session closes)."""
    holder = subprocess.Popen(
        [*PMEMFS, "pin", mount.mountpoint, "--file", "dax0", "--offset", "0", "--length", "8K", "--longterm"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("pinned")
        killer = threading.Timer(seconds, holder.send_signal, [signal.SIGKILL])
        killer.start()
        try:
            yield holder
        finally:
            killer.cancel()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def on_pty(*args: str) -> tuple[int, str]:
    """Run ``pmemfs ARGS`` on a pseudo-terminal (stdout and stderr); its exit status and what it drew."""
    main, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}  # a terminal that can move its cursor, as a user's does
    process = subprocess.Popen([*PMEMFS, *args], stdin=secondary, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    shown = b""
    try:
        while True:
            if select.select([main], [], [], 30)[0]:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: the last writer closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
    finally:
        os.close(main)
    return process.wait(timeout=30), shown.decode(errors="replace")


def test_progress_is_drawn_on_a_terminal_and_plain_in_a_pipe(mount: Mount) -> None:
    with pin_held(mount, 1.0) as holder:
        code, shown = on_pty("zero", mount.mountpoint, "--offset", "0", "--length", "64K")
    assert code == 0, shown
    assert f"waiting for busy page 0: pid {holder.pid} (" in shown
    assert "\x1b[" in shown and "zeroed 65536 bytes at offset 0" in shown

    with pin_held(mount, 1.0) as holder:
        piped = pmemfs("zero", mount.mountpoint, "--offset", "0", "--length", "64K")
    line = rf"pmemfs: zero: waiting for busy page 0: pid {holder.pid} \(\S+\) longterm on dax0 0\+8192, [\d.]+ s\n"
    assert re.fullmatch(f"({line})+", piped.stderr), piped.stderr
    assert "\x1b" not in piped.stderr + piped.stdout and "\r" not in piped.stderr

    with pin_held(mount, 1.0):
        quiet = pmemfs("zero", mount.mountpoint, "--offset", "0", "--length", "64K", "--quiet")
    assert quiet.stderr == "" and quiet.stdout == "zeroed 65536 bytes at offset 0\n"


def test_umount_on_a_terminal_shows_the_pins_it_waits_for(mount: Mount) -> None:
    with pin_held(mount, 1.0) as holder:
        code, shown = on_pty("umount", mount.mountpoint)
    assert code == 0, shown
    assert f"2 referenced page(s) to drain; oldest: pid {holder.pid} (" in shown
    assert "\x1b[" in shown and f"unmounted {mount.mountpoint}" in shown


def test_top_on_a_terminal_redraws_until_q(mount: Mount) -> None:
    main, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    # rich takes LINES and COLUMNS over the terminal's size, and a parent may have set them (pytest-xdist's
    # workers have 24x80, where the frame is cut before the holders): the terminal's size it is.
    env = {**os.environ, "TERM": "xterm-256color", "LINES": "50", "COLUMNS": "120"}
    top = subprocess.Popen([*PMEMFS, "top", mount.mountpoint, "--interval", "0.2"], stdin=secondary,
                           stdout=secondary, stderr=secondary, env=env)  # fmt: skip
    os.close(secondary)
    shown = b""
    deadline = time.monotonic() + 30
    try:
        while shown.count(b"Oldest holders") < 2:  # the first frame and one redraw
            assert time.monotonic() < deadline and select.select([main], [], [], 10)[0], shown.decode(errors="replace")
            shown += os.read(main, 65536)
        os.write(main, b"q")
        assert top.wait(timeout=10) == 0
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        os.close(main)
    assert b"\x1b[?1049h" in shown  # the alternate screen, left on the way out
