"""Write the receipt-count dataset: rendered scenes, optionally composed from a user's real images.

    python scripts/make_receipts.py --out DIR --train N --val N --test N --seed S [--size 448] [--workers K]
        [--receipts DIR ...] [--documents DIR ...] [--real-fraction F]

Writes DIR/<split>/<split>_<index>.jpg, DIR/<split>/metadata.csv (file_name, receipt_count, label,
label_name, question, source, framing, source_files), DIR/contact_sheet.png (samples of every class,
to check by eye) and, with real folders, DIR/real_sources.csv (each real file and the split it went to). `source` is "synthetic" for an image drawn from rendered paper only and "composed" when
real images went into it; `source_files` lists those files (";"-separated, relative to their folder's
parent). Class 0: other paperwork only; class 1: one receipt; the last class: that many receipts or more,
up to --max-receipts. The framing, surface, aspect and paper coverage are drawn independently of the class
(data/synth/scene.py). Each image's randomness comes from (seed, split, index) alone, so the output does
not depend on the worker count, and splits never share an image seed nor a real source image. Labels are
balanced within every split (counts differ by at most one). Images have --size px on their long side.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import multiprocessing
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from data.synth.paper import font
from data.synth.real import RealSources
from data.synth.scene import Paper, render_scene

SPLITS = ("train", "val", "test")
COLUMNS = ("file_name", "receipt_count", "label", "label_name", "question", "source", "framing", "source_files")
CLASS_DESCRIPTIONS = {0: "no receipt (other paperwork)", 1: "one receipt"}


@dataclass(frozen=True)
class Task:
    """One image to draw and where to write it."""

    folder: str
    split: str
    index: int
    seed: int
    size: int
    label: int
    num_classes: int
    max_receipts: int


@dataclass(frozen=True)
class Drawn:
    """What a worker drew for one task (the metadata row's facts)."""

    index: int
    receipt_count: int
    framing: str
    sources: tuple[str, ...]


# Per worker process: the real paper of each split (set before the pool forks, read by draw_one).
_PAPER: dict[str, Paper] = {}


def image_seed(seed: int, split: str, index: int) -> int:
    """A 64-bit seed for one image, from (seed, split, index) only."""
    digest = hashlib.blake2b(f"receipts:{seed}:{split}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def plan_split(seed: int, split: str, n: int, num_classes: int) -> list[int]:
    """Labels for a split, balanced: round robin, then shuffled (the scene draws the count in a class)."""
    rng = random.Random(image_seed(seed, split, -1))
    labels = [i % num_classes for i in range(n)]
    rng.shuffle(labels)
    return labels


def file_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.jpg"


def draw_one(task: Task) -> Drawn:
    """Render and save one image (runs in a worker)."""
    rng = random.Random(image_seed(task.seed, task.split, task.index))
    scene = render_scene(rng, task.size, task.label, task.num_classes, task.max_receipts, _PAPER.get(task.split))
    scene.image.save(Path(task.folder) / file_name(task.split, task.index), format="JPEG", quality=scene.quality)
    return Drawn(task.index, scene.receipt_count, scene.framing, scene.sources)


def _init_worker() -> None:
    # Each worker draws whole images; torch's intra-op threads would only fight over the cores.
    torch.set_num_threads(1)


def run_tasks(tasks: list[Task], workers: int) -> dict[tuple[str, int], Drawn]:
    """Draw every task with a progress bar, on `workers` processes (in-process when 1)."""
    with tqdm(total=len(tasks), desc="images", unit="img") as progress:
        if workers <= 1:
            _init_worker()
            return _collect(tasks, map(draw_one, tasks), progress)
        with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            return _collect(tasks, pool.imap(draw_one, tasks, chunksize=8), progress)


def _collect(tasks: list[Task], results, progress: tqdm) -> dict[tuple[str, int], Drawn]:
    drawn = {}
    for task, result in zip(tasks, results):
        drawn[task.split, result.index] = result
        progress.update()
    return drawn


def write_metadata(folder: Path, split: str, labels: list[int], drawn: dict[tuple[str, int], Drawn],
                   class_names: list[str], question: str) -> None:
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for index, label in enumerate(labels):
            row = drawn[split, index]
            source = "composed" if row.sources else "synthetic"
            writer.writerow([file_name(split, index), row.receipt_count, label, class_names[label], question,
                             source, row.framing, ";".join(row.sources)])


def clear_previous(folder: Path, split: str) -> None:
    """Remove images of an earlier run (only files this script names), so none outlive the metadata."""
    for old in folder.glob(f"{split}_*.jpg"):
        old.unlink()


def write_contact_sheet(out: Path, plans: dict[str, list[int]], drawn: dict[tuple[str, int], Drawn],
                        class_names: list[str], per_class: int = 8, thumb: int = 200) -> Path:
    """A grid with one row per class of the first images of that class (train first, then others),
    each shown as the model sees it: fitted into a square, padded white."""
    label_w, pad = 150, 4
    sheet = Image.new("RGB", (label_w + per_class * (thumb + pad), len(class_names) * (thumb + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for label, name in enumerate(class_names):
        picks = [(split, i) for split, labels in plans.items() for i, k in enumerate(labels) if k == label]
        top = label * (thumb + pad)
        description = CLASS_DESCRIPTIONS.get(label, f"{label} or more receipts" if label == len(class_names) - 1
                                             else f"{label} receipts")
        draw.text((6, top + thumb // 2 - 16), f"class {label}: {name}", fill="black", font=font("DejaVuSans-Bold", 15))
        draw.text((6, top + thumb // 2 + 4), description, fill="black", font=font("DejaVuSans", 10))
        for col, (split, index) in enumerate(picks[:per_class]):
            x = label_w + col * (thumb + pad)
            with Image.open(out / split / file_name(split, index)) as image:
                sheet.paste(ImageOps.pad(image.convert("RGB"), (thumb, thumb), color="white"), (x, top))
            row = drawn[split, index]
            tag = f"n={row.receipt_count} {row.framing}" + (" real" if row.sources else "")
            draw.text((x + 4, top + 4), tag, fill="yellow", font=font("DejaVuSans-Bold", 11),
                      stroke_width=2, stroke_fill="black")
    path = out / "contact_sheet.png"
    sheet.save(path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=0, help=f"number of {split} images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=448, help="long side of the images, px")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--class-names", default="0,1,2+", help="comma-separated; the last one is 'n or more'")
    parser.add_argument("--max-receipts", type=int, default=12, help="most receipts in one image")
    parser.add_argument("--question", default="", help="question written to every row (default: empty)")
    parser.add_argument("--receipts", type=Path, action="append", default=[],
                        help="folder of real single-receipt scans or photos (NAME.yolo.txt beside an image gives "
                             "its box); repeatable")
    parser.add_argument("--documents", type=Path, action="append", default=[],
                        help="folder of real images with no receipt (letters, forms, ...); repeatable")
    parser.add_argument("--backgrounds", type=Path, action="append", default=[],
                        help="folder of real photos of empty surfaces (desks, tables); repeatable")
    parser.add_argument("--real-fraction", type=float, default=0.5,
                        help="share of the sheets (and photo backgrounds) taken from the real folders")
    parser.add_argument("--no-contact-sheet", action="store_true")
    args = parser.parse_args(argv)
    args.class_names = [name.strip() for name in args.class_names.split(",")]
    if len(args.class_names) < 2 or args.max_receipts < len(args.class_names) - 1:
        parser.error("need >= 2 class names and --max-receipts >= number of classes - 1")
    if not 0.0 <= args.real_fraction <= 1.0:
        parser.error(f"--real-fraction must be in [0, 1], got {args.real_fraction}")
    for folder in args.receipts + args.documents + args.backgrounds:
        if not folder.is_dir():
            parser.error(f"{folder}: not a folder")
    return args


def load_paper(args: argparse.Namespace, sizes: dict[str, int]) -> None:
    """Give each split its paper: rendered from the split's text pool, plus (with real folders) the
    real images of that split, opened once and split disjointly."""
    # Each split prints its texts from its own pool, so no printed text is shared between splits.
    pools = {split: image_seed(args.seed, split, -2) for split in sizes}
    _PAPER.clear()
    _PAPER.update({split: Paper(pools[split]) for split in sizes})
    if not (args.receipts or args.documents or args.backgrounds):
        return
    sources = RealSources.scan(args.receipts, args.documents, args.backgrounds, sizes, args.seed)
    for split in sizes:
        _PAPER[split] = sources.for_split(split, args.real_fraction, pools[split])
    args.out.mkdir(parents=True, exist_ok=True)
    sources.write_table(args.out / "real_sources.csv")
    print(f"real source images per split: {sources.counts()}; skipped {len(sources.skipped)} unreadable"
          + (f" (first: {sources.skipped[0]})" if sources.skipped else ""))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    sizes = {split: getattr(args, split) for split in SPLITS if getattr(args, split) > 0}
    plans = {split: plan_split(args.seed, split, n, len(args.class_names)) for split, n in sizes.items()}
    load_paper(args, sizes)
    tasks = []
    for split, labels in plans.items():
        folder = args.out / split
        folder.mkdir(parents=True, exist_ok=True)
        clear_previous(folder, split)
        tasks += [Task(str(folder), split, i, args.seed, args.size, label, len(args.class_names), args.max_receipts)
                  for i, label in enumerate(labels)]
    drawn = run_tasks(tasks, args.workers)
    for split, labels in plans.items():  # after the images, so a manifest never names a missing file
        write_metadata(args.out / split, split, labels, drawn, args.class_names, args.question)
    if not args.no_contact_sheet and plans:
        print(f"contact sheet: {write_contact_sheet(args.out, plans, drawn, args.class_names)}")
    for split, labels in plans.items():
        per_class = {name: labels.count(k) for k, name in enumerate(args.class_names)}
        composed = sum(bool(drawn[split, i].sources) for i in range(len(labels)))
        print(f"{split}: {len(labels)} images, per class {per_class}, {composed} composed with real paper")
    print(f"{len(tasks)} images at {args.size}px with {args.workers} worker(s) in "
          f"{time.perf_counter() - started:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
