"""One scan or photo of paper: receipts and/or other paperwork, framed the way real images are.

Public API:
    render_scene(rng, size, label, num_classes=3, max_receipts=12, paper=None) -> Scene
    Paper            -- where the sheets come from (rendered by default; data.synth.real adds real images)
    FRAMINGS         -- the kinds of picture, with their shares

Only the number of receipts may tell the classes apart. The framing (a tight scan, a scanner page, a
close-up photo, a desk photo), the surface, the output's aspect ratio, greyscale versus colour and how
much of the frame is paper are drawn *before* the class is looked at, from the same distribution for
every class; the class then decides only which sheets fill the chosen layout:

    tight_scan   one sheet (or a few) filling a white scan, like a flatbed scan cropped to the paper;
                 class 0 is a whole page (small, with white around it, in a narrow frame); with
                 receipts, sometimes a document under them (a receipt lying on or stapled to a letter).
    page_scan    an A4 scanner page holding k small sheets in rows, some overlapping; k is drawn the same
                 way for every class; class 0 fills it with cards, notes and small pages, class 1 puts one
                 receipt among them, class 2+ 2 to max_receipts receipts.
    photo_close  a phone photo of one sheet (or two to four) filling most of the frame, on a desk or in
                 a hand; class 0 is a document; receipts sometimes lie on a document.
    photo_desk   a photo from further away: one to five sheets and desk clutter, receipts among invoices,
                 letters, cards and notes.
    crop_scan    zoomed in past the paper's edges, the way receipt scans are often cropped to their print:
    crop_photo   the sheets are drawn wider than the frame allows, so only a window of them shows (a
                 receipt's top or middle, part of a page); the paper's width against the frame's is
                 drawn for every class alike, and as often for every class a wider page lies under it.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageOps

from data.synth.camera import Box, Size, add_clutter, add_hand, paste, photo_finish, scan_finish, surface
from data.synth.paper import add_staple, render_document, render_receipt, render_small_paper, staple_pair

FRAMINGS = {"tight_scan": 0.2, "crop_scan": 0.12, "page_scan": 0.2, "photo_close": 0.2, "crop_photo": 0.1,
            "photo_desk": 0.18}
GREY_SHARE = {"tight_scan": 0.45, "crop_scan": 0.45, "page_scan": 0.35, "photo_close": 0.05, "crop_photo": 0.05,
              "photo_desk": 0.05}
MOST_RECEIPTS = {"tight_scan": 3, "crop_scan": 3, "page_scan": 12, "photo_close": 4, "crop_photo": 3,
                 "photo_desk": 6}
PHOTO_ASPECTS = ((3 / 4, 5), (1.0, 2), (4 / 3, 2), (9 / 16, 1))  # (width / height, weight)


class Paper:
    """Where a scene's sheets come from: here all rendered. Each method returns an RGBA sheet
    `width` px wide (its height follows its shape) and the source file it came from ("" when drawn).

    Args:
        pool: when set, printed texts come from a pool drawn from this seed (data.synth.paper), which
            makes a dataset several times faster to draw; None draws every text anew.
    """

    def __init__(self, pool: int | None = None) -> None:
        self.pool = pool

    def receipt(self, rng: random.Random, width: int) -> tuple[Image.Image, str]:
        return render_receipt(rng, width, pool=self.pool), ""

    def document(self, rng: random.Random, width: int) -> tuple[Image.Image, str]:
        return render_document(rng, width, pool=self.pool), ""

    def background(self, rng: random.Random, kind: str, size: Size) -> tuple[Image.Image, str]:
        """An RGB surface of `size` = (width, height); kind in data.synth.camera.SURFACES."""
        return surface(rng, kind, size), ""


@dataclass(frozen=True)
class Scene:
    """A drawn image and what is in it."""

    image: Image.Image
    quality: int  # JPEG quality to save it with
    receipt_count: int
    framing: str
    sources: tuple[str, ...]  # real source files used as paper, in drawing order (empty when all rendered)


class _Stock:
    """The sheets one scene takes from a `Paper`, remembering the source files used."""

    def __init__(self, paper: Paper) -> None:
        self.paper, self.sources = paper, []

    def receipt(self, rng: random.Random, width: float) -> Image.Image:
        return self._keep(self.paper.receipt(rng, max(4, round(width))))

    def document(self, rng: random.Random, width: float) -> Image.Image:
        return self._keep(self.paper.document(rng, max(4, round(width))))

    def background(self, rng: random.Random, kind: str, size: Size) -> Image.Image:
        return self._keep(self.paper.background(rng, kind, size)).convert("RGB")

    def other(self, rng: random.Random, width: float, documents: float = 0.4) -> Image.Image:
        """A non-receipt sheet for a layout slot: a page (with probability `documents`), card, note or print."""
        if rng.random() < documents:
            return self.document(rng, width)
        return render_small_paper(rng, max(4, round(width)))

    def _keep(self, sheet: tuple[Image.Image, str]) -> Image.Image:
        if sheet[1]:
            self.sources.append(sheet[1])
        return sheet[0]


def render_scene(rng: random.Random, size: int, label: int, num_classes: int = 3, max_receipts: int = 12,
                 paper: Paper | None = None) -> Scene:
    """Draw one image of class `label` whose long side is `size` px; every choice comes from `rng`."""
    framing = rng.choices(list(FRAMINGS), weights=list(FRAMINGS.values()))[0]
    grey = rng.random() < GREY_SHARE[framing]
    most = min(max_receipts, MOST_RECEIPTS[framing])
    count = receipt_count(rng, label, num_classes, most)
    # How many sheets a layout holds at least: for every class, distributed as the last class's count,
    # so the number of sheets (and the paper they cover) says nothing about the class.
    crowd = count if label == num_classes - 1 else receipt_count(rng, num_classes - 1, num_classes, most)
    stock = _Stock(paper or Paper())
    image = LAYOUTS[framing](rng, size, count, crowd, stock)
    scan = framing.endswith("scan")
    image = scan_finish(rng, image) if scan else photo_finish(rng, image)
    if grey:
        image = ImageOps.grayscale(image).convert("RGB")
    quality = rng.randint(75, 95) if scan else rng.randint(50, 93)
    return Scene(image, quality, count, framing, tuple(stock.sources))


def receipt_count(rng: random.Random, label: int, num_classes: int, most: int) -> int:
    """The count for a class: exact below the last class; the last class ("n or more") spreads over
    n .. most (most never below n), weighted towards fewer as real collections are."""
    last = num_classes - 1
    if label < last:
        return label
    counts = list(range(last, max(last, most) + 1))
    return rng.choices(counts, weights=[1 / math.sqrt(1 + c - last) for c in counts])[0]


# ------------------------------------------------------------------------------------------ layouts

def _tight_scan(rng: random.Random, size: int, count: int, crowd: int, stock: _Stock) -> Image.Image:
    """A scan cropped to the paper: the frame's aspect is drawn first, then filled by the sheet(s)."""
    aspect = rng.uniform(0.3, 1.0)
    w, h = max(8, round(size * aspect)), size
    scene = stock.background(rng, "scanner_lid", (w, h))
    margin = h * rng.uniform(0.0, 0.05)
    edge = rng.uniform(0.2, 0.5)  # the thin shadow a scanner shows around a sheet
    row = _receipt_row(rng, stock, count, (w, h), margin, height_share=(0.8, 1.0), spread=2) if count else []
    if count == 0 or rng.random() < 0.1:  # a document alone, or under the receipts
        # A whole page, as wide as the frame allows (in a narrow frame, a small page with white around it:
        # the page's own shape, never a receipt-shaped slice of one).
        width = min(w * rng.uniform(0.9, 1.0), (h - 2 * margin) / 1.414 * rng.uniform(0.95, 1.0))
        page = _rotate(rng, stock.document(rng, width), spread=2)
        xy = ((w - page.width) / 2 + rng.uniform(-0.05, 0.05) * w, margin + rng.uniform(0, max(0.0, h - page.height - 2 * margin)))
        paste(rng, scene, page, xy, edge, (0.3, 0.5))
    _paste_all(rng, scene, row, shadow=edge)
    return scene


