"""A photo or scan of a desk, table or scanner bed holding receipts and/or other paperwork.

Public API:
    render_scene(rng, size, receipt_count) -> (RGB image size x size, JPEG quality to save it with)

receipt_count 0 gives other paperwork only (letters, tax forms, invoices, blank pages), so a model
must tell a receipt from a sheet of paper. With receipts, a document sometimes lies at one side as a
distractor. Receipts are long narrow strips, documents A4-shaped; both vary in size, tint, rotation
and crumpling, receipts may overlap a little or come stapled in pairs. Photos get shadows, uneven
light, keystone perspective, blur and noise; scans are flat and even.
"""

from __future__ import annotations

import math
import random

import torch
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from data.synth.paper import add_staple, render_document, render_receipt, staple_pair

Box = tuple[float, float, float, float]  # (left, top, right, bottom)


def render_scene(rng: random.Random, size: int, receipt_count: int) -> tuple[Image.Image, int]:
    """Draw one scene; every random choice comes from `rng` (and torch generators seeded from it)."""
    scan = rng.random() < 0.25
    scene = _scanner_bed(rng, size) if scan else _background(rng, size)
    light = (rng.uniform(-1, 1), rng.uniform(0.3, 1))  # direction shadows fall in
    free = (0.0, float(size))
    if receipt_count == 0:
        _place_documents(rng, scene, scan, light, rng.choice([1, 1, 1, 2]))
    elif rng.random() < 0.12:
        free = _place_side_document(rng, scene, scan, light)
    if receipt_count:
        _place_receipts(rng, scene, scan, light, receipt_count, free)
    if scan:
        return _scan_finish(rng, scene), rng.randint(75, 95)
    return _photo_finish(rng, scene), rng.randint(50, 93)


# -------------------------------------------------------------------------------------- backgrounds

def _background(rng: random.Random, size: int) -> Image.Image:
    kind = rng.choices(["wood", "table", "fabric"], weights=[4, 4, 2])[0]
    if kind == "wood":
        return _wood(rng, size)
    base = _surface_colour(rng)
    scene = Image.new("RGB", (size, size), base)
    grain = 3 if kind == "table" else 1
    return ImageChops.multiply(scene, _noise_field(rng, size, cells=rng.randint(2, 6), low=0.82, grain=grain))


def _surface_colour(rng: random.Random) -> tuple[int, int, int]:
    """Desk and table tops: mostly darker than paper, sometimes a light laminate."""
    if rng.random() < 0.08:
        v = rng.randint(175, 210)
        return v, v - rng.randint(0, 10), v - rng.randint(0, 20)
    hue = rng.choice([(1.0, 1.0, 1.0), (1.0, 0.8, 0.6), (0.6, 0.7, 1.0), (0.6, 0.9, 0.7), (1.0, 0.6, 0.6)])
    v = rng.randint(30, 160)
    return tuple(min(255, round(v * h)) for h in hue)


def _wood(rng: random.Random, size: int) -> Image.Image:
    """Wood grain: bands whose shade drifts slowly, a few dark grain lines, scaled up and smoothed."""
    small = max(16, size // 3)
    base = (rng.randint(70, 170), rng.randint(40, 110), rng.randint(15, 60))
    image = Image.new("RGB", (small, small), base)
    draw = ImageDraw.Draw(image)
    phase, wave, shade = rng.uniform(0, 6.3), rng.uniform(0.5, 3), 1.0
    for y in range(small):
        shade = min(1.15, max(0.75, shade + rng.gauss(0, 0.035)))
        if rng.random() < 0.06:
            shade *= 0.85
        colour = tuple(min(255, round(c * shade)) for c in base)
        offset = math.sin(y / small * wave * 6.3 + phase) * small * 0.03
        draw.line([0, y + offset, small, y - offset], fill=colour)
    if rng.random() < 0.5:  # planks
        for y in range(rng.randint(small // 4, small), small, rng.randint(small // 3, small)):
            draw.line([0, y, small, y], fill=tuple(c // 2 for c in base))
    image = image.resize((size, size), Image.Resampling.BICUBIC)  # upscaling from 1/3 size smooths it
    return image.rotate(rng.choice([0, 90]) + rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR,
                        expand=False, fillcolor=base)


def _scanner_bed(rng: random.Random, size: int) -> Image.Image:
    """An open-lid scan: near-black bed, or the grey of a document camera's mat."""
    v = rng.randint(8, 45) if rng.random() < 0.7 else rng.randint(90, 140)
    return Image.new("RGB", (size, size), (v, v, v + rng.randint(0, 6)))


def _noise_field(rng: random.Random, size: int, cells: int, low: float, grain: float) -> Image.Image:
    """RGB multiply map: smooth blotches (cells per side) plus a texture of `grain` px, values in [low, 1]."""
    coarse = Image.new("L", (cells, cells))
    coarse.putdata([round(255 * rng.uniform(low, 1.0)) for _ in range(cells * cells)])
    field = coarse.resize((size, size), Image.Resampling.BICUBIC)
    # Fine texture drawn at a fraction of the size: upscaling smooths it as a blur would, for less.
    small = max(8, round(size / (1 + grain)))
    fine = _uniform_noise(rng, (small, small), 220, 255, channels=1)
    fine = fine.resize((size, size), Image.Resampling.BILINEAR)
    return Image.merge("RGB", [ImageChops.multiply(field, fine)] * 3)


def _uniform_noise(rng: random.Random, size: tuple[int, int], low: int, high: int, channels: int) -> Image.Image:
    """Uniform integer noise in [low, high] (L or RGB), from a torch generator seeded by `rng`.

    Pillow's own `effect_noise` draws from C `rand()`, whose state depends on the process's history,
    so it would make images depend on the worker count.
    """
    generator = torch.Generator().manual_seed(rng.getrandbits(62))
    noise = torch.randint(low, high + 1, (size[1], size[0], channels), generator=generator, dtype=torch.uint8)
    return Image.frombytes("L" if channels == 1 else "RGB", size, noise.numpy().tobytes())


# ---------------------------------------------------------------------------------------- placement

def _place_documents(rng: random.Random, scene: Image.Image, scan: bool, light: tuple[float, float],
                     count: int) -> None:
    """One page filling much of the frame, or two smaller pages side by side."""
    size = scene.width
    for i in range(count):
        width = round(size * (rng.uniform(0.5, 0.85) if count == 1 else rng.uniform(0.38, 0.55)))
        page = _rotate(rng, render_document(rng, width), spread=3 if scan else 10)
        cx = size * (rng.uniform(0.35, 0.65) if count == 1 else (0.27 + 0.46 * i + rng.uniform(-0.08, 0.08)))
        cy = size * rng.uniform(0.35, 0.65)
        _paste(rng, scene, page, (cx - page.width / 2, cy - page.height / 2), scan, light)


def _place_side_document(rng: random.Random, scene: Image.Image, scan: bool,
                         light: tuple[float, float]) -> tuple[float, float]:
    """A page half off one side of the frame; returns the horizontal range left for receipts."""
    size = scene.width
    page = _rotate(rng, render_document(rng, round(size * rng.uniform(0.45, 0.6))), spread=3 if scan else 10)
    # Wide enough that the visible part reads as a sheet, not as one more narrow strip.
    visible = min(page.width * 0.8, size * rng.uniform(0.3, 0.42))
    left_side = rng.random() < 0.5
    x = visible - page.width if left_side else size - visible
    _paste(rng, scene, page, (x, size * rng.uniform(-0.1, 0.5) - page.height * 0.25), scan, light)
    return (visible * 0.8, float(size)) if left_side else (0.0, size - visible * 0.8)


def _place_receipts(rng: random.Random, scene: Image.Image, scan: bool, light: tuple[float, float],
                    count: int, free: tuple[float, float]) -> None:
    """Receipts spread over the free band (x range), overlapping little."""
    placed: list[Box] = []
    overlap_ok = 0.2 if rng.random() < 0.2 else 0.06
    for sheet in _receipt_sheets(rng, scene.width, count, free[1] - free[0]):
        sheet = _rotate(rng, sheet, spread=4 if scan else 18, sideways=count <= 2 and rng.random() < 0.1)
        box = _choose_position(rng, sheet.size, free, scene.width, placed, overlap_ok)
        placed.append(box)
        _paste(rng, scene, sheet, box[:2], scan, light)


def _receipt_sheets(rng: random.Random, size: int, count: int, band: float) -> list[Image.Image]:
    """`count` receipts sized for the scene; sometimes two stapled into one sheet, or a lone staple."""
    # One camera distance per scene; paper rolls differ in width (57-80 mm) by about this much.
    close_up = count == 1 and rng.random() < 0.2
    scale = size * (rng.uniform(0.18, 0.25) if close_up else rng.uniform(0.12, 0.16))
    width_cap = 0.85 * band / count
    strips = [_fit_length(render_receipt(rng, round(min(scale * rng.uniform(0.85, 1.1), width_cap))), size)
              for _ in range(count)]
    if count >= 2 and rng.random() < 0.12:
        return [staple_pair(rng, strips.pop(), strips.pop())] + strips
    if rng.random() < 0.1:
        _staple_corner(rng, strips[0])
    return strips


def _fit_length(strip: Image.Image, size: int) -> Image.Image:
    """Shrink a receipt longer than most of the frame, keeping its shape."""
    limit = 0.88 * size
    if strip.height <= limit:
        return strip
    scale = limit / strip.height
    return strip.resize((max(2, round(strip.width * scale)), round(limit)), Image.Resampling.BOX)


def _staple_corner(rng: random.Random, strip: Image.Image) -> None:
    length = max(4, strip.width * rng.uniform(0.15, 0.25))
    add_staple(ImageDraw.Draw(strip), strip.width * rng.uniform(0.2, 0.8), length, length, rng.uniform(-40, 40))


def _rotate(rng: random.Random, sheet: Image.Image, spread: float, sideways: bool = False) -> Image.Image:
    """Rotate by a mostly small angle; now and then a larger one, or lying sideways."""
    angle = rng.gauss(0, spread / 2) if rng.random() < 0.8 else rng.uniform(-2 * spread, 2 * spread)
    angle += 90 * rng.choice([-1, 1]) if sideways else 0
    return sheet.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)


def _choose_position(rng: random.Random, obj_size: tuple[int, int], free: tuple[float, float], size: int,
                     placed: list[Box], overlap_ok: float) -> Box:
    """Top-left box for an object in the free band, keeping >= ~92% of it in frame and its overlap
    with already placed receipts (as a fraction of the smaller box) at most `overlap_ok`; best of 40."""
    w, h = obj_size
    slack_x, slack_y = 0.05 * w, 0.04 * h
    best, best_overlap = None, float("inf")
    for _ in range(40):
        x = rng.uniform(free[0] - slack_x, max(free[0] - slack_x, free[1] - w + slack_x))
        y = rng.uniform(-slack_y, max(-slack_y, size - h + slack_y))
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


def _paste(rng: random.Random, scene: Image.Image, sheet: Image.Image, xy: tuple[float, float], scan: bool,
           light: tuple[float, float]) -> None:
    """Alpha-paste a sheet, first casting its soft shadow on what is below (photos only)."""
    x, y = round(xy[0]), round(xy[1])
    alpha = sheet.getchannel("A")
    if not scan:
        reach = scene.width * rng.uniform(0.004, 0.014)
        blurred = alpha.filter(ImageFilter.GaussianBlur(reach * 0.8))
        opacity = rng.uniform(0.25, 0.55)
        shadow = blurred.point(lambda v: round(v * opacity))
        scene.paste((0, 0, 0), (x + round(light[0] * reach), y + round(light[1] * reach)), shadow)
    scene.paste(sheet, (x, y), alpha)


# ------------------------------------------------------------------------------------------ camera

def _photo_finish(rng: random.Random, scene: Image.Image) -> Image.Image:
    scene = ImageChops.multiply(scene, _lighting(rng, scene.width))
    if rng.random() < 0.3:
        scene = _cast_shadow(rng, scene)
    scene = _keystone(rng, scene, strength=rng.uniform(0.0, 0.09)) if rng.random() < 0.85 else scene
    radius = rng.uniform(0.0, 1.1) * scene.width / 448
    scene = scene.filter(ImageFilter.GaussianBlur(radius)) if radius > 0.25 else scene
    return _add_noise(rng, scene, amplitude=rng.randint(2, 12))


def _scan_finish(rng: random.Random, scene: Image.Image) -> Image.Image:
    if rng.random() < 0.5:
        scene = scene.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.6) * scene.width / 448))
    return _add_noise(rng, scene, amplitude=rng.randint(1, 4))


def _lighting(rng: random.Random, size: int) -> Image.Image:
    """RGB multiply map: a directional gradient, vignette and warm or cool colour cast."""
    gradient = Image.linear_gradient("L").rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR,
                                                 fillcolor=128)
    depth = rng.uniform(0.0, 0.35)
    gradient = gradient.point(lambda v: round(255 * (1 - depth * v / 255)))
    vignette = Image.radial_gradient("L").point(lambda v, d=rng.uniform(0, 0.3): round(255 * (1 - d * v / 255)))
    light = ImageChops.multiply(gradient, vignette).resize((size, size), Image.Resampling.BILINEAR)
    cast = rng.choice([(1.0, 1.0, 1.0), (1.0, 0.95, 0.85), (1.0, 0.97, 0.92), (0.92, 0.96, 1.0)])
    return Image.merge("RGB", [light.point(lambda v, c=c: round(v * c)) for c in cast])


def _cast_shadow(rng: random.Random, scene: Image.Image) -> Image.Image:
    """A soft shadow of a hand or phone reaching in from one edge."""
    size = scene.width
    mask = Image.new("L", (size, size), 0)
    corner = rng.choice([(0, 0), (size, 0), (0, size), (size, size)])
    points = [corner] + [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(3)]
    ImageDraw.Draw(mask).polygon(points, fill=round(255 * rng.uniform(0.2, 0.45)))
    mask = mask.filter(ImageFilter.GaussianBlur(size * 0.05))
    return Image.composite(Image.new("RGB", scene.size, (0, 0, 0)), scene, mask)


def _keystone(rng: random.Random, scene: Image.Image, strength: float) -> Image.Image:
    """Camera tilt: the output frame samples a quadrilateral inside the scene, so no border appears."""
    size = scene.width
    inset = [(rng.uniform(0, strength) * size, rng.uniform(0, strength) * size) for _ in range(4)]
    source = [(inset[0][0], inset[0][1]), (size - inset[1][0], inset[1][1]),
              (size - inset[2][0], size - inset[2][1]), (inset[3][0], size - inset[3][1])]
    target = [(0, 0), (size, 0), (size, size), (0, size)]
    return scene.transform(scene.size, Image.Transform.PERSPECTIVE, _perspective_coeffs(target, source),
                           Image.Resampling.BILINEAR)


def _perspective_coeffs(target: list[tuple[float, float]], source: list[tuple[float, float]]) -> list[float]:
    """PIL PERSPECTIVE coefficients (a..h) mapping output `target` corners to input `source` corners."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(target, source):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    solution = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return solution.tolist()


def _add_noise(rng: random.Random, scene: Image.Image, amplitude: int) -> Image.Image:
    """Sensor noise: every pixel's brightness moved by up to +-amplitude (luminance noise only;
    a third of the cost of per-channel noise, and JPEG removes most colour noise anyway)."""
    noise = _uniform_noise(rng, scene.size, 0, 2 * amplitude, channels=1)
    return ImageChops.add(scene, Image.merge("RGB", [noise] * 3), scale=1.0, offset=-amplitude)
