"""Real images as the paper in rendered scenes: a user's own single-receipt photos or scans, no-receipt
documents and (optionally) empty backgrounds.

Public API:
    RealSources.scan(receipts, documents, backgrounds, split_sizes, seed) -> RealSources
        every image under the folders, opened once at reduced size; unreadable ones skipped and counted
    RealSources.for_split(split, real_fraction, pool=None) -> RealPaper   (a data.synth.scene.Paper)
    RealSources.write_table(path)  -- CSV: every usable source file and its split
    paper_box(image, yolo_text=None) -> (left, top, right, bottom) of the sheet in the image

A receipt image is cropped to the box in `NAME.yolo.txt` beside it when there is one (YOLO: `class cx cy
w h`, relative), otherwise to the paper region found against its background; a document or background
is used whole. Each source file belongs to exactly one split (train, val, test), so no real image appears
in two splits; which one comes from a hash of (seed, file path), in shares that follow the split sizes,
and every split with images gets at least one file of each kind when there are enough.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

from data.images import BadImageError, open_image
from data.synth.scene import Paper

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
KINDS = ("receipts", "documents", "backgrounds")
WORKING_SIDE = 640  # sources are kept at most this many px on their long side (scenes are <= 448 px)


@dataclass(frozen=True)
class Source:
    """One usable real image: where it came from and its crop, kept small."""

    name: str  # path relative to the parent of the folder given, e.g. "receipt_scans/x.jpg"
    image: Image.Image
    path: str  # the file as found


@dataclass
class RealSources:
    """All real images of a run, by kind and split, plus the files that could not be used."""

    by_split: dict[str, dict[str, list[Source]]]
    skipped: list[str] = field(default_factory=list)  # "PATH: reason"

    @classmethod
    def scan(cls, receipts: list[Path], documents: list[Path], backgrounds: list[Path],
             split_sizes: dict[str, int], seed: int) -> "RealSources":
        """Open every image in the folders (not recursive) and assign each to one split."""
        splits = [name for name, n in split_sizes.items() if n > 0]
        by_split = {split: {kind: [] for kind in KINDS} for split in splits}
        skipped: list[str] = []
        for kind, folders in zip(KINDS, (receipts, documents, backgrounds)):
            files = [path for folder in folders for path in _image_files(folder)]
            for split, chosen in _assign(files, split_sizes, seed).items():
                for path in chosen:
                    try:
                        by_split[split][kind].append(_load(path, crop=kind == "receipts"))
                    except BadImageError as error:
                        skipped.append(str(error))
        for line in skipped:
            logger.warning("skipped source image %s", line)
        return cls(by_split, skipped)

    def write_table(self, path: Path) -> None:
        """A CSV of every usable source file and the split it belongs to (path, name, kind, split), so the
        real images a split never saw can be evaluated on."""
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "name", "kind", "split"])
            for split, kinds in self.by_split.items():
                for kind, items in kinds.items():
                    writer.writerows([source.path, source.name, kind, split] for source in items)

    def counts(self) -> dict[str, dict[str, int]]:
        return {split: {kind: len(items) for kind, items in kinds.items()} for split, kinds in self.by_split.items()}

    def for_split(self, split: str, real_fraction: float, pool: int | None = None) -> "RealPaper":
        return RealPaper(self.by_split.get(split, {kind: [] for kind in KINDS}), real_fraction, pool)


class RealPaper(Paper):
    """Sheets from real images with probability `real_fraction` (when the split has any), else rendered."""

    def __init__(self, sources: dict[str, list[Source]], real_fraction: float, pool: int | None = None) -> None:
        super().__init__(pool)
        self.sources, self.real_fraction = sources, real_fraction

    def receipt(self, rng: random.Random, width: int) -> tuple[Image.Image, str]:
        return self._real("receipts", rng, width) or super().receipt(rng, width)

    def document(self, rng: random.Random, width: int) -> tuple[Image.Image, str]:
        return self._real("documents", rng, width) or super().document(rng, width)

    def background(self, rng: random.Random, kind: str, size: tuple[int, int]) -> tuple[Image.Image, str]:
        pool = self.sources["backgrounds"]
        if not kind.startswith("scanner") and pool and rng.random() < self.real_fraction:
            source = rng.choice(pool)
            return ImageOps.fit(source.image, size, Image.Resampling.BILINEAR), source.name
        return super().background(rng, kind, size)

    def _real(self, kind: str, rng: random.Random, width: int) -> tuple[Image.Image, str] | None:
        pool = self.sources[kind]
        if not pool or rng.random() >= self.real_fraction:
            return None
        source = rng.choice(pool)
        image = source.image
        height = max(2, round(image.height * width / image.width))
        sheet = image.resize((width, height), Image.Resampling.BOX if width < image.width
                             else Image.Resampling.BILINEAR)
        return sheet.convert("RGBA"), source.name  # a new image: the cached source is never drawn on


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _assign(files: list[Path], split_sizes: dict[str, int], seed: int) -> dict[str, list[Path]]:
    """Split files disjointly: ordered by a hash of (seed, name), then cut in shares of the split sizes
    (at least one file for every split with images, when there are enough files)."""
    splits = [name for name, n in split_sizes.items() if n > 0]
    ranked = sorted(files, key=lambda p: hashlib.blake2b(f"{seed}:{p.parent.name}/{p.name}".encode(),
                                                        digest_size=8).digest())
    total = sum(split_sizes[s] for s in splits)
    out, start = {}, 0
    for i, split in enumerate(splits):
        if i == len(splits) - 1:
            take = len(ranked) - start
        else:
            take = round(len(ranked) * split_sizes[split] / total)
            take = max(take, 1 if len(ranked) >= len(splits) else 0)
        out[split] = ranked[start:start + take]
        start += take
    return out


def _load(path: Path, crop: bool) -> Source:
    image = open_image(path, target_size=(WORKING_SIDE, WORKING_SIDE))
    if crop:
        yolo = path.with_name(path.stem + ".yolo.txt")
        image = image.crop(paper_box(image, yolo.read_text() if yolo.is_file() else None))
    image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BILINEAR)
    if min(image.size) < 8:
        raise BadImageError(path, f"the receipt region is only {image.width}x{image.height} px")
    return Source(f"{path.parent.name}/{path.name}", image, str(path))


def paper_box(image: Image.Image, yolo_text: str | None = None) -> tuple[int, int, int, int]:
    """The sheet's box in pixels: the first YOLO box when given, else the bright region that stands out
    from the border's colour (the whole image when the border is as bright as paper, as in a tight scan)."""
    w, h = image.size
    if yolo_text and yolo_text.split():
        _, cx, cy, bw, bh = (float(v) for v in yolo_text.split()[:5])
        box = (round((cx - bw / 2) * w), round((cy - bh / 2) * h), round((cx + bw / 2) * w), round((cy + bh / 2) * h))
        return max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])
    small = ImageOps.grayscale(image).resize((64, 64), Image.Resampling.BILINEAR).filter(ImageFilter.MedianFilter(3))
    pixels = list(small.tobytes())  # 64 x 64 grey levels, row by row
    border = sorted(pixels[:64] + pixels[-64:] + pixels[::64] + pixels[63::64])
    background = border[len(border) // 2]
    if background > 170:
        return 0, 0, w, h
    threshold = background + max(40, (255 - background) // 2)
    rows = [y for y in range(64) if sum(v > threshold for v in pixels[y * 64:(y + 1) * 64]) > 6]
    cols = [x for x in range(64) if sum(v > threshold for v in pixels[x::64]) > 6]
    if not rows or not cols:
        return 0, 0, w, h
    return (cols[0] * w // 64, rows[0] * h // 64, (cols[-1] + 1) * w // 64, (rows[-1] + 1) * h // 64)
