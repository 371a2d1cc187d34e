"""The heatmap drawn: one frame of pixel positions, written as a PNG with Pillow or as SVG text.

Pillow rather than matplotlib: importing matplotlib's figure alone took 0.8-0.9 s, most of the
command's 2 s on a 1 TiB device. The cells are a numpy raster at whole pixels per cell; the frame
around them is a handful of lines, rectangles and labels that both writers draw the same way.
"""

from __future__ import annotations

import base64
import functools
import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ..errors import PmemfsError
from ..sizes import format_size
from .heatmap import BADBLOCK_COLOUR, COLOURS, LEVELS, PNG_METADATA_KEY, Layout

COLUMN_PX = 6
LEFT_PX, TOP_PX, BOTTOM_PX, LEGEND_PX = 130, 80, 60, 200
FONT_PX, TITLE_FONT_PX = 13, 12
TEXT_COLOUR, EDGE_COLOUR, BACKGROUND = "#000000", "#888888", "#ffffff"


@dataclass(frozen=True)
class Label:
    x: int
    baseline: int  # for a vertical label, where it is centred: it reads upwards along x = self.x
    text: str
    align: str = "start"  # SVG's text-anchor: start, middle or end
    size_px: int = FONT_PX
    vertical: bool = False


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    width: int
    height: int
    fill: str
    edge: str | None = None