def _receipt_row(rng: random.Random, stock: _Stock, count: int, frame: Size, margin: float,
                 height_share: tuple[float, float], spread: float) -> list[tuple[Image.Image, tuple[float, float]]]:
    """`count` receipts in a row across the frame, each as tall as a share of it (shrunk to fit the
    width), some overlapping or stapled: (sheet, top-left) pairs to paste."""
    w, h = frame
    target_h = (h - 2 * margin) * rng.uniform(*height_share)
    sheets = [_fit_height(stock.receipt(rng, target_h * rng.uniform(0.3, 0.5)), target_h) for _ in range(count)]
    if count >= 2 and rng.random() < 0.12:
        sheets = [staple_pair(rng, sheets.pop(), sheets.pop())] + sheets
    step = rng.uniform(0.6, 1.05)  # below 1: neighbours overlap
    scale = min(1.0, (w - 2 * max(0.0, margin)) / max(1.0, sum(s.width for s in sheets) * step))
    sheets = [_rotate(rng, _scaled(s, scale), spread=spread) for s in sheets]
    x = (w - sum(s.width for s in sheets) * step) / 2 + rng.uniform(-0.05, 0.05) * w
    row = []
    for sheet in sheets:
        row.append((sheet, (x, margin + rng.uniform(0, max(0.0, h - 2 * margin - sheet.height)))))
        x += sheet.width * step
    return row


