"""What the paper lies on and how it is captured: surfaces, hands, clutter, and the photo or scan finish.

Public API:
    surface(rng, kind, size) -> RGB background of `size` = (width, height); kind in SURFACES
    add_clutter(rng, scene, count)       -- pens, a phone, a mug ring, keys: desk things that are not paper
    add_hand(rng, scene, near)           -- a hand holding the paper at box `near`, reaching in from an edge
    paste(rng, scene, sheet, xy, shadow, light) -- alpha-paste a sheet over its soft shadow (strength `shadow`)
    photo_finish(rng, scene) / scan_finish(rng, scene) -> RGB

Every random choice comes from the `random.Random` passed in (noise from torch generators seeded by it), so
an image depends on its seed alone, never on the process that draws it.
"""

from __future__ import annotations

import math
import random

import torch
from PIL import Image, ImageChops, ImageDraw, ImageFilter

Size = tuple[int, int]  # (width, height), PIL's order
Box = tuple[float, float, float, float]  # (left, top, right, bottom)
SURFACES = ("scanner_lid", "scanner_bed", "wood", "table", "fabric")
DOCUMENT_MODE_SHARE = 0.15  # of scans: in black-and-white document mode, as office scanners and faxes store forms
SKIN = ((236, 188, 160), (224, 172, 140), (198, 134, 100), (160, 105, 75), (110, 72, 52))


def surface(rng: random.Random, kind: str, size: Size) -> Image.Image:
    """A background: a scanner's white lid or dark bed, a wood desk, a plain table top, or fabric."""
    if kind == "scanner_lid":  # what a flatbed shows around a sheet with its lid closed
        v = rng.randint(228, 255)
        return ImageChops.multiply(Image.new("RGB", size, (v, v, v - rng.randint(0, 4))),
                                   _noise_field(rng, size, cells=2, low=0.96, grain=1))
    if kind == "scanner_bed":  # lid open: near-black, or a document camera's grey mat
        v = rng.randint(8, 45) if rng.random() < 0.7 else rng.randint(90, 140)
        return Image.new("RGB", size, (v, v, v + rng.randint(0, 6)))
    if kind == "wood":
        return _wood(rng, size)
    scene = Image.new("RGB", size, _surface_colour(rng))
    grain = 3 if kind == "table" else 1
    return ImageChops.multiply(scene, _noise_field(rng, size, cells=rng.randint(2, 6), low=0.82, grain=grain))


def _surface_colour(rng: random.Random) -> tuple[int, int, int]:
    """Desk and table tops: mostly darker than paper, sometimes a light laminate."""
    if rng.random() < 0.15:
        v = rng.randint(175, 225)
        return v, v - rng.randint(0, 10), v - rng.randint(0, 20)
    hue = rng.choice([(1.0, 1.0, 1.0), (1.0, 0.8, 0.6), (0.6, 0.7, 1.0), (0.6, 0.9, 0.7), (1.0, 0.6, 0.6),
                      (1.0, 0.55, 0.3)])
    v = rng.randint(30, 170)
    return tuple(min(255, round(v * h)) for h in hue)