@dataclass(frozen=True)
class Frame:
    """Where each part of the picture goes, in pixels from the top-left corner."""

    layout: Layout
    title: str

    @property
    def row_px(self) -> int:
        # At least 3 pixels a row, so that every cell has a pixel of its own colour at its centre.
        return max(3, min(12, 900 // self.layout.rows))

    @property
    def axes(self) -> tuple[int, int, int, int]:
        x0, y0 = LEFT_PX, TOP_PX
        return x0, y0, x0 + self.layout.columns * COLUMN_PX, y0 + self.layout.rows * self.row_px

    @property
    def size(self) -> tuple[int, int]:
        _, _, x1, y1 = self.axes
        return x1 + LEGEND_PX, y1 + BOTTOM_PX

    def badblock_square(self, row: int, column: int) -> Box:
        """A black square in the middle of the cell: the cell's own colour still shows around it."""
        x0, y0, _, _ = self.axes
        side = max(1, round(0.6 * min(self.row_px, COLUMN_PX)))
        # Centred on the pixel a reader takes as the cell's centre, so that it is always covered.
        x = x0 + column * COLUMN_PX + COLUMN_PX // 2 - side // 2
        y = y0 + row * self.row_px + self.row_px // 2 - side // 2
        return Box(x, y, side, side, BADBLOCK_COLOUR)

    def ticks(self) -> list[tuple[int, int, int, int]]:
        """The tick marks, as lines (x0, y0, x1, y1) of pixels, both ends drawn, just outside the axes."""
        x0, y0, _, y1 = self.axes
        return [(x, y1, x, y1 + 4) for x, _ in self._xticks()] + [(x0 - 5, y, x0 - 1, y) for y, _ in self._yticks()]

    def labels(self) -> list[Label]:
        x0, y0, x1, y1 = self.axes
        layout = self.layout
        lines = self.title.split("\n")
        title = [Label(x0, y0 - 14 - 18 * (len(lines) - 1 - i), line, size_px=TITLE_FONT_PX) for i, line in
                 enumerate(lines)]  # fmt: skip
        xticks = [Label(x, y1 + 8 + FONT_PX, text, "middle") for x, text in self._xticks()]
        yticks = [Label(x0 - 8, y + FONT_PX * 4 // 10, text, "end") for y, text in self._yticks()]
        legend = [Label(x1 + 62, y0 + 19 + 22 * i, text) for i, text in enumerate([*LEVELS, "bad blocks"])]
        return [
            *title,
            *xticks,
            *yticks,
            Label((x0 + x1) // 2, y1 + 46, f"offset within the row (a cell is {format_size(layout.cell_bytes)})",
                  "middle"),
            Label(x0 - 72, (y0 + y1) // 2, f"offset on the device (a row is {format_size(layout.row_bytes)})",
                  "middle", vertical=True),
            *legend,
        ]  # fmt: skip

    def legend_swatches(self) -> list[Box]:
        _, y0, x1, _ = self.axes
        swatches = [Box(x1 + 30, y0 + 8 + 22 * i, 24, 12, colour, EDGE_COLOUR) for i, colour in
                    enumerate(COLOURS[: len(LEVELS)])]  # fmt: skip
        return [*swatches, Box(x1 + 38, y0 + 10 + 22 * len(LEVELS), 8, 8, BADBLOCK_COLOUR)]

    def info(self) -> dict[str, object]:
        """What a reader of the pixels needs to know: the PNG's ``pmemfs-heatmap`` text chunk."""
        layout = self.layout
        return {
            # The axes in the picture's pixels, top-left origin: cell (r, c) is centred at
            # x0 + (c + 0.5) * (x1 - x0) / columns, y0 + (r + 0.5) * (y1 - y0) / rows.
            "axes_px": list(self.axes),
            "rows": layout.rows,
            "columns": layout.columns,
            "cell_bytes": layout.cell_bytes,
            "row_bytes": layout.row_bytes,
            "npfns": layout.npfns,
            "colours": dict(zip([*LEVELS, "beyond the device"], COLOURS, strict=True)),
            "badblock_colour": BADBLOCK_COLOUR,
        }

    def _xticks(self) -> list[tuple[int, str]]:
        x0, _, _, _ = self.axes
        columns = sorted({self.layout.columns * i // 4 for i in range(5)})
        return [(x0 + c * COLUMN_PX, format_size(c * self.layout.cell_bytes)) for c in columns]

    def _yticks(self) -> list[tuple[int, str]]:
        _, y0, _, _ = self.axes
        rows = self.layout.rows
        step = 1 << max(0, (rows - 1) // 8).bit_length()  # about 8 ticks, at round offsets
        return [(y0 + r * self.row_px, format_size(r * self.layout.row_bytes)) for r in range(0, rows + 1, step)]


def write_png(path: str, frame: Frame, levels: np.ndarray, bad: np.ndarray) -> None:
    image = Image.new("RGB", frame.size, BACKGROUND)
    x0, y0, _, _ = frame.axes
    image.paste(_cells_image(frame, levels), (x0, y0))
    draw = ImageDraw.Draw(image)
    for row, column in zip(*np.nonzero(bad), strict=True):
        _draw_box(draw, frame.badblock_square(int(row), int(column)))
    for box in frame.legend_swatches():
        _draw_box(draw, box)
    for line in frame.ticks():
        draw.line(line, fill=TEXT_COLOUR)
    for label in frame.labels():
        if label.vertical:
            _paste_vertical(image, label)
        else:
            anchor = {"start": "ls", "middle": "ms", "end": "rs"}[label.align]
            draw.text((label.x, label.baseline), label.text, fill=TEXT_COLOUR, font=_font(label.size_px), anchor=anchor)
    metadata = PngImagePlugin.PngInfo()
    metadata.add_text(PNG_METADATA_KEY, json.dumps(frame.info()))
    try:
        image.save(path, pnginfo=metadata)
    except OSError as err:
        raise PmemfsError(f"cannot write {path}: {err.strerror or err}") from None


def write_svg(path: str, frame: Frame, levels: np.ndarray, bad: np.ndarray) -> None:
    width, height = frame.size
    x0, y0, x1, y1 = frame.axes
    # The cells at the PNG's own pixels (a few KiB compressed): at one pixel a cell, stretched,
    # renderers that ignore image-rendering (librsvg, for one) blur each cell into its neighbours.
    cells = io.BytesIO()
    _cells_image(frame, levels).save(cells, "PNG")
    href = "data:image/png;base64," + base64.b64encode(cells.getvalue()).decode("ascii")
    # Through the middle of the pixels Pillow paints, square caps to cover the end pixels whole.
    ticks = " ".join(f"M{a + 0.5},{b + 0.5}L{c + 0.5},{d + 0.5}" for a, b, c, d in frame.ticks())
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">',
        f'<metadata id="{PNG_METADATA_KEY}">{_xml(json.dumps(frame.info()))}</metadata>',
        f'<rect width="{width}" height="{height}" fill="{BACKGROUND}"/>',
        f'<image id="cells" x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" preserveAspectRatio="none" '
        f'image-rendering="pixelated" style="image-rendering:pixelated" href="{href}" xlink:href="{href}"/>',
        '<g id="badblocks">',
        *(_svg_box(frame.badblock_square(int(r), int(c))) for r, c in zip(*np.nonzero(bad), strict=True)),
        "</g>",
        *(_svg_box(box) for box in frame.legend_swatches()),
        f'<path stroke="{TEXT_COLOUR}" stroke-linecap="square" d="{ticks}"/>',
        *(_svg_label(label) for label in frame.labels()),
        "</svg>\n",
    ]
    try:
        # A mountpoint that is not UTF-8 comes as surrogates: shown as "?" rather than failing.
        with open(path, "w", encoding="utf-8", errors="replace") as f:
            f.write("\n".join(parts))
    except OSError as err:
        raise PmemfsError(f"cannot write {path}: {err.strerror or err}") from None


def _cells_image(frame: Frame, levels: np.ndarray) -> Image.Image:
    """The axes' pixels: each cell's colour over its whole rectangle."""
    palette = np.array([_rgb(colour) for colour in COLOURS], np.uint8)
    return Image.fromarray(palette[levels].repeat(frame.row_px, axis=0).repeat(COLUMN_PX, axis=1))


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


@functools.cache
def _font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's own font, so that nothing depends on the fonts a machine has installed.
    return ImageFont.load_default(size=size_px)


def _draw_box(draw: ImageDraw.ImageDraw, box: Box) -> None:
    corners = (box.x, box.y, box.x + box.width - 1, box.y + box.height - 1)
    draw.rectangle(corners, fill=box.fill, outline=box.edge)


def _paste_vertical(image: Image.Image, label: Label) -> None:
    """Draw the label horizontally on a mask, turn it a quarter left and paint through it."""
    font = _font(label.size_px)
    left, top, right, bottom = (int(v) for v in font.getbbox(label.text, anchor="ms"))
    mask = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), label.text, fill=255, font=font, anchor="ms")
    # A quarter turn left takes the anchor, at (-left, -top) on the mask, to (-top, right).
    image.paste(TEXT_COLOUR, (label.x + top, label.baseline - right), mask.rotate(90, expand=True))


def _svg_box(box: Box) -> str:
    edge = f' stroke="{box.edge}"' if box.edge else ""
    # A stroke is centred on the outline: inset half a pixel so that it covers the same pixels as Pillow's.
    inset = 0.5 if box.edge else 0.0
    return (f'<rect x="{box.x + inset}" y="{box.y + inset}" width="{box.width - 2 * inset}" '
            f'height="{box.height - 2 * inset}" fill="{box.fill}"{edge}/>')  # fmt: skip


def _svg_label(label: Label) -> str:
    turn = f' transform="rotate(-90 {label.x} {label.baseline})"' if label.vertical else ""
    return (f'<text x="{label.x}" y="{label.baseline}" font-size="{label.size_px}" text-anchor="{label.align}" '
            f'fill="{TEXT_COLOUR}"{turn}>{_xml(label.text)}</text>')  # fmt: skip


def _xml(text: str) -> str:
    # XML 1.0 has no way to write most control characters, escaped or not.
    text = "".join(ch if ch >= " " or ch in "\t\n" else "\ufffd" for ch in text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
