"""Write the synthetic receipt-count dataset.

    python scripts/make_receipts.py --out DIR --train N --val N --test N --seed S [--size 448] [--workers K]

Writes DIR/<split>/<split>_<index>.jpg, DIR/<split>/metadata.csv (file_name, receipt_count, label,
label_name, question, source = "synthetic") and DIR/contact_sheet.png (samples of every class, to check by eye).
Class 0: other paperwork only; class 1: one receipt; the last class: that many receipts or more, up
to --max-receipts. Each image's randomness comes from (seed, split, index) alone, so the output does
not depend on the worker count, and splits never share an image seed. Labels are balanced within
every split (counts differ by at most one).
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
from PIL import Image, ImageDraw
from tqdm import tqdm

from data.manifest import label_for_count
from data.synth.paper import font
from data.synth.scene import render_scene

SPLITS = ("train", "val", "test")
COLUMNS = ("file_name", "receipt_count", "label", "label_name", "question", "source")
SOURCE = "synthetic"  # the `source` column: every image here is rendered
CLASS_DESCRIPTIONS = {0: "no receipt (other paperwork)", 1: "one receipt"}


@dataclass(frozen=True)
class Task:
    """One image to draw and where to write it."""

    folder: str
    split: str
    index: int
    seed: int
    size: int
    receipt_count: int


def image_seed(seed: int, split: str, index: int) -> int:
    """A 64-bit seed for one image, from (seed, split, index) only."""
    digest = hashlib.blake2b(f"receipts:{seed}:{split}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def plan_split(seed: int, split: str, n: int, num_classes: int, max_receipts: int) -> list[int]:
    """Receipt counts for a split: labels balanced (round robin, then shuffled), the last class
    spread over counts num_classes-1 .. max_receipts."""
    rng = random.Random(image_seed(seed, split, -1))
    labels = [i % num_classes for i in range(n)]
    rng.shuffle(labels)
    last = num_classes - 1
    return [label if label < last else rng.randint(last, max_receipts) for label in labels]


def file_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.jpg"


def draw_one(task: Task) -> None:
    """Render and save one image (runs in a worker)."""
    rng = random.Random(image_seed(task.seed, task.split, task.index))
    image, quality = render_scene(rng, task.size, task.receipt_count)
    image.save(Path(task.folder) / file_name(task.split, task.index), format="JPEG", quality=quality)


def _init_worker() -> None:
    # Each worker draws whole images; torch's intra-op threads would only fight over the cores.
    torch.set_num_threads(1)


def run_tasks(tasks: list[Task], workers: int) -> None:
    """Draw every task with a progress bar, on `workers` processes (in-process when 1)."""
    progress = tqdm(total=len(tasks), desc="images", unit="img")
    if workers <= 1:
        _init_worker()
        for task in tasks:
            draw_one(task)
            progress.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            for _ in pool.imap_unordered(draw_one, tasks, chunksize=8):
                progress.update()
    progress.close()


def write_metadata(folder: Path, split: str, counts: list[int], class_names: list[str], question: str) -> None:
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for index, count in enumerate(counts):
            label = label_for_count(count, len(class_names))
            writer.writerow([file_name(split, index), count, label, class_names[label], question, SOURCE])


def clear_previous(folder: Path, split: str) -> None:
    """Remove images of an earlier run (only files this script names), so none outlive the metadata."""
    for old in folder.glob(f"{split}_*.jpg"):
        old.unlink()


def write_contact_sheet(out: Path, plans: dict[str, list[int]], class_names: list[str], per_class: int = 8,
                        thumb: int = 200) -> Path:
    """A grid with one row per class of the first images of that class (train first, then others)."""
    label_w, pad = 150, 4
    sheet = Image.new("RGB", (label_w + per_class * (thumb + pad), len(class_names) * (thumb + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for label, name in enumerate(class_names):
        picks = [(split, i, c) for split, counts in plans.items() for i, c in enumerate(counts)
                 if label_for_count(c, len(class_names)) == label][:per_class]
        top = label * (thumb + pad)
        description = CLASS_DESCRIPTIONS.get(label, f"{label} or more receipts" if label == len(class_names) - 1
                                             else f"{label} receipts")
        draw.text((6, top + thumb // 2 - 16), f"class {label}: {name}", fill="black", font=font("DejaVuSans-Bold", 15))
        draw.text((6, top + thumb // 2 + 4), description, fill="black", font=font("DejaVuSans", 10))
        for col, (split, index, count) in enumerate(picks):
            with Image.open(out / split / file_name(split, index)) as image:
                x = label_w + col * (thumb + pad)
                sheet.paste(image.convert("RGB").resize((thumb, thumb), Image.Resampling.BILINEAR), (x, top))
            draw.text((x + 4, top + 4), f"n={count}", fill="yellow", font=font("DejaVuSans-Bold", 12),
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
    parser.add_argument("--size", type=int, default=448, help="side of the square images, px")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--class-names", default="0,1,2+", help="comma-separated; the last one is 'n or more'")
    parser.add_argument("--max-receipts", type=int, default=5, help="most receipts in one image")
    parser.add_argument("--question", default="", help="question written to every row (default: empty)")
    parser.add_argument("--no-contact-sheet", action="store_true")
    args = parser.parse_args(argv)
    args.class_names = [name.strip() for name in args.class_names.split(",")]
    if len(args.class_names) < 2 or args.max_receipts < len(args.class_names) - 1:
        parser.error("need >= 2 class names and --max-receipts >= number of classes - 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    plans = {split: plan_split(args.seed, split, getattr(args, split), len(args.class_names), args.max_receipts)
             for split in SPLITS if getattr(args, split) > 0}
    tasks = []
    for split, counts in plans.items():
        folder = args.out / split
        folder.mkdir(parents=True, exist_ok=True)
        clear_previous(folder, split)
        tasks += [Task(str(folder), split, i, args.seed, args.size, c) for i, c in enumerate(counts)]
    run_tasks(tasks, args.workers)
    for split, counts in plans.items():  # after the images, so a manifest never names a missing file
        write_metadata(args.out / split, split, counts, args.class_names, args.question)
    if not args.no_contact_sheet and plans:
        print(f"contact sheet: {write_contact_sheet(args.out, plans, args.class_names)}")
    for split, counts in plans.items():
        per_class = [sum(label_for_count(c, len(args.class_names)) == k for c in counts)
                     for k in range(len(args.class_names))]
        print(f"{split}: {len(counts)} images, per class {dict(zip(args.class_names, per_class))}")
    print(f"{len(tasks)} images at {args.size}px with {args.workers} worker(s) in "
          f"{time.perf_counter() - started:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
