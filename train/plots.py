"""Pictures for run reports, drawn with PIL: line charts against the training step, and a thumbnail grid.

`line_chart` draws stacked panels that share the x axis (the global step). Each panel has its own
y range, gridlines at round values, a legend, and the stage boundaries as dashed vertical lines
labelled with the stage that starts there. `thumbnail_grid` lays images out with a caption under each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 96, 24, 70, 48


@dataclass
class Series:
    """One line: points (step, value) in step order; `markers` draws a dot at every point, `dashed` a dashed
    line with square markers (so two series that nearly coincide both stay visible)."""

    label: str
    points: list[tuple[float, float]]
    markers: bool = False
    dashed: bool = False


@dataclass
class Panel:
    """One chart: its title, y-axis label, series, and an optional fixed y range (else the data's, padded)."""

    title: str
    y_label: str
    series: list[Series]
    y_range: tuple[float, float] | None = None


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10) if m * power >= raw), default=10 * power)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def line_chart(panels: list[Panel], boundaries: list[tuple[float, str]], x_label: str = "optimizer step",
               width: int = 1100, panel_height: int = 340) -> Image.Image:
    """Stacked panels over a shared step axis.

    Args:
        panels: the charts, top to bottom.
        boundaries: (step, stage name) where each stage starts.
    """
    xs = [x for p in panels for s in p.series for x, _ in s.points] + [b for b, _ in boundaries]
    x_range = (min(xs, default=0.0), max(xs, default=1.0))
    if x_range[1] <= x_range[0]:
        x_range = (x_range[0], x_range[0] + 1.0)
    image = Image.new("RGB", (width, panel_height * len(panels)), "white")
    for i, panel in enumerate(panels):
        box = (MARGIN_LEFT, i * panel_height + MARGIN_TOP, width - MARGIN_RIGHT, (i + 1) * panel_height - MARGIN_BOTTOM)
        _draw_panel(ImageDraw.Draw(image), panel, box, x_range, boundaries, x_label)
    return image


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, box: tuple[int, int, int, int],
                x_range: tuple[float, float], boundaries: list[tuple[float, str]], x_label: str) -> None:
    left, top, right, bottom = box
    font, small, title = (ImageFont.load_default(size=s) for s in (15, 13, 18))
    y_range = panel.y_range or _y_range(panel)

    def to_px(x: float, y: float) -> tuple[float, float]:
        fx = (x - x_range[0]) / (x_range[1] - x_range[0])
        fy = (y - y_range[0]) / (y_range[1] - y_range[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    draw.text((left, top - 46), panel.title, fill="black", font=title, anchor="lm")
    for y in nice_ticks(*y_range):
        py = to_px(x_range[0], y)[1]
        draw.line((left, py, right, py), fill=(225, 225, 225))
        draw.text((left - 8, py), f"{y:g}", fill="black", font=small, anchor="rm")
    for x in nice_ticks(*x_range, count=8):
        px = to_px(x, y_range[0])[0]
        draw.line((px, bottom, px, bottom + 5), fill="black")
        draw.text((px, bottom + 8), f"{x:g}", fill="black", font=small, anchor="mt")
    draw.text(((left + right) / 2, bottom + 28), x_label, fill="dimgray", font=small, anchor="mt")
    draw.text((left - 66, (top + bottom) / 2), panel.y_label, fill="dimgray", font=small, anchor="mm")
    _draw_boundaries(draw, boundaries, to_px, (top, bottom), y_range, small)
    for colour, series in zip(_cycle(len(panel.series)), panel.series):
        pts = [to_px(x, min(max(y, y_range[0]), y_range[1])) for x, y in series.points]
        _draw_line(draw, pts, colour, series.dashed)
        for px, py in pts if series.markers or len(pts) == 1 else []:
            _draw_marker(draw, (px, py), colour, square=series.dashed)
    draw.rectangle(box, outline="black")
    _draw_legend(draw, panel, (left, top - 18), font)


def _draw_line(draw: ImageDraw.ImageDraw, pts: list[tuple[float, float]], colour: tuple[int, int, int],
               dashed: bool) -> None:
    if len(pts) < 2:
        return
    if not dashed:
        draw.line(pts, fill=colour, width=2)
        return
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):  # 8 px on, 6 px off along each segment
        length = math.hypot(x1 - x0, y1 - y0)
        for start in range(0, max(int(length), 1), 14):
            a, b = start / max(length, 1e-9), min(start + 8, length) / max(length, 1e-9)
            draw.line((x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, x0 + (x1 - x0) * b, y0 + (y1 - y0) * b),
                      fill=colour, width=2)


def _draw_marker(draw: ImageDraw.ImageDraw, centre: tuple[float, float], colour: tuple[int, int, int],
                 square: bool) -> None:
    px, py = centre
    if square:
        draw.rectangle((px - 3, py - 3, px + 3, py + 3), fill="white", outline=colour, width=2)
    else:
        draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)


