"""``pmemfs pages --heatmap``: the data area as a picture of who references it, a cell per few pages.

The device is laid out in rows of ``COLUMNS`` cells; a cell is a power of two of pages, chosen so
that the whole device fits in ``MAX_ROWS`` rows, and its colour is the highest level of any page
in it: referenced (get_page), pinned (refcount >= GUP_PIN_COUNTING_BIAS), long-term pinned (a
FOLL_LONGTERM holder). Cells with poisoned sectors carry a black square. The reduction works on the
registry's referenced ranges with numpy (no Python loop per page or per cell), so a 1 TiB device
is reduced in milliseconds; heatmap_picture.py draws it with Pillow (``pip install 'pmemfs[plot]'``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PmemfsError
from ..infoblock import PAGE_SIZE, SECTOR_SIZE
from ..records import GUP_PIN_COUNTING_BIAS
from ..sizes import format_size

COLUMNS = 128
MAX_ROWS = 256
LEVELS = ("idle", "referenced", "pinned", "long-term pinned")
IDLE, REFERENCED, PINNED, LONGTERM = range(len(LEVELS))
BEYOND = len(LEVELS)  # cells of the last row past the end of the device
# Exact colours, so that a test (or a script) can read the picture back as pixels.
COLOURS = ("#ececec", "#4c8fd6", "#f29a2e", "#c8102e", "#ffffff")
BADBLOCK_COLOUR = "#000000"
PNG_METADATA_KEY = "pmemfs-heatmap"
INSTALL_HINT = "pmemfs pages --heatmap needs Pillow: pip install 'pmemfs[plot]'"


@dataclass(frozen=True)
class Layout:
    npfns: int
    cell_pages: int
    columns: int = COLUMNS

    @classmethod
    def for_device(cls, npfns: int, columns: int = COLUMNS, max_rows: int = MAX_ROWS) -> Layout:
        """The smallest power-of-two cell that fits ``npfns`` pages in ``max_rows`` rows."""
        cell_pages = 1
        while -(-npfns // (cell_pages * columns)) > max_rows:
            cell_pages *= 2
        return cls(npfns, cell_pages, columns)

    @property
    def cells(self) -> int:
        return -(-self.npfns // self.cell_pages)

    @property
    def rows(self) -> int:
        return -(-self.cells // self.columns)

    @property
    def cell_bytes(self) -> int:
        return self.cell_pages * PAGE_SIZE

    @property
    def row_bytes(self) -> int:
        return self.cell_bytes * self.columns


def range_levels(pages: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``.pmemfs/pages`` as (first pfn, npages, level) arrays: each referenced range at the level its
    refcount says, then each long-term holder's range at LONGTERM (the refcount cannot tell)."""
    ranges = pages["ranges"]
    longterm = [h for h in pages["holders"] if h["kind"] == "longterm"]
    pfn = np.fromiter((r["pfn"] for r in ranges), np.int64, len(ranges))
    npages = np.fromiter((r["npages"] for r in ranges), np.int64, len(ranges))
    refcount = np.fromiter((r["refcount"] for r in ranges), np.int64, len(ranges))
    level = np.where(refcount >= GUP_PIN_COUNTING_BIAS, PINNED, REFERENCED).astype(np.uint8)
    if longterm:
        pfn = np.concatenate([pfn, [h["pfn"] for h in longterm]])
        npages = np.concatenate([npages, [h["npages"] for h in longterm]])
        level = np.concatenate([level, np.full(len(longterm), LONGTERM, np.uint8)])
    return pfn, npages, level


def reduce_ranges(layout: Layout, pfn: np.ndarray, npages: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The highest ``level`` over each cell of ``layout`` (IDLE where nothing is), as (rows, columns),
    cells past the device at BEYOND. Ranges may overlap; the work is O(ranges + cells they cover)."""
    cells = np.zeros(layout.rows * layout.columns, np.uint8)
    keep = npages > 0
    if keep.any():
        first = pfn[keep] // layout.cell_pages
        last = (pfn[keep] + npages[keep] - 1) // layout.cell_pages
        count = last - first + 1
        # Every (range, cell) pair at once: the cell index is the range's first cell plus a step.
        starts = np.repeat(np.cumsum(count) - count, count)
        index = np.repeat(first, count) + (np.arange(int(count.sum())) - starts)
        np.maximum.at(cells, index, np.repeat(level[keep], count))
    cells[layout.cells :] = BEYOND
    return cells.reshape(layout.rows, layout.columns)


def bad_cells(layout: Layout, badblocks: list[tuple[int, int]]) -> np.ndarray:
    """Which cells hold a poisoned sector, as (rows, columns) booleans: the pages of each extent,
    reduced as the references are."""
    extents = np.asarray(badblocks, np.int64).reshape(-1, 2)
    sectors_per_page = PAGE_SIZE // SECTOR_SIZE
    first = extents[:, 0] // sectors_per_page
    npages = (extents[:, 0] + extents[:, 1] - 1) // sectors_per_page - first + 1
    return reduce_ranges(layout, first, npages, np.ones(len(extents), np.uint8)) == 1


def draw(
    path: str,
    levels: np.ndarray,
    bad: np.ndarray,
    layout: Layout,
    *,
    title: str,
) -> dict[str, object]:
    """Write the picture to ``path`` (.png or .svg); return what a reader of its pixels needs to
    know (stored in the PNG as the ``pmemfs-heatmap`` text chunk, in the SVG as its metadata)."""
    try:
        # The picture module's own imports would say this too, unless an earlier call loaded it.
        import PIL.Image  # noqa: F401
    except ImportError:
        raise PmemfsError(INSTALL_HINT) from None
    from .heatmap_picture import Frame, write_png, write_svg

    if not path.endswith((".png", ".svg")):
        raise PmemfsError(f"{path}: the heatmap is written as .png or .svg; name the file so")
    frame = Frame(layout, title)
    (write_png if path.endswith(".png") else write_svg)(path, frame, levels, bad)
    return frame.info()


def heatmap(path: str, status: dict, pages: dict, badblocks: list[tuple[int, int]]) -> Layout:
    """Draw the device of ``status`` (``.pmemfs/status``) with ``pages`` and ``badblocks`` to ``path``;
    return the layout drawn."""
    layout = Layout.for_device(int(status["npfns"]))
    levels = reduce_ranges(layout, *range_levels(pages))
    bad = bad_cells(layout, badblocks)
    counts = np.bincount(levels.reshape(-1), minlength=len(LEVELS) + 1)
    title = (
        f"{status['mountpoint']}: {status['mode']} map={status['map']}, data area "
        f"{format_size(int(status['npfns']) * PAGE_SIZE)} ({status['npfns']} pages, dataoff {status['dataoff']})\n"
        f"cells referenced {counts[REFERENCED]}, pinned {counts[PINNED]}, long-term pinned {counts[LONGTERM]}; "
        f"cells with bad blocks {int(bad.sum())}"
    )
    draw(path, levels, bad, layout, title=title)
    return layout
