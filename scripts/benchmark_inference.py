"""Inference speed of the receipt counter on this machine: images/s and p50/p95 latency per call.

    python scripts/benchmark_inference.py [--checkpoint DIR] [--encoder swin] [--batch-sizes 1 16]
                                          [--images 32] [--rounds 3] [--image-side 448] [--device cpu]
                                          [--threads N]

Without --checkpoint it writes the tiny random checkpoints to a temporary folder, builds the demo
model (config/base.yaml, with --encoder), exports it with `save_pretrained` and loads it back with
`ReceiptCounter.from_pretrained`, the path a user's exported model takes. Inputs are synthetic receipt
scenes saved as JPEG files, so every timed call includes decoding, EXIF/mode handling, resizing and
normalising as well as the forward pass. One timed call = `predict(paths of one batch)`; latency is per
call (per batch), images/s is images over total time. A warm-up pass runs first and is not timed.
Prints a Markdown table. --threads sets torch's intra-op threads: on a shared, busy CPU one thread can
be much faster than two (threads spin waiting for each other), so say which one a number used.

    python scripts/benchmark_inference.py --decode [--photos 12] [--photo-size 4000x3000]
                                          [--decode-sizes 224 448] [--rounds 3]

--decode measures the data pipeline alone (no model): decode + EXIF + preprocessing of generated
phone photos (a receipt scene scaled to --photo-size, with sensor-like noise, JPEG quality 90, every
other one stored sideways with EXIF orientation 6), in images/s on one core, for each encoder input
size: "full decode" is the pipeline as it was (`open_image` decodes every pixel, then `preprocess`
shrinks), "draft decode" is `load_pixel_values` (JPEG DCT scaling to the smallest scale that covers
the input). It also reports how far the two pipelines' tensors are apart. With --labels MANIFEST it
instead classifies the manifest's images through both pipelines with one fixed random tiny model
(the demo model of --encoder, its fusion gates opened so the pixels reach the head) and counts the
labels that differ.

    python scripts/benchmark_inference.py --stream [--stream-counts 1000 10000] [--workers 2]

--stream runs `scripts/predict.py` (a separate process, --output JSONL) on folders of that many small
generated JPEGs with the tiny demo model, sampling the resident memory of the predict process and
of its DataLoader workers every 0.2 s: flat memory shows as the same peak at 1,000 and 10,000 images.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from PIL import Image, ImageChops, ImageOps  # noqa: E402

from config import load_config  # noqa: E402
from data.dataset import load_pixel_values  # noqa: E402
from data.images import open_image  # noqa: E402
from data.manifest import load_records  # noqa: E402
from data.synth.scene import render_scene  # noqa: E402
from data.transforms import preprocess  # noqa: E402
from models.build import build_model  # noqa: E402
from data.preprocessing import ImagePreprocessing  # noqa: E402
from models.encoders import encoder_names  # noqa: E402
from models.inference import DEVICES, ReceiptCounter  # noqa: E402
from models.internvl2 import InternVL2MultimodalModel  # noqa: E402
from models.measure import (child_pids, markdown_table, parse_size, percentile, quiet_and_threaded, rss_mib,  # noqa: E402
                            seconds_per_call)
from models.tiny import tiny_vision_overrides, write_tiny_checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def export_demo_model(encoder: str, work: Path) -> Path:
    """Tiny checkpoints -> demo model with `encoder` -> exported folder (what training's final/ holds)."""
    tiny = write_tiny_checkpoints(work / "tiny", seed=0)
    config = load_config(ROOT / "config" / "base.yaml", [
        *tiny_vision_overrides(encoder, work / "tiny"), f"model.language.checkpoint={tiny['internvl2']}",
        "model.vision.fallback=null"])
    return build_model(config.model).save_pretrained(work / "export")


def write_jpegs(folder: Path, count: int, side: int) -> list[Path]:
    """`count` synthetic receipt scenes (classes 0, 1, 2+) as JPEG files of side x side pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        scene = render_scene(random.Random(i), side, i % 3)
        paths.append(folder / f"scene_{i:04d}.jpg")
        ImageOps.pad(scene.image, (side, side), color="white").save(paths[-1], quality=scene.quality)
    return paths


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """`count` phone-photo-like JPEGs of `size` = (height, width): a receipt scene scaled up, plus noise.

    Every other photo is stored sideways (width and height swapped) with EXIF orientation 6, as
    phones store portrait shots, so the draft sizing of turned images is measured too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size
    paths = []
    for i in range(count):
        scene = ImageOps.pad(render_scene(random.Random(i), 1000, i % 3).image, (1000, 1000), color="white")
        turned = i % 2 == 1
        stored = (height, width) if turned else (width, height)  # PIL sizes are (width, height)
        photo = scene.resize(stored, Image.Resampling.BICUBIC)
        noise = Image.effect_noise(stored, 12).convert("RGB")  # mean 128: shifts pixels by N(0, 12)
        photo = ImageChops.add(photo, noise, scale=1.0, offset=-128)
        exif = Image.Exif()
        exif[0x0112] = 6 if turned else 1
        paths.append(folder / f"photo_{i:03d}.jpg")
        photo.save(paths[-1], quality=90, exif=exif)
    return paths


def full_decode(path: Path, preprocessing: ImagePreprocessing) -> torch.Tensor:
    """The pipeline before draft decoding: every pixel decoded, then shrunk by `preprocess`."""
    return preprocess(open_image(path), preprocessing)


def decode_rate(load, paths: list[Path], preprocessing: ImagePreprocessing, rounds: int) -> float:
    """Images/s of `load(path, preprocessing)` over `rounds` passes, after one untimed pass."""
    for path in paths:
        load(path, preprocessing)
    return rounds * len(paths) / sum(seconds_per_call(lambda path: load(path, preprocessing), paths * rounds))


def decode_table(paths: list[Path], sides: list[int], rounds: int) -> str:
    """Full vs draft decode + preprocessing, images/s, one row per encoder input side."""
    rows = []
    for side in sides:
        preprocessing = ImagePreprocessing(size=(side, side), mean=(0.5,) * 3, std=(0.5,) * 3)
        full = decode_rate(full_decode, paths, preprocessing, rounds)
        fast = decode_rate(load_pixel_values, paths, preprocessing, rounds)
        gaps = [(full_decode(p, preprocessing) - load_pixel_values(p, preprocessing)).abs() for p in paths]
        drafted = open_image(paths[0], target_size=(side, side)).size
        rows.append([f"{side}x{side}", f"{drafted[0]}x{drafted[1]}", f"{full:.2f}", f"{fast:.2f}",
                     f"**{fast / full:.1f}x**", f"{sum(g.mean().item() for g in gaps) / len(gaps):.4f}",
                     f"{max(g.max().item() for g in gaps):.3f}"])
    headers = ["encoder input", "first photo decoded at (WxH)", "full decode img/s", "draft decode img/s",
               "speed-up", "mean abs diff", "max abs diff"]
    return markdown_table(headers, rows)


def label_changes(manifest: str, encoder: str, work: Path, batch_size: int, checkpoint: Path | None = None) -> str:
    """Predicted labels of a manifest's images through the full and the draft decode, with a trained model
    (`checkpoint`) or one fixed random model."""
    if checkpoint is not None:
        model = InternVL2MultimodalModel.from_pretrained(checkpoint)
    else:
        model = InternVL2MultimodalModel.from_pretrained(export_demo_model(encoder, work))
        with torch.no_grad():
            for block in model.fusion.blocks:
                block.attn_gate.alpha.fill_(1.0)
                block.mlp_gate.alpha.fill_(1.0)
    counter = ReceiptCounter.from_model(model)
    records = load_records(manifest, counter.class_names)
    paths = [r.path for r in records]
    probs = {}
    for name, load in (("full", full_decode), ("draft", load_pixel_values)):
        pixels = [load(p, counter.model.preprocessing) for p in paths]
        probs[name] = torch.tensor([list(p.probabilities.values()) for p in counter.predict(pixels, batch_size)])
    # An untrained head gives every image the class of its bias; taking out the split's mean log-probability
    # (the same offset for both pipelines) leaves labels that follow the pixels, so a change can show.
    prior = probs["full"].log().mean(0) if checkpoint is None else torch.zeros(len(counter.class_names))
    labels = {name: (p.log() - prior).argmax(1) for name, p in probs.items()}
    changed = int((labels["full"] != labels["draft"]).sum())
    spread = torch.bincount(labels["full"], minlength=len(counter.class_names)).tolist()
    with Image.open(paths[0]) as first:
        side = f"{first.width}x{first.height}"
    truth = torch.tensor([r.label for r in records])
    accuracy = {name: (labels[name] == truth).float().mean().item() for name in labels}
    return (f"{manifest}: {len(paths)} images ({side} px) -> {counter.model.preprocessing.size}; labels changed by "
            f"the draft decode: {changed} of {len(paths)} (full-decode labels per class {spread}); max |probability "
            f"change| {(probs['full'] - probs['draft']).abs().max():.2e}; accuracy full {accuracy['full']:.4f}, "
            f"draft {accuracy['draft']:.4f}")


def decode_main(args: argparse.Namespace, work: Path) -> None:
    if args.labels:
        print(label_changes(args.labels, args.encoder, work, max(args.batch_sizes), args.checkpoint))
        return
    paths = write_photos(work / "photos", args.photos, args.photo_size)
    megabytes = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
    print(f"{args.photos} JPEG photos of {args.photo_size[1]}x{args.photo_size[0]} px ({megabytes:.1f} MB each, "
          f"half stored sideways with EXIF orientation 6); decode + EXIF + pad-resize + normalise, one process, "
          f"{args.rounds} timed passes; {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print(decode_table(paths, args.decode_sizes, args.rounds), flush=True)
    print("\ndiffs: between the two pipelines' normalised tensors (mean/std 0.5: values span [-1, 1]), "
          f"load average {os.getloadavg()[0]:.1f} at the end")


def write_small_jpegs(folder: Path, count: int, side: int = 96) -> None:
    """`count` quick, distinct side x side JPEGs (a flat colour and a block), for folder-scale runs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        image = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        x, y = rng.randrange(side // 2), rng.randrange(side // 2)
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + side // 2, y + side // 2))
        image.save(folder / f"img_{i:05d}.jpg", quality=85)


def stream_row(export: Path, folder: Path, count: int, workers: int, batch_size: int, work: Path) -> list[str]:
    """Run predict.py on `folder`, sampling its memory; one table row."""
    command = [sys.executable, str(ROOT / "scripts" / "predict.py"), "--checkpoint", str(export), "--device", "cpu",
               "--batch-size", str(batch_size), "--workers", str(workers), "--output", str(work / "rows.jsonl"),
               str(folder)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    main_rss, worker_rss = [], []
    while process.poll() is None:
        main_rss.append(rss_mib(process.pid))
        worker_rss.append(sum(rss_mib(c) for c in child_pids(process.pid)))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    rows = (work / "rows.jsonl").read_text().count("\n")
    half = len(main_rss) // 2
    return [f"{count:,}", f"{rows:,}", str(process.returncode), f"{wall:.1f}", f"{count / wall:.1f}",
            f"{main_rss[half]:.0f}", f"{max(main_rss):.0f}", f"{worker_rss[half]:.0f}", f"{max(worker_rss):.0f}"]


def stream_main(args: argparse.Namespace, work: Path) -> None:
    export = args.checkpoint or export_demo_model(args.encoder, work)
    rows = []
    for count in args.stream_counts:
        folder = work / f"folder_{count}"
        write_small_jpegs(folder, count)
        rows.append(stream_row(export, folder, count, args.workers, max(args.batch_sizes), work))
        shutil.rmtree(folder)
        print(f"  {count} images done", file=sys.stderr, flush=True)
    print(f"scripts/predict.py --workers {args.workers} --batch-size {max(args.batch_sizes)} --output rows.jsonl "
          f"FOLDER on 96x96 JPEGs, {'--checkpoint ' + str(args.checkpoint) if args.checkpoint else 'tiny demo model'}"
          f"; memory sampled every 0.2 s; load average {os.getloadavg()[0]:.1f}\n")
    headers = ["images", "rows written", "exit", "wall s (with start-up)", "images/s", "predict RSS at half-time (MiB)",
               "predict peak RSS (MiB)", "workers RSS at half-time, summed (MiB)", "workers peak RSS, summed (MiB)"]
    print(markdown_table(headers, rows))


def time_calls(counter: ReceiptCounter, paths: list[Path], batch_size: int, rounds: int) -> list[float]:
    """Seconds of each `predict` call over `rounds` passes through `paths`, after one untimed warm-up call."""
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    counter.predict(batches[0], batch_size=batch_size)  # warm-up: first-call allocations and kernel choice

    def call(batch: list[Path]) -> None:
        results = counter.predict(batch, batch_size=batch_size)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]

    return seconds_per_call(call, batches * rounds)


def table_row(encoder: str, batch_size: int, seconds: list[float], images: int) -> str:
    rate = images / sum(seconds)
    return (f"| {encoder} | {batch_size} | {rate:.1f} | {1000 * percentile(seconds, 50):.1f} | "
            f"{1000 * percentile(seconds, 95):.1f} | {1000 / rate:.1f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="exported model folder (default: the tiny demo model)")
    parser.add_argument("--encoder", default="swin", choices=encoder_names(), help="demo model's encoder")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--images", type=int, default=32, help="JPEG files per pass")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the files")
    parser.add_argument("--image-side", type=int, default=448, help="side of the synthetic JPEGs, px")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--decode", action="store_true", help="measure decode + preprocessing only (no model)")
    parser.add_argument("--photos", type=int, default=12, help="--decode: generated photos")
    parser.add_argument("--photo-size", type=parse_size, default=(3000, 4000),
                        help="--decode: photo HxW as stored upright (default 3000x4000, a 12 MP landscape)")
    parser.add_argument("--decode-sizes", type=int, nargs="+", default=[224, 448], help="--decode: encoder input sides")
    parser.add_argument("--labels", help="--decode: a manifest whose labels to compare between the two decodes")
    parser.add_argument("--stream", action="store_true", help="measure predict.py's memory on large folders")
    parser.add_argument("--stream-counts", type=int, nargs="+", default=[1000, 10000], help="--stream: folder sizes")
    parser.add_argument("--workers", type=int, default=2, help="--stream: predict.py --workers")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_and_threaded(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.decode:
            decode_main(args, work)
            return 0
        if args.stream:
            stream_main(args, work)
            return 0
        folder = args.checkpoint or export_demo_model(args.encoder, work)
        counter = ReceiptCounter.from_pretrained(folder, device=args.device)
        paths = write_jpegs(work / "jpegs", args.images, args.image_side)
        print(f"{counter.encoder} model from {'--checkpoint ' + str(folder) if args.checkpoint else 'tiny demo'}; "
              f"{args.images} JPEGs of {args.image_side}x{args.image_side} px -> {counter.model.preprocessing.size}; "
              f"{args.rounds} timed passes; device {counter.device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
              f"load average {os.getloadavg()[0]:.1f}\n")
        print("| encoder | batch | images/s | p50 latency (ms/call) | p95 latency (ms/call) | ms/image |")
        print("|---|---|---|---|---|---|")
        for batch_size in args.batch_sizes:
            seconds = time_calls(counter, paths, batch_size, args.rounds)
            print(table_row(counter.encoder, batch_size, seconds, args.images * args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