def _paste_all(rng: random.Random, scene: Image.Image, row: list[tuple[Image.Image, tuple[float, float]]],
               shadow: float) -> None:
    light = (rng.uniform(-1, 1), rng.uniform(0.3, 1))
    for sheet, xy in row:
        paste(rng, scene, sheet, xy, shadow, light)


def _bounds(row: list[tuple[Image.Image, tuple[float, float]]]) -> Box:
    return (min(xy[0] for _, xy in row), min(xy[1] for _, xy in row),
            max(xy[0] + s.width for s, xy in row), max(xy[1] + s.height for s, xy in row))


def _page_scan(rng: random.Random, size: int, count: int, crowd: int, stock: _Stock) -> Image.Image:
    """An A4 page (portrait or landscape) holding k sheets in rows; the class picks how many are receipts."""
    portrait = rng.random() < 0.7
    w, h = (round(size / 1.414), size) if portrait else (size, round(size / 1.414))
    lid = rng.random() < 0.75
    scene = stock.background(rng, "scanner_lid" if lid else "scanner_bed", (w, h))
    slots = max(count, crowd, rng.randint(1, 8))
    kinds = ["receipt"] * count + ["other"] * (slots - count)
    rng.shuffle(kinds)
    cols = min(slots, max(1, round(math.sqrt(slots * (w / h) / 0.55))))
    rows = math.ceil(slots / cols)
    cell_w, cell_h = w / cols, h / rows
    crowd = rng.uniform(0.7, 0.95) if rng.random() < 0.7 else rng.uniform(1.0, 1.25)  # > 1: overlap
    edge = rng.uniform(0.2, 0.5) if lid else 0.0  # the thin shadow a closed lid shows around a sheet
    for i, kind in enumerate(kinds):
        box_w, box_h = cell_w * crowd, cell_h * crowd
        if kind == "receipt":
            sheet = _fit_box(stock.receipt(rng, box_h * rng.uniform(0.3, 0.5)), box_w, box_h)
        else:
            sheet = _fit_box(stock.other(rng, box_w * rng.uniform(0.8, 1.0), documents=0.7), box_w, box_h)
        sheet = _rotate(rng, sheet, spread=4)
        cx = (i % cols + 0.5) * cell_w + rng.uniform(-0.1, 0.1) * cell_w
        cy = (i // cols + 0.5) * cell_h + rng.uniform(-0.1, 0.1) * cell_h
        paste(rng, scene, sheet, (cx - sheet.width / 2, cy - sheet.height / 2), edge, (0.3, 0.5))
    return scene


def _photo_close(rng: random.Random, size: int, count: int, crowd: int, stock: _Stock) -> Image.Image:
    """A phone photo of one sheet (or a few) filling much of the frame, on a desk or held in a hand.

    How much of the frame is paper is drawn first, for every class alike; a document brings the
    paper up to it: alone (class 0), or under the receipts when they cover less (a receipt on a letter).
    """
    w, h = _photo_size(rng, size)
    scene = stock.background(rng, rng.choice(["wood", "table", "table", "fabric"]), (w, h))
    coverage = rng.uniform(0.2, 0.85)
    row, paper, share = [], 0.0, 1.0
    for _ in range(2 if count else 0):  # a second try, shrunk, when the receipts cover more than drawn
        row = _receipt_row(rng, stock, count, (w, h), -0.05 * h, (0.65 * share, 1.05 * share), spread=10)
        paper = sum(sheet.width * sheet.height for sheet, _ in row) * 0.8 / (w * h)  # rotated corners are empty
        if paper <= coverage + 0.1:
            break
        share = math.sqrt(coverage / paper)
    held = _bounds(row) if row else None
    if paper < coverage - 0.1:
        width = math.sqrt(coverage * w * h / 1.414)  # an A4 page of that area
        page = _rotate(rng, stock.document(rng, width), spread=10)
        xy = ((w - page.width) / 2 + rng.uniform(-0.15, 0.15) * w, (h - page.height) / 2 + rng.uniform(-0.2, 0.2) * h)
        paste(rng, scene, page, xy, 1.0, (rng.uniform(-1, 1), rng.uniform(0.3, 1)))
        held = held or (xy[0], xy[1], xy[0] + page.width, xy[1] + page.height)
    _paste_all(rng, scene, row, shadow=1.0)
    if rng.random() < 0.3:
        add_hand(rng, scene, held)
    return scene


def _photo_desk(rng: random.Random, size: int, count: int, crowd: int, stock: _Stock) -> Image.Image:
    """A photo from further away: sheets among desk clutter, receipts next to letters and invoices."""
    w, h = _photo_size(rng, size)
    scene = stock.background(rng, rng.choice(["wood", "table", "fabric"]), (w, h))
    light = (rng.uniform(-1, 1), rng.uniform(0.3, 1))
    add_clutter(rng, scene, rng.randint(0, 3))
    slots = max(count, crowd, rng.randint(1, 6))
    kinds = ["receipt"] * count + ["other"] * (slots - count)
    rng.shuffle(kinds)
    unit, placed = min(w, h), []
    for kind in kinds:
        if kind == "receipt":
            sheet = _fit_height(stock.receipt(rng, unit * rng.uniform(0.1, 0.18)), 0.9 * h)
        else:
            sheet = stock.other(rng, unit * rng.uniform(0.18, 0.45))
        sheet = _rotate(rng, sheet, spread=18, sideways=rng.random() < 0.08)
        box = _choose_position(rng, sheet.size, (w, h), placed, overlap_ok=0.2 if rng.random() < 0.3 else 0.06)
        placed.append(box)
        paste(rng, scene, sheet, box[:2], 1.0, light)
    return scene


def _close_crop(rng: random.Random, size: int, count: int, crowd: int, stock: _Stock, photo: bool) -> Image.Image:
    """Zoomed in past the paper's edges: the sheets are drawn wider than the frame, so only a window of
    them shows. How wide the paper is against the frame is drawn first, for every class alike; the
    class then fills that width with a page (0) or receipts (1, 2+, side by side and overlapping); a
    wider page lies under that paper as often for every class. (`crowd` is unused: the paper's width,
    not a number of sheets, is what every class shares here.)"""
    w, h = _photo_size(rng, size) if photo else (max(8, round(size * rng.uniform(0.5, 1.0))), size)
    kind = rng.choice(["wood", "table", "fabric"]) if photo else "scanner_lid"
    scene = stock.background(rng, kind, (w, h))
    span = w * rng.uniform(0.75, 1.35)  # the width of the top paper: the page, or the receipts together
    spread, shadow = (6, 1.0) if photo else (2, rng.uniform(0.2, 0.5))
    light = (rng.uniform(-1, 1), rng.uniform(0.3, 1))
    if rng.random() < 0.35:  # a wider page underneath: under the receipts, or under class 0's page
        _paste_window(rng, scene, _rotate(rng, stock.document(rng, span * rng.uniform(1.0, 1.6)), spread), shadow, light)
    if count == 0:
        _paste_window(rng, scene, _rotate(rng, stock.document(rng, span), spread), shadow, light)
        return scene
    step = rng.uniform(0.55, 0.95) if count > 1 else 1.0  # below 1: neighbours overlap
    width = span / (1 + (count - 1) * step)
    x = (w - span) / 2 + rng.uniform(-0.1, 0.1) * w
    for _ in range(count):
        sheet = _rotate(rng, stock.receipt(rng, width * rng.uniform(0.9, 1.1)), spread)
        _paste_window(rng, scene, sheet, shadow, light, left=x)
        x += width * step
    return scene


def _paste_window(rng: random.Random, scene: Image.Image, sheet: Image.Image, shadow: float,
                  light: tuple[float, float], left: float | None = None) -> None:
    """Paste a sheet at `left` (centred, give or take, when None) so the frame shows a random window of
    its height: its top, middle or end when it is taller than the frame."""
    w, h = scene.size
    left = (w - sheet.width) / 2 + rng.uniform(-0.1, 0.1) * w if left is None else left
    top = rng.uniform(min(0.0, h - sheet.height), max(0.0, h - sheet.height))
    paste(rng, scene, sheet, (left, top), shadow, light)


LAYOUTS = {"tight_scan": _tight_scan, "page_scan": _page_scan, "photo_close": _photo_close,
           "photo_desk": _photo_desk, "crop_scan": functools.partial(_close_crop, photo=False),
           "crop_photo": functools.partial(_close_crop, photo=True)}


# -------------------------------------------------------------------------------------------- sheets

def _photo_size(rng: random.Random, size: int) -> Size:
    """(width, height) of a photo whose long side is `size`: mostly portrait 3:4, as phones shoot paper."""
    aspect = rng.choices([a for a, _ in PHOTO_ASPECTS], weights=[wt for _, wt in PHOTO_ASPECTS])[0]
    return (size, max(8, round(size / aspect))) if aspect >= 1 else (max(8, round(size * aspect)), size)


def _scaled(sheet: Image.Image, scale: float) -> Image.Image:
    if abs(scale - 1.0) < 1e-3:
        return sheet
    return sheet.resize((max(2, round(sheet.width * scale)), max(2, round(sheet.height * scale))),
                        Image.Resampling.BOX)


def _fit_height(sheet: Image.Image, height: float) -> Image.Image:
    """Scale a sheet longer than `height` down to it, keeping its shape."""
    return _scaled(sheet, height / sheet.height) if sheet.height > height else sheet


def _fit_box(sheet: Image.Image, width: float, height: float) -> Image.Image:
    """Scale a sheet down to fit inside width x height, keeping its shape."""
    return _scaled(sheet, min(1.0, width / sheet.width, height / sheet.height))


def _rotate(rng: random.Random, sheet: Image.Image, spread: float, sideways: bool = False) -> Image.Image:
    """Rotate by a mostly small angle; now and then a larger one, or lying sideways."""
    angle = rng.gauss(0, spread / 2) if rng.random() < 0.8 else rng.uniform(-2 * spread, 2 * spread)
    angle += 90 * rng.choice([-1, 1]) if sideways else 0
    if rng.random() < 0.08 and sheet.width < sheet.height:
        _staple_corner(rng, sheet)
    return sheet.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)


def _staple_corner(rng: random.Random, sheet: Image.Image) -> None:
    length = max(4, sheet.width * rng.uniform(0.15, 0.25))
    add_staple(ImageDraw.Draw(sheet), sheet.width * rng.uniform(0.2, 0.8), length, length, rng.uniform(-40, 40))


def _choose_position(rng: random.Random, obj_size: Size, frame: Size, placed: list[Box],
                     overlap_ok: float) -> Box:
    """Top-left box for an object, keeping >= ~92% of it in frame and its overlap with the boxes already
    placed (as a fraction of the smaller box) at most `overlap_ok`; the best of 40 tries."""
    (w, h), (fw, fh) = obj_size, frame
    slack_x, slack_y = 0.05 * w, 0.04 * h
    best, best_overlap = None, float("inf")
    for _ in range(40):
        x = rng.uniform(-slack_x, max(-slack_x, fw - w + slack_x))
        y = rng.uniform(-slack_y, max(-slack_y, fh - h + slack_y))
        box = (x, y, x + w, y + h)
        overlap = max((_overlap(box, other) for other in placed), default=0.0)
        if overlap < best_overlap:
            best, best_overlap = box, overlap
        if overlap <= overlap_ok:
            break
    return best


def _overlap(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller
