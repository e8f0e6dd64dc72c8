"""Sheets of paper as RGBA images: till receipts and other paperwork (letters, tax forms, invoices,
typewritten office forms and memos).

Public API:
    render_receipt(rng, width) -> RGBA image `width` pixels wide (length follows its content)
    render_document(rng, width, kind=None) -> RGBA A4-shaped page; kind in DOCUMENT_KINDS
    render_small_paper(rng, width) -> RGBA business card, sticky note or photo print (paper, not a receipt)
    staple_pair(rng, first, second) -> RGBA of two receipts stapled together, overlapping at the top
    add_staple(draw, x, y, length, angle_deg)
    handwriting(rng, draw, xy, width, height, ink), stamp(rng, sheet, centre, width): what people add by hand

Sheets are drawn at a fixed "paper" resolution, where fonts are legible, then shrunk to the size they
take in the scene, so the text turns into the grey texture a camera sees. Paper tint, ink fading,
crumple shading and torn edges are applied at scene size, where they are cheap.
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFont

from data.synth import content

FONT_ROOT = Path("/usr/share/fonts")
DOCUMENT_KINDS = ("letter", "tax_form", "invoice", "typed_form", "memo", "blank")
DOCUMENT_WEIGHTS = (3, 3, 3, 4, 2, 1)
A4_RATIO = 297 / 210
PAPER_WIDTH_DOC = 320  # px of an A4 page at paper resolution
POOL_SIZE = 400  # printed receipt texts per pool (and half as many pages)


@functools.lru_cache(maxsize=None)
def _font_files() -> dict[str, str]:
    """DejaVu font files on this machine by stem, e.g. "DejaVuSansMono-Bold"."""
    return {p.stem: str(p) for p in FONT_ROOT.rglob("DejaVu*.ttf")}


@functools.lru_cache(maxsize=256)
def font(name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A DejaVu face by stem; Pillow's built-in font where DejaVu is not installed."""
    path = _font_files().get(name)
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


# ----------------------------------------------------------------------------------------- receipts

def render_receipt(rng: random.Random, width: int, pool: int | None = None) -> Image.Image:
    """A till receipt `width` px wide: thermal print, maybe faded, crumpled, with torn ends.

    With `pool` (a seed), the printed text is one of POOL_SIZE texts drawn once per process from that
    seed alone (drawing text is most of the cost), and only the paper's look is new; without, it is new.
    """
    paper = _pooled_receipt_text(pool, rng.randrange(POOL_SIZE)) if pool is not None else _receipt_text(rng)
    height = max(2, round(paper.height * width / paper.width))
    sheet = paper.resize((width, height), Image.Resampling.BOX)
    sheet = _fade(rng, sheet) if rng.random() < 0.45 else sheet
    sheet = _crumple(rng, sheet, strength=rng.uniform(0.03, 0.16))
    rgba = _tint(sheet, _paper_colour(rng, warm=0.6)).convert("RGBA")
    rgba.putalpha(_torn_mask(rng, width, height))
    return rgba


@functools.lru_cache(maxsize=None)
def _pooled_receipt_text(pool: int, index: int) -> Image.Image:
    return _receipt_text(random.Random(f"{pool}:receipt:{index}"))


def _receipt_text(rng: random.Random) -> Image.Image:
    """Greyscale receipt at paper resolution: 255 paper, dark thermal ink."""
    chars = rng.randint(24, 40)
    face = rng.choice(["DejaVuSansMono", "DejaVuSansMono", "DejaVuSansCondensed"])
    body = font(face, 12)
    char_w = body.getlength("0")
    margin = rng.randint(6, 18)
    width = round(chars * char_w) + 2 * margin
    lines = content.receipt_lines(rng, chars)
    line_h = rng.randint(13, 17)
    top, tail = rng.randint(10, 40), rng.randint(16, 160)
    barcode = 46 if rng.random() < 0.4 else 0
    height = top + line_h * (len(lines) + 1) + barcode + tail
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    ink = rng.randint(5, 70)
    y = top
    for style, text in lines:
        y += _receipt_line(draw, style, text, face, margin, width, y, ink)
        y += line_h if style != "title" else 0
    if barcode:
        _barcode(rng, draw, margin, y + 8, width - 2 * margin, barcode - 14, ink)
    if rng.random() < 0.1:  # a note or a tick by hand, as on pages (so pen marks alone never mean "no receipt")
        handwriting(rng, draw, (margin, rng.uniform(0.2, 0.85) * height), width * rng.uniform(0.3, 0.7),
                    rng.uniform(12, 20), rng.randint(10, 90), stroke=2)
    if rng.random() < 0.06:
        centre = (rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.8) * height)
        stamp(rng, image, centre, width * rng.uniform(0.4, 0.6))
    return image