def _wood(rng: random.Random, size: Size) -> Image.Image:
    """Wood grain: bands whose shade drifts slowly, a few dark grain lines, scaled up and smoothed."""
    side = max(size)
    small = max(16, side // 3)
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
    image = image.resize((side, side), Image.Resampling.BICUBIC)  # upscaling from 1/3 size smooths it
    image = image.rotate(rng.choice([0, 90]) + rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR,
                         expand=False, fillcolor=base)
    return image.crop((0, 0) + size)


def _noise_field(rng: random.Random, size: Size, cells: int, low: float, grain: float) -> Image.Image:
    """RGB multiply map: smooth blotches (cells per side) plus a texture of `grain` px, values in [low, 1]."""
    coarse = Image.new("L", (cells, cells))
    coarse.putdata([round(255 * rng.uniform(low, 1.0)) for _ in range(cells * cells)])
    field = coarse.resize(size, Image.Resampling.BICUBIC)
    # Fine texture drawn at a fraction of the size: upscaling smooths it as a blur would, for less.
    small = (max(8, round(size[0] / (1 + grain))), max(8, round(size[1] / (1 + grain))))
    fine = uniform_noise(rng, small, round(255 * max(low, 0.86)), 255, channels=1)
    fine = fine.resize(size, Image.Resampling.BILINEAR)
    return Image.merge("RGB", [ImageChops.multiply(field, fine)] * 3)


def uniform_noise(rng: random.Random, size: Size, low: int, high: int, channels: int) -> Image.Image:
    """Uniform integer noise in [low, high] (L or RGB), from a torch generator seeded by `rng`.

    Pillow's own `effect_noise` draws from C `rand()`, whose state depends on the process's history,
    so it would make images depend on the worker count.
    """
    generator = torch.Generator().manual_seed(rng.getrandbits(62))
    noise = torch.randint(low, high + 1, (size[1], size[0], channels), generator=generator, dtype=torch.uint8)
    return Image.frombytes("L" if channels == 1 else "RGB", size, noise.numpy().tobytes())


# --------------------------------------------------------------------------------- things on a desk

def add_clutter(rng: random.Random, scene: Image.Image, count: int) -> None:
    """Desk things that are not paper: a pen, a phone, a mug's ring, keys (drawn flat, with no shadow)."""
    draw = ImageDraw.Draw(scene)
    w, h = scene.size
    unit = min(w, h)
    for _ in range(count):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        kind = rng.choice(["pen", "phone", "mug", "keys"])
        if kind == "pen":
            angle, length = rng.uniform(0, math.pi), unit * rng.uniform(0.2, 0.4)
            end = (x + math.cos(angle) * length, y + math.sin(angle) * length)
            colour = rng.choice([(20, 30, 120), (10, 10, 10), (160, 20, 20), (230, 230, 230)])
            draw.line([x, y, *end], fill=colour, width=max(2, round(unit * 0.018)))
        elif kind == "phone":
            pw, ph = unit * rng.uniform(0.12, 0.18), unit * rng.uniform(0.24, 0.34)
            draw.rounded_rectangle([x, y, x + pw, y + ph], radius=pw * 0.15, fill=(rng.randint(5, 40),) * 3)
        elif kind == "mug":
            r = unit * rng.uniform(0.08, 0.14)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=(90, 60, 40), width=max(1, round(r * 0.12)))
        else:
            for _ in range(rng.randint(2, 4)):
                kx, ky, r = x + rng.uniform(-12, 12), y + rng.uniform(-12, 12), unit * 0.025
                draw.ellipse([kx - r, ky - r, kx + r, ky + r], fill=(rng.randint(150, 200),) * 3)


def add_hand(rng: random.Random, scene: Image.Image, near: Box) -> None:
    """A hand reaching in from the nearest frame edge, its thumb over the edge of the paper at `near`."""
    w, h = scene.size
    left, top, right, bottom = near
    skin = rng.choice(SKIN)
    unit = min(w, h)
    layer = Image.new("L", scene.size, 0)
    draw = ImageDraw.Draw(layer)
    from_bottom = rng.random() < 0.6
    if from_bottom:  # palm below the paper's lower edge, thumb over it
        cx = rng.uniform(max(0, left), min(w, right))
        edge = min(h, bottom)
        draw.ellipse([cx - unit * 0.22, edge - unit * 0.02, cx + unit * 0.22, edge + unit * 0.4], fill=255)
        draw.ellipse([cx - unit * 0.05, edge - unit * 0.12, cx + unit * 0.04, edge + unit * 0.05], fill=255)
    else:  # from the left or right side
        side = left if rng.random() < 0.5 else right
        cy = rng.uniform(max(0, top), min(h, bottom))
        palm = (side - unit * 0.35, side + unit * 0.03) if side == left else (side - unit * 0.03, side + unit * 0.35)
        draw.ellipse([palm[0], cy - unit * 0.18, palm[1], cy + unit * 0.18], fill=255)
        reach = (side - unit * 0.04, side + unit * 0.11) if side == left else (side - unit * 0.11, side + unit * 0.04)
        draw.ellipse([reach[0], cy - unit * 0.035, reach[1], cy + unit * 0.035], fill=255)
    layer = layer.filter(ImageFilter.GaussianBlur(unit * 0.006))
    shading = ImageChops.multiply(Image.new("RGB", scene.size, skin), _noise_field(rng, scene.size, 3, 0.8, 2))
    scene.paste(shading, (0, 0), layer)


def paste(rng: random.Random, scene: Image.Image, sheet: Image.Image, xy: tuple[float, float], shadow: float,
          light: tuple[float, float]) -> None:
    """Alpha-paste an RGBA sheet at `xy`, first casting its soft shadow on what is below.

    Args:
        shadow: 1 for a photo's drop shadow, about 0.2-0.5 for the thin dark edge a flatbed scan shows
            around a sheet under its lid, 0 for none.
    """
    x, y = round(xy[0]), round(xy[1])
    alpha = sheet.getchannel("A")
    if shadow > 0:
        reach = min(scene.size) * rng.uniform(0.004, 0.014) * shadow
        blurred = alpha.filter(ImageFilter.GaussianBlur(max(0.5, reach * 0.8)))
        opacity = rng.uniform(0.25, 0.55) * min(1.0, 2 * shadow)
        scene.paste((0, 0, 0), (x + round(light[0] * reach), y + round(light[1] * reach)),
                    blurred.point(lambda v: round(v * opacity)))
    scene.paste(sheet, (x, y), alpha)


