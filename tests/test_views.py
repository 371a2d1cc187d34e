"""Unit tests of the views, no mount: the Perfetto converter and its validator, the heatmap's
reduction (and its speed on a 1 TiB registry), the picture read back as pixels, top's frame, and
progress on a pipe, a pseudo-terminal and --quiet."""

from __future__ import annotations

import io
import json
import mmap
import os
import time

import numpy as np
import pytest

from pmemfs.pages import RECORD_DTYPE, PageRegistry, chunks_for
from pmemfs.shared import MAP_NORESERVE, SharedState
from pmemfs.views import perfetto
from pmemfs.views.heatmap import (
    BEYOND,
    IDLE,
    LONGTERM,
    PINNED,
    REFERENCED,
    Layout,
    bad_cells,
    range_levels,
    reduce_ranges,
)
from pmemfs.views.progress import open_progress

PAGE = 4096
T0 = 1_800_000_000_000_000_000


def event(seq: int, dt_us: int, what: str, pid: int = 0, file: str = "", pfn: int = 0, npages: int = 0,
          note: str = "", column: int = 0) -> dict:  # fmt: skip
    return {"column": column, "seq": seq, "time_ns": T0 + dt_us * 1000, "what": what, "pid": pid, "file": file,
            "pfn": pfn, "npages": npages, "note": note}  # fmt: skip


def test_pins_become_slices_on_lanes_that_never_overlap() -> None:
    events = [
        event(1, 0, "session", 100, note="opened"),
        event(2, 10, "pin", 100, "dax0", 0, 2, "session pin 7 (longterm)"),
        event(3, 20, "pin", 100, "dax0", 8, 1, "session pin 8 (pin)", column=1),
        event(4, 30, "unpin", 100, "dax0", 0, 2, "session pin 7"),  # 7 ends before 8: they overlap, unnested
        event(5, 35, "refused", 200, "pmem0", 4, 1, "FOLL_LONGTERM on fsdax"),
        event(6, 40, "unpin", 100, "dax0", 8, 1, "session pin 8", column=1),
        event(7, 50, "pin", 300, "pmem0", 16, 4),  # an I/O transfer, paired by holder and pages
        event(8, 60, "unpin", 300, "pmem0", 16, 4),
        event(9, 70, "unpin", 300, "pmem0", 32, 1),  # its pin fell off the ring
        event(10, 80, "teardown", note="device reference killed"),
        event(11, 90, "pin", 400, "dax0", 3, 1, "session pin 9 (pin)"),  # still held at the read
    ]
    trace = perfetto.to_chrome_trace(events, T0 + 100_000, mountpoint="/mnt")
    assert perfetto.validate(trace) == []
    assert perfetto.summary(trace) == {"slices": 5, "instants": 3, "counter samples": 9}
    timeline = trace["traceEvents"]
    slices = [(e["name"], e["pid"], e["tid"], e["ts"]) for e in timeline if e["ph"] == "B"]
    ends = {(e["pid"], e["tid"], e["ts"]) for e in timeline if e["ph"] == "E"}
    assert sorted(slices) == sorted(
        [
            ("longterm pin", 100, 2001, 10.0),
            ("pin", 100, 2002, 20.0),  # a second lane: it overlaps the long-term pin without nesting in it
            ("pin", 300, 1001, 0.0),  # held since before the first event
            ("pin", 300, 1002, 50.0),  # inside the one before: a lane holds slices one after another
            ("pin", 400, 2001, 90.0),
        ]
    )
    assert ends == {(100, 2001, 30.0), (100, 2002, 40.0), (300, 1002, 60.0), (300, 1001, 70.0), (400, 2001, 100.0)}
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in timeline if e["name"] == "thread_name"}
    assert names[(100, 2001)] == "dax0" and names[(100, 2002)] == "dax0 #2"
    teardown = next(e for e in timeline if e["name"] == "teardown")
    assert teardown["s"] == "g" and teardown["ts"] == 80.0
    refused = next(e for e in timeline if e["name"] == "refused")
    assert (refused["pid"], refused["s"], refused["args"]["note"]) == (200, "t", "FOLL_LONGTERM on fsdax")
    counter = [(e["ts"], e["args"]["pins"]) for e in timeline if e["ph"] == "C"]
    # The pin still held at the read counts to the end.
    assert counter == [(0.0, 1), (10.0, 2), (20.0, 3), (30.0, 2), (40.0, 1), (50.0, 2), (60.0, 1), (70.0, 0),
                       (90.0, 1)]  # fmt: skip
    assert trace["otherData"]["start_unix_ns"] == T0


def test_a_pin_and_unpin_at_the_same_instant_is_a_slice_of_no_length() -> None:
    events = [event(1, 5, "pin", 1, "pmem0", 0, 1), event(2, 5, "unpin", 1, "pmem0", 0, 1),
              event(3, 5, "pin", 1, "pmem0", 0, 1), event(4, 6, "unpin", 1, "pmem0", 0, 1)]  # fmt: skip
    trace = perfetto.to_chrome_trace(events, T0 + 10_000)
    assert perfetto.validate(trace) == []
    assert [(e["ph"], e["ts"]) for e in trace["traceEvents"] if e["ph"] in "BE"] == [
        ("B", 0.0), ("E", 0.0), ("B", 0.0), ("E", 1.0)
    ]  # fmt: skip


def test_the_validator_finds_what_perfetto_would_misread() -> None:
    def trace(*events: dict) -> dict:
        return {"traceEvents": list(events), "otherData": {"start_unix_ns": T0, "read_unix_ns": T0 + 10**6}}

    b = {"ph": "B", "name": "pin", "pid": 1, "tid": 1}
    e = {"ph": "E", "name": "pin", "pid": 1, "tid": 1}
    assert perfetto.validate(trace({**b, "ts": 1}, {**e, "ts": 2})) == []
    assert "has no E" in perfetto.validate(trace({**b, "ts": 1}))[0]
    assert "E without a B" in perfetto.validate(trace({**e, "ts": 1}))[0]
    assert "goes back" in perfetto.validate(trace({**b, "ts": 5}, {**e, "ts": 2}))[0]
    assert "not microseconds" in perfetto.validate(trace({**b, "ts": 1}, {**e, "ts": 10**9}))[0]  # nanoseconds
    assert "another name" in perfetto.validate(trace({**b, "ts": 1}, {**e, "name": "get", "ts": 2}))[0]
    assert perfetto.validate({"events": []}) == ["no traceEvents list"]


def test_heatmap_cells_take_the_highest_level_of_their_pages() -> None:
    layout = Layout.for_device(1000, columns=10, max_rows=50)  # 2 pages a cell, 20 pages a row
    assert (layout.cell_pages, layout.rows, layout.cells) == (2, 50, 500)
    pages = {
        "ranges": [
            {"pfn": 1, "npages": 1, "refcount": 1},  # cell 0
            {"pfn": 2, "npages": 1, "refcount": 1},  # cell 1 ...
            {"pfn": 3, "npages": 1, "refcount": 1024},  # ... which this pin raises to pinned
            {"pfn": 40, "npages": 41, "refcount": 1025},  # cells 20-40
            {"pfn": 998, "npages": 2, "refcount": 2},  # the last cell
        ],
        "holders": [{"pfn": 40, "npages": 2, "kind": "longterm"}, {"pfn": 1, "npages": 1, "kind": "get"}],
    }
    cells = reduce_ranges(layout, *range_levels(pages)).reshape(-1)
    expected = np.full(500, IDLE, np.uint8)
    expected[0], expected[1], expected[20:41], expected[20], expected[499] = (
        REFERENCED, PINNED, PINNED, LONGTERM, REFERENCED,
    )  # fmt: skip
    assert (cells == expected).all()

    odd = Layout.for_device(1001, columns=10, max_rows=50)  # 51 rows: the last one has 1 cell of the device
    assert (reduce_ranges(odd, *range_levels({"ranges": [], "holders": []})).reshape(-1)[501:] == BEYOND).all()
    # Sectors 0-7 are page 0 (cell 0); sector 8 * 41 is in page 41 (cell 20).
    bad = bad_cells(layout, [(0, 1), (8 * 41, 3)]).reshape(-1)
    assert list(np.flatnonzero(bad)) == [0, 20]