def _receipt_line(draw: ImageDraw.ImageDraw, style: str, text: str, face: str, margin: int, width: int,
                  y: int, ink: int) -> int:
    """Draw one line; returns extra height used beyond a body line."""
    if style == "title":
        title = font("DejaVuSans-Bold", 17)
        x = max(margin, (width - title.getlength(text)) / 2)
        draw.text((x, y), text, fill=ink, font=title)
        return 24
    face = face + "-Bold" if style == "bold" else face
    body = font(face, 12)
    x = (width - body.getlength(text)) / 2 if style == "center" else margin
    draw.text((max(margin, x), y), text, fill=ink, font=body)
    return 0


def _barcode(rng: random.Random, draw: ImageDraw.ImageDraw, x: int, y: int, width: int, height: int,
             ink: int) -> None:
    end = x + width * rng.uniform(0.6, 1.0)
    while x < end:
        bar = rng.choice([1, 1, 2, 3])
        draw.rectangle([x, y, x + bar - 1, y + height], fill=ink)
        x += bar + rng.choice([1, 2, 2, 3])


def _fade(rng: random.Random, sheet: Image.Image) -> Image.Image:
    """Thermal fading: ink washes out towards one end or overall, as old receipts do."""
    gradient = Image.linear_gradient("L").resize(sheet.size)
    if rng.random() < 0.5:
        gradient = gradient.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    strength = rng.uniform(0.35, 0.8)
    floor = rng.uniform(0.0, 0.5) * strength
    mask = gradient.point(lambda v: int(255 * (floor + (strength - floor) * v / 255)))
    return Image.composite(Image.new("L", sheet.size, 255), sheet, mask)


def _torn_mask(rng: random.Random, width: int, height: int) -> Image.Image:
    """Alpha mask of a strip whose top and/or bottom edge is torn off the printer's roll."""
    mask = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(mask)
    tooth = max(1, round(width / rng.randint(12, 30)))
    depth = max(1, round(width * rng.uniform(0.015, 0.04)))
    for top in (True, False):
        if rng.random() < 0.75:
            points = [(x, rng.randint(0, depth)) for x in range(0, width + tooth, tooth)]
            if not top:
                points = [(x, height - 1 - d) for x, d in points]
            edge = 0 if top else height
            draw.polygon([(0, edge)] + points + [(width, edge)], fill=0)
    return mask


# ---------------------------------------------------------------------------------------- documents

