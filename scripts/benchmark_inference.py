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
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from config import load_config  # noqa: E402
from data.synth.scene import render_scene  # noqa: E402
from models.build import build_model  # noqa: E402
from models.inference import DEVICES, ReceiptCounter  # noqa: E402
from models.tiny import write_tiny_checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_FOLDER = {"internvit": "internvl2", "swin": "swin", "swinv2": "swinv2", "swinv2_inhouse": "swinv2"}


def export_demo_model(encoder: str, work: Path) -> Path:
    """Tiny checkpoints -> demo model with `encoder` -> exported folder (what training's final/ holds)."""
    tiny = write_tiny_checkpoints(work / "tiny", seed=0)
    config = load_config(ROOT / "config" / "base.yaml", [
        f"model.vision.encoder={encoder}", f"model.vision.checkpoint={tiny[TINY_FOLDER[encoder]]}",
        f"model.language.checkpoint={tiny['internvl2']}", "model.vision.fallback=null"])
    return build_model(config.model).save_pretrained(work / "export")


def write_jpegs(folder: Path, count: int, side: int) -> list[Path]:
    """`count` synthetic receipt scenes (0-3 receipts) as JPEG files of side x side pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image, quality = render_scene(random.Random(i), side, i % 4)
        paths.append(folder / f"scene_{i:04d}.jpg")
        image.save(paths[-1], quality=quality)
    return paths


def time_calls(counter: ReceiptCounter, paths: list[Path], batch_size: int, rounds: int) -> list[float]:
    """Seconds of each `predict` call over `rounds` passes through `paths`, after one untimed warm-up call."""
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    counter.predict(batches[0], batch_size=batch_size)  # warm-up: first-call allocations and kernel choice
    seconds = []
    for _ in range(rounds):
        for batch in batches:
            start = time.perf_counter()
            results = counter.predict(batch, batch_size=batch_size)
            seconds.append(time.perf_counter() - start)
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return seconds


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method; exact for the sample sizes used here)."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def table_row(encoder: str, batch_size: int, seconds: list[float], images: int) -> str:
    rate = images / sum(seconds)
    return (f"| {encoder} | {batch_size} | {rate:.1f} | {1000 * percentile(seconds, 50):.1f} | "
            f"{1000 * percentile(seconds, 95):.1f} | {1000 / rate:.1f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="exported model folder (default: the tiny demo model)")
    parser.add_argument("--encoder", default="swin", choices=sorted(TINY_FOLDER), help="demo model's encoder")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--images", type=int, default=32, help="JPEG files per pass")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the files")
    parser.add_argument("--image-side", type=int, default=448, help="side of the synthetic JPEGs, px")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
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