# ------------------------------------------------------------------------------------------ capture

def photo_finish(rng: random.Random, scene: Image.Image) -> Image.Image:
    """Uneven light with a colour cast, maybe a hand's shadow, keystone tilt, blur and sensor noise."""
    scene = ImageChops.multiply(scene, _lighting(rng, scene.size))
    if rng.random() < 0.3:
        scene = _cast_shadow(rng, scene)
    scene = _keystone(rng, scene, strength=rng.uniform(0.0, 0.09)) if rng.random() < 0.85 else scene
    radius = rng.uniform(0.0, 1.1) * max(scene.size) / 448
    scene = scene.filter(ImageFilter.GaussianBlur(radius)) if radius > 0.25 else scene
    return _add_noise(rng, scene, amplitude=rng.randint(2, 12))


def scan_finish(rng: random.Random, scene: Image.Image) -> Image.Image:
    """A flatbed's flat light: a little blur and a little noise; now and then an office scanner's
    black-and-white document mode: paper and lid clipped to pure white, ink pushed towards black."""
    if rng.random() < 0.5:
        scene = scene.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.6) * max(scene.size) / 448))
    scene = _add_noise(rng, scene, amplitude=rng.randint(1, 4))
    if rng.random() < DOCUMENT_MODE_SHARE:
        grey = scene.convert("L")
        white = _paper_level(grey) * rng.uniform(0.85, 0.95)
        black = white * rng.uniform(0.3, 0.6)  # a steep ramp, not a hard cut: small print at this size is grey
        scene = grey.point(lambda v: round(255 * min(1.0, max(0.0, (v - black) / (white - black))))).convert("RGB")
    return scene


def _paper_level(grey: Image.Image) -> int:
    """The luminance nine pixels in ten of a greyscale image stay below: about its paper's white."""
    histogram = grey.histogram()
    total, seen = sum(histogram), 0
    for level, n in enumerate(histogram):
        seen += n
        if seen >= 0.9 * total:
            return level
    return 255


def _lighting(rng: random.Random, size: Size) -> Image.Image:
    """RGB multiply map: a directional gradient, vignette and warm or cool colour cast."""
    gradient = Image.linear_gradient("L").rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR,
                                                 fillcolor=128)
    depth = rng.uniform(0.0, 0.35)
    gradient = gradient.point(lambda v: round(255 * (1 - depth * v / 255)))
    vignette = Image.radial_gradient("L").point(lambda v, d=rng.uniform(0, 0.3): round(255 * (1 - d * v / 255)))
    light = ImageChops.multiply(gradient, vignette).resize(size, Image.Resampling.BILINEAR)
    cast = rng.choice([(1.0, 1.0, 1.0), (1.0, 0.95, 0.85), (1.0, 0.97, 0.92), (0.92, 0.96, 1.0)])
    return Image.merge("RGB", [light.point(lambda v, c=c: round(v * c)) for c in cast])


def _cast_shadow(rng: random.Random, scene: Image.Image) -> Image.Image:
    """A soft shadow of a hand or phone reaching in from one corner."""
    w, h = scene.size
    mask = Image.new("L", scene.size, 0)
    corner = rng.choice([(0, 0), (w, 0), (0, h), (w, h)])
    points = [corner] + [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(3)]
    ImageDraw.Draw(mask).polygon(points, fill=round(255 * rng.uniform(0.2, 0.45)))
    mask = mask.filter(ImageFilter.GaussianBlur(min(w, h) * 0.05))
    return Image.composite(Image.new("RGB", scene.size, (0, 0, 0)), scene, mask)


def _keystone(rng: random.Random, scene: Image.Image, strength: float) -> Image.Image:
    """Camera tilt: the output frame samples a quadrilateral inside the scene, so no border appears."""
    w, h = scene.size
    inset = [(rng.uniform(0, strength) * w, rng.uniform(0, strength) * h) for _ in range(4)]
    source = [(inset[0][0], inset[0][1]), (w - inset[1][0], inset[1][1]),
              (w - inset[2][0], h - inset[2][1]), (inset[3][0], h - inset[3][1])]
    target = [(0, 0), (w, 0), (w, h), (0, h)]
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
    noise = uniform_noise(rng, scene.size, 0, 2 * amplitude, channels=1)
    return ImageChops.add(scene, Image.merge("RGB", [noise] * 3), scale=1.0, offset=-amplitude)