def render_document(rng: random.Random, width: int, kind: str | None = None, pool: int | None = None) -> Image.Image:
    """An A4 page `width` px wide of `kind` (random when None), with crumples and maybe folds; `pool`
    as for `render_receipt` (then `kind` is the pooled page's)."""
    if pool is not None:
        page = _pooled_page(pool, rng.randrange(POOL_SIZE // 2))
    else:
        page = _page(rng, kind or rng.choices(DOCUMENT_KINDS, weights=DOCUMENT_WEIGHTS)[0])
    height = round(width * page.height / page.width)
    page = page.resize((width, height), Image.Resampling.BOX)
    if rng.random() < 0.4:
        page = _tri_fold(rng, page)
    page = _crumple(rng, page, strength=rng.uniform(0.02, 0.09))
    return ImageChops.multiply(page, Image.new("RGB", page.size, _paper_colour(rng, warm=0.25))).convert("RGBA")


def _page(rng: random.Random, kind: str) -> Image.Image:
    """The printed page at paper resolution, then what people add by hand: a signature, a note, a stamp,
    an archive's file number (more often on office forms and memos, as archived paperwork has them)."""
    page = Image.new("RGB", (PAPER_WIDTH_DOC, round(PAPER_WIDTH_DOC * A4_RATIO)), (255, 255, 255))
    {"letter": _letter, "tax_form": _tax_form, "invoice": _invoice, "typed_form": _typed_form, "memo": _memo,
     "blank": _blank}[kind](rng, page)
    if kind == "blank":
        return page
    office = kind in ("typed_form", "memo")
    draw, w, h = ImageDraw.Draw(page), page.width, page.height
    if rng.random() < (0.6 if office or kind == "letter" else 0.2):  # a signature low on the page
        handwriting(rng, draw, (rng.uniform(0.1, 0.55) * w, rng.uniform(0.75, 0.9) * h), rng.uniform(0.2, 0.35) * w,
                    rng.uniform(10, 16), _pen(rng), stroke=rng.choice([1, 2]), words=1)
    for _ in range(rng.randint(0, 3) if office else 0):  # a note in the margin or between the lines
        handwriting(rng, draw, (rng.uniform(0.05, 0.6) * w, rng.uniform(0.1, 0.9) * h), rng.uniform(0.15, 0.4) * w,
                    rng.uniform(6, 10), _pen(rng))
    if rng.random() < (0.35 if office else 0.1):
        stamp(rng, page, (rng.uniform(0.35, 0.7) * w, rng.uniform(0.05, 0.4) * h), width=rng.uniform(0.25, 0.4) * w)
    if rng.random() < (0.5 if office else 0.1):  # an archive's file number, bottom right
        face = font("DejaVuSansMono", rng.choice([7, 8, 9]))
        number = str(rng.randint(10**9, 10**10 - 1))
        draw.text((w - face.getlength(number) - rng.randint(8, 24), h - rng.randint(14, 26)), number, fill=(20, 20, 20),
                  font=face)
    return page


@functools.lru_cache(maxsize=None)
def _pooled_page(pool: int, index: int) -> Image.Image:
    rng = random.Random(f"{pool}:page:{index}")
    return _page(rng, rng.choices(DOCUMENT_KINDS, weights=DOCUMENT_WEIGHTS)[0])


def _letter(rng: random.Random, page: Image.Image) -> None:
    draw, w = ImageDraw.Draw(page), page.width
    accent = _accent(rng)
    serif = rng.random() < 0.5
    body = font("DejaVuSerif" if serif else "DejaVuSans", 8)
    draw.rectangle([20, 18, 20 + rng.randint(20, 40), 40], fill=accent)
    draw.text((70, 20), rng.choice(content.STORES).title() + " Ltd", fill=accent, font=font("DejaVuSans-Bold", 13))
    y = 60
    for line in content.address_block(rng) + ["", content.date_text(rng), "", "Dear Customer,", ""]:
        draw.text((26, y), line, fill=(30, 30, 30), font=body)
        y += 11
    for paragraph in content.letter_paragraphs(rng):
        y = _wrapped(draw, paragraph, 26, y, w - 52, body, (35, 35, 40)) + 8
        if y > page.height - 60:
            break
    draw.text((26, min(y + 6, page.height - 40)), "Yours sincerely,", fill=(30, 30, 30), font=body)


def _tax_form(rng: random.Random, page: Image.Image) -> None:
    draw, w = ImageDraw.Draw(page), page.width
    draw.rectangle([14, 14, w - 14, 44], outline=(0, 0, 0), width=2)
    draw.text((22, 20), f"Form {rng.randint(100, 9999)}", fill=(0, 0, 0), font=font("DejaVuSans-Bold", 12))
    draw.text((110, 22), "Individual Income Tax Return 20" + str(rng.randint(18, 25)), fill=(0, 0, 0),
              font=font("DejaVuSans", 8))
    tint = rng.choice([(255, 255, 255), (235, 245, 235), (245, 238, 225), (230, 238, 250)])
    y, label = 52, font("DejaVuSansCondensed", 7)
    for i, field in enumerate(content.form_fields(rng, rng.randint(12, 21)), start=1):
        height = rng.choice([16, 18, 20])
        draw.rectangle([14, y, w - 14, y + height], outline=(60, 60, 60), fill=tint if i % 2 else None)
        draw.text((18, y + 4), f"{i:>2} {field}", fill=(20, 20, 20), font=label)
        draw.rectangle([w - 96, y + 2, w - 18, y + height - 2], outline=(90, 90, 90), fill=(255, 255, 255))
        if rng.random() < 0.7:
            draw.text((w - 90, y + 3), content.money(rng, 10, 90000), fill=(20, 20, 110), font=label)
        y += height + 3
        if y > page.height - 40:
            break


def _invoice(rng: random.Random, page: Image.Image) -> None:
    draw, w = ImageDraw.Draw(page), page.width
    accent = _accent(rng)
    draw.text((20, 18), "INVOICE", fill=accent, font=font("DejaVuSans-Bold", 18))
    small = font("DejaVuSans", 7)
    for i, line in enumerate([f"Invoice no. {rng.randint(1000, 99999)}", f"Date {content.date_text(rng)}"]):
        draw.text((w - 120, 20 + 10 * i), line, fill=(40, 40, 40), font=small)
    for i, line in enumerate(["Bill to:"] + content.address_block(rng)):
        draw.text((20, 56 + 10 * i), line, fill=(40, 40, 40), font=small)
    y = 110
    draw.rectangle([16, y, w - 16, y + 14], fill=accent)
    draw.text((20, y + 3), "Description                         Qty        Amount", fill=(255, 255, 255), font=small)
    for desc, qty, amount in content.invoice_rows(rng, rng.randint(3, 12)):
        y += 16
        draw.text((20, y), desc, fill=(30, 30, 30), font=small)
        draw.text((w - 120, y), qty, fill=(30, 30, 30), font=small)
        draw.text((w - 70, y), amount, fill=(30, 30, 30), font=small)
        draw.line([16, y + 13, w - 16, y + 13], fill=(200, 200, 200))
    draw.rectangle([w - 130, y + 24, w - 16, y + 44], outline=(0, 0, 0))
    draw.text((w - 124, y + 29), f"TOTAL  {content.money(rng, 100, 9000)}", fill=(0, 0, 0),
              font=font("DejaVuSans-Bold", 8))


def _typed_form(rng: random.Random, page: Image.Image) -> None:
    """A typewritten office form, as archives scan them: a title, then blocks of label/value fields in one
    or two columns, ruled tables, check boxes and typed paragraphs filling the page, some values by hand."""
    draw, w = ImageDraw.Draw(page), page.width
    ink = (rng.randint(0, 45),) * 3
    mono = font("DejaVuSansMono", rng.choice([7, 7, 8]))
    if rng.random() < 0.4:
        company = rng.choice(content.STORES) + rng.choice([" CORPORATION", " COMPANY", " INC."])
        _centred(draw, company, 12, w, font("DejaVuSans-Bold", 8), ink)
    title = rng.choice(content.FORM_TITLES)
    head = font(rng.choice(["DejaVuSansMono-Bold", "DejaVuSans-Bold"]), rng.choice([9, 10, 11]))
    left = _centred(draw, title, 26, w, head, ink)
    if rng.random() < 0.5:
        draw.line([left, 39, w - left, 39], fill=ink)
    margin, y = rng.randint(14, 28), 48
    blocks = {"fields": _form_fields, "table": _form_table, "checks": _form_checks, "text": _form_text}
    while y < page.height - 60:
        block = rng.choices(list(blocks), weights=[5, 2, 1, 2])[0]
        y = blocks[block](rng, draw, margin, y, w - 2 * margin, mono, ink) + rng.randint(4, 14)


def _centred(draw: ImageDraw.ImageDraw, text: str, y: float, width: int, face: ImageFont.FreeTypeFont,
             fill: tuple[int, int, int]) -> float:
    """Draw `text` centred across `width`; returns its left edge."""
    left = max(4.0, (width - face.getlength(text)) / 2)
    draw.text((left, y), text, fill=fill, font=face)
    return left


def _form_fields(rng: random.Random, draw: ImageDraw.ImageDraw, x: int, y: int, width: int,
                 face: ImageFont.FreeTypeFont, ink: tuple[int, int, int]) -> int:
    """Rows of LABEL: value, in one or two columns; a value is typed, handwritten or left on its blank line."""
    columns = rng.choice([1, 2, 2])
    pitch = face.size + rng.randint(4, 8)
    col_w = width / columns
    for _ in range(rng.randint(2, 6)):
        for c in range(columns):
            left = x + c * col_w
            label = rng.choice(content.FORM_LABELS) + ":"
            draw.text((left, y), label, fill=ink, font=face)
            start = left + face.getlength(label) + 4
            end = left + col_w - 8
            if end - start < 12:
                continue
            if rng.random() < 0.5:
                draw.line([start, y + face.size + 1, end, y + face.size + 1], fill=ink)
            filled = rng.random()
            if filled < 0.55:
                draw.text((start + 2, y), content.form_value(rng)[:int((end - start) / face.getlength("0"))],
                          fill=ink, font=face)
            elif filled < 0.8:
                handwriting(rng, draw, (start + 2, y - 1), (end - start) * rng.uniform(0.4, 0.9), face.size + 2,
                            _pen(rng))
        y += pitch
    return y


def _form_table(rng: random.Random, draw: ImageDraw.ImageDraw, x: int, y: int, width: int,
                face: ImageFont.FreeTypeFont, ink: tuple[int, int, int]) -> int:
    """A ruled table: a header row of labels and rows of typed figures."""
    cols, rows = rng.randint(3, 6), rng.randint(3, 8)
    pitch = face.size + rng.randint(4, 7)
    col_w = width / cols
    bottom = y + pitch * (rows + 1)
    draw.rectangle([x, y, x + width, bottom], outline=ink)
    for c in range(1, cols):
        draw.line([x + c * col_w, y, x + c * col_w, bottom], fill=ink)
    chars = max(1, int((col_w - 4) / face.getlength("0")))
    for c in range(cols):
        draw.text((x + c * col_w + 2, y + 2), rng.choice(content.FORM_LABELS)[:chars], fill=ink, font=face)
    for r in range(1, rows + 1):
        top = y + r * pitch
        draw.line([x, top, x + width, top], fill=ink)
        for c in range(cols):
            if rng.random() < 0.8:
                draw.text((x + c * col_w + 2, top + 2), content.money(rng, 1, 99999)[:chars], fill=ink, font=face)
    return bottom


def _form_checks(rng: random.Random, draw: ImageDraw.ImageDraw, x: int, y: int, width: int,
                 face: ImageFont.FreeTypeFont, ink: tuple[int, int, int]) -> int:
    """A row of check boxes with labels, some ticked."""
    box = face.size
    left = x
    while left < x + width - 60:
        draw.rectangle([left, y, left + box, y + box], outline=ink)
        if rng.random() < 0.35:
            draw.line([left, y, left + box, y + box], fill=ink)
            draw.line([left, y + box, left + box, y], fill=ink)
        label = rng.choice(content.FORM_LABELS).title()
        draw.text((left + box + 3, y), label, fill=ink, font=face)
        left += box + 3 + face.getlength(label) + rng.randint(8, 20)
    return y + box + 2


def _form_text(rng: random.Random, draw: ImageDraw.ImageDraw, x: int, y: int, width: int,
               face: ImageFont.FreeTypeFont, ink: tuple[int, int, int]) -> int:
    """A typed paragraph, single or double spaced."""
    spacing = face.size + rng.choice([3, 3, 9])
    return _wrapped(draw, " ".join(content.sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(1, 4))),
                    x, y, width, face, ink, line_height=spacing)


def _memo(rng: random.Random, page: Image.Image) -> None:
    """A typewritten memo: its heading, TO / FROM / DATE / SUBJECT lines, a rule, typed paragraphs, a cc list."""
    draw, w = ImageDraw.Draw(page), page.width
    ink = (rng.randint(0, 45),) * 3
    mono = font("DejaVuSansMono", rng.choice([7, 8]))
    _centred(draw, rng.choice(content.MEMO_TITLES), 22, w, font("DejaVuSansMono-Bold", rng.choice([10, 12])), ink)
    margin, y = rng.randint(18, 30), 50
    heading = [("TO:", content.person(rng)), ("FROM:", content.person(rng)), ("DATE:", content.date_text(rng)),
               ("SUBJECT:", content.form_value(rng))]
    for label, value in heading:
        draw.text((margin, y), label, fill=ink, font=mono)
        draw.text((margin + 60, y), value, fill=ink, font=mono)
        y += mono.size + 6
    draw.line([margin, y + 2, w - margin, y + 2], fill=ink, width=rng.choice([1, 2]))
    y += 12
    for paragraph in content.letter_paragraphs(rng):
        spacing = mono.size + rng.choice([3, 8])
        y = _wrapped(draw, paragraph, margin, y, w - 2 * margin, mono, ink, line_height=spacing) + 8
        if y > page.height - 80:
            break
    copies = ", ".join(content.person(rng) for _ in range(rng.randint(1, 3)))
    draw.text((margin, min(y + 20, page.height - 30)), "cc: " + copies, fill=ink, font=mono)


def _blank(rng: random.Random, page: Image.Image) -> None:
    """A blank page; sometimes with ruled lines, a hole punch margin or a faint header."""
    draw, w = ImageDraw.Draw(page), page.width
    if rng.random() < 0.35:
        for y in range(50, page.height - 20, 12):
            draw.line([10, y, w - 10, y], fill=(190, 205, 230))
    if rng.random() < 0.3:
        for y in (page.height * 0.3, page.height * 0.7):
            draw.ellipse([8, y - 5, 18, y + 5], fill=(120, 120, 120))


def _wrapped(draw: ImageDraw.ImageDraw, text: str, x: int, y: int, width: int,
             face: ImageFont.FreeTypeFont, fill: tuple[int, int, int], line_height: int = 11) -> int:
    """Draw `text` wrapped to `width`; returns the y below the last line."""
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if face.getlength(trial) > width and line:
            draw.text((x, y), line, fill=fill, font=face)
            y, line = y + line_height, word
        else:
            line = trial
    draw.text((x, y), line, fill=fill, font=face)
    return y + line_height


# ------------------------------------------------------------------------------------- by hand

def handwriting(rng: random.Random, draw: ImageDraw.ImageDraw, xy: tuple[float, float], width: float,
                height: float, ink: int | tuple[int, int, int], stroke: int = 1, words: int | None = None) -> None:
    """Joined-up handwriting too small to read, along the box at `xy` (top-left), `width` x `height`:
    words of pen loops (a point turning on a circle while it moves right), some rising into ascenders;
    a loop may reach past the box by its radius (0.3 x `height`, an ascender 0.48 x)."""
    x, top = xy
    end = x + width
    radius = height * 0.3
    for _ in range(words or 99):
        word = min(end - x, height * rng.uniform(1.5, 5.0))
        if word < height:
            break
        phase, t, points = rng.uniform(0, math.tau), 0.0, []
        slant = rng.uniform(0.0, 0.35)
        while t < word:
            rise = radius * (1.6 if rng.random() < 0.12 else 1.0)
            dy = rise * math.sin(phase)
            points.append((x + t + radius * math.cos(phase) + slant * dy, top + height / 2 - dy))
            phase += rng.uniform(0.8, 1.2)
            t += height * rng.uniform(0.08, 0.16)
        if len(points) > 1:
            draw.line(points, fill=ink, width=stroke)
        x += word + height * rng.uniform(0.4, 1.0)


def stamp(rng: random.Random, sheet: Image.Image, centre: tuple[float, float], width: float) -> None:
    """An inked rubber stamp centred on `centre`: a box or an oval round a word and a date, turned a little,
    in one ink colour; ink only darkens the paper (multiplied), so the print under it shows through."""
    box_w, box_h = max(8, round(width)), max(6, round(width * rng.uniform(0.32, 0.45)))
    mark = Image.new("L", (box_w, box_h), 0)
    draw = ImageDraw.Draw(mark)
    rim = max(1, round(box_h / 14))
    if rng.random() < 0.3:
        draw.ellipse([0, 0, box_w - 1, box_h - 1], outline=255, width=rim)
    else:
        draw.rectangle([0, 0, box_w - 1, box_h - 1], outline=255, width=rim)
    word = rng.choice(content.STAMP_WORDS)
    face = font("DejaVuSans-Bold", max(4, round(box_h * 0.36)))
    draw.text(((box_w - face.getlength(word)) / 2, box_h * 0.14), word, fill=255, font=face)
    small = font("DejaVuSans", max(4, round(box_h * 0.22)))
    date = content.date_text(rng)
    draw.text(((box_w - small.getlength(date)) / 2, box_h * 0.58), date, fill=255, font=small)
    mark = mark.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BILINEAR, expand=True)
    mark = mark.point(lambda v, a=rng.uniform(0.55, 0.9): round(v * a))
    colour = rng.choice([(150, 30, 40), (30, 50, 150), (90, 40, 120), (40, 40, 40)])
    ink = colour if sheet.mode == "RGB" else round(sum(colour) / 3)
    layer = Image.new(sheet.mode, mark.size, (255, 255, 255) if sheet.mode == "RGB" else 255)
    layer.paste(Image.new(sheet.mode, mark.size, ink), (0, 0), mark)
    left, top = round(centre[0] - mark.width / 2), round(centre[1] - mark.height / 2)
    box = (left, top, left + mark.width, top + mark.height)
    sheet.paste(ImageChops.multiply(sheet.crop(box), layer), box)