def test_the_heatmap_of_a_1tib_registry_is_reduced_in_well_under_a_second() -> None:
    npfns = (1 << 40) // PAGE
    records = np.frombuffer(
        mmap.mmap(-1, npfns * RECORD_DTYPE.itemsize, flags=mmap.MAP_SHARED | MAP_NORESERVE), dtype=RECORD_DTYPE
    )
    registry = PageRegistry(records, epoch=1, shared=SharedState(chunks_for(npfns)))
    for pfn in range(0, npfns - 20, npfns // 2000):
        registry.get_page(pfn, 3)
    registry.pin_user_pages(npfns - 10, 10)
    started = time.perf_counter()
    ranges = registry.referenced_ranges()
    scanned = time.perf_counter()
    layout = Layout.for_device(npfns)
    cells = reduce_ranges(layout, *range_levels({"ranges": ranges, "holders": []}))
    reduced = time.perf_counter()
    print(f"1 TiB: referenced ranges {scanned - started:.3f} s, reduction {1000 * (reduced - scanned):.1f} ms")
    assert np.count_nonzero(cells == REFERENCED) == 2000 and cells.reshape(-1)[layout.cells - 1] == PINNED
    assert reduced - scanned < 0.25
    # The worst case for the reduction: a million scattered ranges.
    rng = np.random.default_rng(1)
    pfn = np.sort(rng.choice(npfns // 4, 1_000_000, replace=False)) * 4
    started = time.perf_counter()
    reduce_ranges(layout, pfn, np.full(len(pfn), 2), np.full(len(pfn), REFERENCED, np.uint8))
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_the_picture_shows_each_level_in_its_cells_and_nothing_else(tmp_path, suffix: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("PIL", reason="the heatmap needs the plot extra: pip install 'pmemfs[plot]'")
    from pmemfs.views.heatmap import draw

    layout = Layout.for_device(64512)  # a 256 MiB image's data area: 252 rows of 128 cells of 2 pages
    levels = np.zeros((layout.rows, layout.columns), np.uint8)
    levels[0, 0], levels[10, 5:9], levels[251, 127] = REFERENCED, PINNED, LONGTERM
    bad = np.zeros_like(levels, dtype=bool)
    bad[100, 64] = True
    path = str(tmp_path / f"heat.{suffix}")
    draw(path, levels, bad, layout, title="a <test> & its\ntwo lines")
    assert read_cells(path) == {(0, 0): "referenced", (10, 5): "pinned", (10, 6): "pinned", (10, 7): "pinned",
                                (10, 8): "pinned", (251, 127): "long-term pinned", (100, 64): "bad blocks"}  # fmt: skip
    if suffix == "svg":
        import xml.etree.ElementTree as ET

        texts = [text.text for text in ET.parse(path).iter("{http://www.w3.org/2000/svg}text")]
        assert texts[:2] == ["a <test> & its", "two lines"] and "bad blocks" in texts


def read_cells(path: str) -> dict[tuple[int, int], str]:
    """The cells of a heatmap PNG or SVG that are not idle, by the colour they show at their centre."""
    from PIL import Image

    if path.endswith(".svg"):
        return read_svg_cells(path)
    with Image.open(path) as image:
        info = json.loads(image.text["pmemfs-heatmap"])  # type: ignore[attr-defined]
        pixels = np.asarray(image.convert("RGB"))
    x0, y0, x1, y1 = info["axes_px"]
    rows, columns = info["rows"], info["columns"]
    xs = (x0 + (np.arange(columns) + 0.5) * (x1 - x0) / columns).astype(int)
    ys = (y0 + (np.arange(rows) + 0.5) * (y1 - y0) / rows).astype(int)
    return _named_cells(info, pixels[ys[:, None], xs[None, :]])


def read_svg_cells(path: str) -> dict[tuple[int, int], str]:
    """The same from an SVG: the embedded picture of the cells, the bad-block squares over it."""
    import base64
    import io
    import xml.etree.ElementTree as ET

    from PIL import Image

    svg = "{http://www.w3.org/2000/svg}"
    root = ET.parse(path).getroot()  # well-formed XML, or this raises
    info = json.loads(root.findtext(f"{svg}metadata") or "")
    x0, y0, x1, y1 = info["axes_px"]
    rows, columns = info["rows"], info["columns"]
    image = root.find(f"{svg}image")
    assert image is not None
    assert [float(image.get(k, "nan")) for k in ("x", "y", "width", "height")] == [x0, y0, x1 - x0, y1 - y0]
    assert "pixelated" in image.get("style", "") and image.get("preserveAspectRatio") == "none"
    encoded = image.get("href", "").removeprefix("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as cells:
        assert cells.size == (x1 - x0, y1 - y0)
        pixels = np.asarray(cells.convert("RGB"))
    xs = ((np.arange(columns) + 0.5) * (x1 - x0) / columns).astype(int)
    ys = ((np.arange(rows) + 0.5) * (y1 - y0) / rows).astype(int)
    pixels = pixels[ys[:, None], xs[None, :]]
    squares = root.find(f"{svg}g[@id='badblocks']")
    assert squares is not None
    for square in squares:
        # A square covers the cell's centre: the cell is where its own centre is.
        x = float(square.get("x", "nan")) + float(square.get("width", "nan")) / 2
        y = float(square.get("y", "nan")) + float(square.get("height", "nan")) / 2
        row, column = int((y - y0) * rows / (y1 - y0)), int((x - x0) * columns / (x1 - x0))
        pixels[row, column] = _rgb(square.get("fill", ""))
    return _named_cells(info, pixels)


def _named_cells(info: dict, colours: np.ndarray) -> dict[tuple[int, int], str]:
    """``colours`` (rows, columns, 3) named by the legend, leaving out idle cells and those past the device."""
    names = {_rgb(colour): name for name, colour in info["colours"].items()}
    names[_rgb(info["badblock_colour"])] = "bad blocks"
    found = {}
    for r, c in np.ndindex(*colours.shape[:2]):
        rgb = tuple(int(v) for v in colours[r, c])
        name = names.get(rgb, f"unknown colour {rgb}")
        if name not in ("idle", "beyond the device"):
            found[(r, c)] = name
    return found


def _rgb(colour: str) -> tuple[int, ...]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def test_progress_is_plain_lines_off_a_terminal_and_nothing_when_quiet() -> None:
    stream = io.StringIO()
    with open_progress("umount", stream=stream, delay_s=0) as progress:
        progress("waiting for 3 referenced page(s) to drain", 0, 3)
        progress("waiting for 3 referenced page(s) to drain", 1, 3)  # same text: no new line
    assert stream.getvalue() == "pmemfs: umount: waiting for 3 referenced page(s) to drain (0%)\n"
    quiet = io.StringIO()
    with open_progress("umount", quiet=True, stream=quiet, delay_s=0) as progress:
        progress("waiting", 0, 3)
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_is_a_bar_that_goes_away() -> None:
    main, secondary = os.openpty()
    with os.fdopen(secondary, "w") as terminal:
        shown = b""
        with open_progress("zero", stream=terminal, delay_s=0) as progress:
            progress("zeroing 1099511627776 bytes at offset 0", 1, 4)
            deadline = time.monotonic() + 10
            while b"25%" not in shown:  # the bar is drawn by its own refresh thread
                assert time.monotonic() < deadline, f"no bar within 10 s: {shown!r}"
                if _readable(main):
                    shown += os.read(main, 65536)
        while True:  # then what closing it wrote (the erase)
            try:
                chunk = os.read(main, 65536) if _readable(main) else b""
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    os.close(main)
    text = shown.decode(errors="replace")
    assert "zeroing 1099511627776 bytes at offset 0" in text and "25%" in text
    assert "\x1b[" in text  # drawn with escape codes, and erased at the end (transient)


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0.2)[0])


def test_top_draws_rates_totals_pins_and_holders_from_two_samples() -> None:
    from rich.console import Console

    from pmemfs.views.top import Sample, frame

    def status(reads: int, direct_reads: int, dax0_reads: int) -> dict:
        counters = {"reads": reads, "writes": 0, "read_bytes": reads * PAGE, "write_bytes": 0,
                    "direct_reads": direct_reads, "direct_writes": 0, "fsyncs": 0, "errors": 1,
                    "internal_errors": 0}  # fmt: skip
        files = {"pmem0_reads": reads - dax0_reads, "dax0_reads": dax0_reads, "pmem0_writes": 0, "dax0_writes": 0,
                 "pmem0_read_bytes": (reads - dax0_reads) * PAGE, "dax0_read_bytes": dax0_reads * PAGE,
                 "pmem0_write_bytes": 0, "dax0_write_bytes": 0, "direct_read_bytes": direct_reads * PAGE,
                 "direct_write_bytes": 0}  # fmt: skip
        registry = {"nr_foll_pin_acquired": direct_reads + 2, "nr_foll_pin_released": direct_reads,
                    "nr_get_page": 0, "nr_put_page": 0, "nr_unbalanced": 0, "nr_refused": 3, "referenced_pages": 2,
                    "pinned_pages": 2, "holders": 1, "device_alive": True}  # fmt: skip
        return {"mountpoint": "/mnt", "mode": "devdax", "map": "dev", "size": 1 << 30, "pid": os.getpid(),
                "image": "/img", "counters": counters, "file_counters": files, "registry": registry,
                "serving": {"mode": "fast", "workers": 2}}  # fmt: skip

    holder = {"pid": 4242, "file": "dax0", "pfn": 0, "npages": 2, "offset": 0, "length": 8192, "kind": "longterm",
              "age_s": 12.5}  # fmt: skip
    pages = {"ranges": [], "holders": [holder]}
    before = Sample(100.0, status(1000, 600, 100), pages, {os.getpid(): 50})
    after = Sample(102.0, status(3000, 1600, 300), pages, {os.getpid(): 50 + os.sysconf("SC_CLK_TCK")})
    console = Console(width=150, record=True, file=io.StringIO())
    console.print(frame(before, after, names=lambda pid: "rdma-app"))
    text = console.export_text()
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert "500" in lines["pmem0 direct"] and "1,600" in lines["pmem0 direct"]  # (1600 - 600) / 2 s, total
    assert "400" in lines["pmem0 buffered"] and "1,100" in lines["pmem0 buffered"]  # (2700-1500)-(1000)/2
    assert "100" in lines["dax0"] and "0.4 MB/s" in lines["dax0"]
    assert "rdma-app" in text and "longterm" in text and "12.5 s" in text and "50 %" in text


def test_without_pillow_the_heatmap_says_how_to_get_it(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    from pmemfs.errors import PmemfsError
    from pmemfs.views.heatmap import draw

    # What the imports find when Pillow is not installed (None in sys.modules is an ImportError).
    for name in [name for name in sys.modules if name.startswith("PIL.")] + ["PIL"]:
        monkeypatch.setitem(sys.modules, name, None)
    layout = Layout.for_device(1000)
    with pytest.raises(PmemfsError, match=r"pip install 'pmemfs\[plot\]'"):
        draw(str(tmp_path / "x.png"), np.zeros((layout.rows, layout.columns), np.uint8),
             np.zeros((layout.rows, layout.columns), bool), layout, title="")  # fmt: skip


def test_a_mount_hears_the_daemons_progress_as_done_and_total() -> None:
    from pmemfs import client

    read_end, write_end = os.pipe()
    os.write(write_end, b"progress resetting the registry records of the daemon that died: 40%\nprogress other\n")
    os.close(write_end)
    heard = []
    try:
        failure = client._read_until_eof(read_end, None, lambda *args: heard.append(args))  # type: ignore[arg-type]
    finally:
        os.close(read_end)
    assert failure == ""
    assert heard == [("resetting the registry records of the daemon that died: 40%", 40, 100), ("other", None, None)]


def test_check_tells_progress_of_each_invariant(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import create_image

    from pmemfs.check import check_image

    heard: list[tuple[object, ...]] = []
    image = create_image(tmp_path / "pmem.img", "16M")
    assert check_image(image, progress=lambda *args: heard.append(args)).ok
    assert [done for _, done, _ in heard] == list(range(6)) and {total for _, _, total in heard} == {6}
    assert heard[1][0] == f"{image}: header"