def _y_range(panel: Panel) -> tuple[float, float]:
    """The data's range with 5% room above and below (a flat line gets +-0.5)."""
    ys = [y for s in panel.series for _, y in s.points]
    if not ys:
        return 0.0, 1.0
    low, high = min(ys), max(ys)
    pad = (high - low) * 0.05 if high > low else 0.5
    return low - pad, high + pad


def _draw_boundaries(draw: ImageDraw.ImageDraw, boundaries: list[tuple[float, str]], to_px, span: tuple[int, int],
                     y_range: tuple[float, float], font: ImageFont.FreeTypeFont) -> None:
    """Dashed grey verticals where stages start, the stage's name just right of the line at the top."""
    top, bottom = span
    for step, name in boundaries:
        px = to_px(step, y_range[0])[0]
        for y in range(top, bottom, 12):
            draw.line((px, y, px, min(y + 6, bottom)), fill=(120, 120, 120), width=1)
        label_box = draw.textbbox((px + 5, top + 6), name, font=font, anchor="lt")
        draw.rectangle(label_box, fill="white")
        draw.text((px + 5, top + 6), name, fill=(70, 70, 70), font=font, anchor="lt")


def _draw_legend(draw: ImageDraw.ImageDraw, panel: Panel, start: tuple[int, int],
                 font: ImageFont.FreeTypeFont) -> None:
    """A one-line legend above the panel, outside the plotted area: a colour swatch and each series' label."""
    x, y = start
    for colour, series in zip(_cycle(len(panel.series)), panel.series):
        _draw_line(draw, [(x, y), (x + 22, y)], colour, series.dashed)
        if series.markers:
            _draw_marker(draw, (x + 11, y), colour, square=series.dashed)
        draw.text((x + 28, y), series.label, fill="black", font=font, anchor="lm")
        x += 28 + draw.textlength(series.label, font=font) + 30


def _cycle(n: int) -> list[tuple[int, int, int]]:
    return [COLOURS[i % len(COLOURS)] for i in range(n)]


def thumbnail_grid(images: list[Image.Image], captions: list[list[str]], columns: int = 4,
                   cell: int = 220, caption_lines: int = 3) -> Image.Image:
    """Images fitted into `cell` x `cell` squares (aspect kept), `columns` per row, each with its caption
    lines underneath."""
    font = ImageFont.load_default(size=14)
    line_h = 18
    rows = max(1, math.ceil(len(images) / columns))
    pad = 10
    cell_h = cell + caption_lines * line_h + pad
    grid = Image.new("RGB", (columns * (cell + pad) + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = pad + (i % columns) * (cell + pad), pad + (i // columns) * cell_h
        thumb = ImageOps.contain(image, (cell, cell))  # up or down to the cell, aspect kept
        grid.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        draw.rectangle((x, y, x + cell, y + cell), outline=(180, 180, 180))
        for k, text in enumerate(caption[:caption_lines]):
            draw.text((x + cell // 2, y + cell + 4 + k * line_h), text, fill="black", font=font, anchor="mt")
    return grid