def _pen(rng: random.Random) -> tuple[int, int, int]:
    return rng.choice([(25, 35, 110), (20, 20, 30), (40, 40, 40), (10, 30, 80)])


def _tri_fold(rng: random.Random, page: Image.Image) -> Image.Image:
    """Creases of a letter folded in three: a dark and a light line at 1/3 and 2/3 height."""
    draw = ImageDraw.Draw(page)
    for third in (1 / 3, 2 / 3):
        y = round(page.height * third + rng.uniform(-3, 3))
        draw.line([0, y, page.width, y + rng.randint(-2, 2)], fill=(200, 200, 196))
        draw.line([0, y + 1, page.width, y + 1], fill=(255, 255, 255))
    return page


# ------------------------------------------------------------------------------ small other paper

def render_small_paper(rng: random.Random, width: int) -> Image.Image:
    """A business card, a sticky note or a photo print `width` px wide: paper that is not a receipt."""
    kind = rng.choice(["card", "note", "print"])
    if kind == "card":
        sheet = Image.new("RGB", (170, 100), _paper_colour(rng, warm=0.2))
        draw = ImageDraw.Draw(sheet)
        accent = _accent(rng)
        draw.rectangle([10, 12, 34, 36], fill=accent)
        draw.text((44, 14), rng.choice(content.STORES).title(), fill=accent, font=font("DejaVuSans-Bold", 11))
        for i, line in enumerate(content.address_block(rng)[:3]):
            draw.text((12, 50 + 13 * i), line, fill=(40, 40, 40), font=font("DejaVuSans", 9))
    elif kind == "note":
        sheet = Image.new("RGB", (120, 120), rng.choice([(250, 235, 120), (250, 190, 200), (180, 220, 250),
                                                        (200, 240, 170)]))
        draw = ImageDraw.Draw(sheet)
        for i in range(rng.randint(1, 5)):  # handwriting: a wavy pen line per row
            y = 18 + 20 * i
            points = [(x, y + 3 * math.sin(x / rng.uniform(3, 6))) for x in range(10, rng.randint(50, 110), 2)]
            draw.line(points, fill=(30, 30, 90), width=2)
    else:
        sheet = Image.new("RGB", (150, 105), (255, 255, 255))
        inner = Image.new("RGB", (2, 2))
        inner.putdata([tuple(rng.randint(20, 230) for _ in range(3)) for _ in range(4)])
        sheet.paste(inner.resize((138, 93), Image.Resampling.BICUBIC), (6, 6))
    height = max(2, round(width * sheet.height / sheet.width))
    sheet = sheet.resize((width, height), Image.Resampling.BOX)
    return _crumple(rng, sheet, strength=rng.uniform(0.01, 0.05)).convert("RGBA")


# ------------------------------------------------------------------------------------------- shared

def _paper_colour(rng: random.Random, warm: float) -> tuple[int, int, int]:
    """Near-white, sometimes cream or grey-ish (cheap thermal paper, recycled paper)."""
    base = rng.randint(236, 255)
    if rng.random() < warm:
        return base, max(0, base - rng.randint(0, 8)), max(0, base - rng.randint(4, 22))
    return base, base, max(0, base - rng.randint(0, 6))


def _accent(rng: random.Random) -> tuple[int, int, int]:
    return rng.choice([(20, 50, 120), (120, 20, 30), (20, 90, 60), (60, 60, 60), (0, 0, 0), (150, 80, 0)])


def _tint(sheet: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """Greyscale sheet -> RGB, white mapped to `colour` (ink stays dark)."""
    return Image.merge("RGB", [sheet.point(lambda v, c=c: v * c // 255) for c in colour])


def _crumple(rng: random.Random, sheet: Image.Image, strength: float) -> Image.Image:
    """Soft light/dark patches and a few creases, as crumpled paper shows under light."""
    cells = (rng.randint(2, 5), rng.randint(3, 9))
    low = Image.new("L", cells)
    low.putdata([round(255 * (1 - strength * rng.random())) for _ in range(cells[0] * cells[1])])
    shade = low.resize(sheet.size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(shade)
    for _ in range(rng.randint(0, 4) if strength > 0.05 else 0):
        x0, y0 = rng.uniform(0, sheet.width), rng.uniform(0, sheet.height)
        angle = rng.uniform(0, math.pi)
        dx, dy = math.cos(angle) * sheet.height, math.sin(angle) * sheet.height
        draw.line([x0 - dx, y0 - dy, x0 + dx, y0 + dy], fill=round(255 * (1 - 1.5 * strength)))
    if sheet.mode == "RGB":
        shade = Image.merge("RGB", [shade] * 3)
    return ImageChops.multiply(sheet, shade)


def add_staple(draw: ImageDraw.ImageDraw, x: float, y: float, length: float, angle_deg: float) -> None:
    """A metal staple centred on (x, y): a grey bar with a highlight."""
    angle = math.radians(angle_deg)
    dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
    width = max(1, round(length / 9))
    draw.line([x - dx, y - dy, x + dx, y + dy], fill=(105, 105, 110, 255), width=width + 1)
    draw.line([x - dx, y - dy - 1, x + dx, y + dy - 1], fill=(215, 215, 220, 255), width=max(1, width // 2))


def staple_pair(rng: random.Random, first: Image.Image, second: Image.Image) -> Image.Image:
    """Two receipts stapled at the top: `second` overlaps `first` sideways, both stay visible."""
    dx = round(first.width * rng.uniform(0.7, 0.95))  # enough apart to still read as two strips
    dy = round(first.height * rng.uniform(0.02, 0.15))
    group = Image.new("RGBA", (max(first.width, dx + second.width), max(first.height, dy + second.height)))
    group.alpha_composite(first, (0, 0))
    group.alpha_composite(second, (dx, dy))
    length = max(4, first.width * rng.uniform(0.18, 0.3))
    add_staple(ImageDraw.Draw(group), (dx + first.width) / 2, dy + length * 0.8, length, rng.uniform(-30, 30))
    return group
