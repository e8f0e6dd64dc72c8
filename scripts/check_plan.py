"""The dry run's memory estimate against the measured peak memory of real training steps, at real shapes.

    python scripts/check_plan.py [--encoder swin] [--image-size 448] [--batch-size 2] [--steps 2]
                                 [--stages head last_stage all all_ckpt] [--threads 2]

Shapes: InternVL2.5-1B (InternViT-300M, Qwen2.5-0.5B: hidden 896, 24 layers, 14 / 2 heads, MLP 4864,
vocab 151674) with the encoder's `recipe.real_config` (Swin-B: embed 128, depths 2-2-18-2, heads
4-8-16-32, window 7), described by config-only folders (`train.memory_check.write_shape_folders`),
float32, random weights. Stages (all train projector, fusion and head): `head` only those,
`last_stage` also the encoder's last stage and final norm, `all` the whole encoder, `all_ckpt` the
same with gradient checkpointing.

Estimate: `python -m train --dry-run`'s numbers (`train.plan`, meta device). Measured: for each stage a
child process (glibc pinned to mmap, so freed memory leaves the resident set) builds the model with
the same `build_model(load_weights=False)` on the CPU, resets its resident high-water mark, takes
--steps AdamW steps (`train.memory_check.train_steps`) and reports the high-water mark. Two baselines
are subtracted: a fresh interpreter that imported torch, and the child itself after its imports
(transformers and the project's code, before any model). The mark is reset after the build, so it
covers what the estimate covers (the build's own transients are `models.internvl_checkpoint`'s
business, measured in docs/real_models.md). Each child takes a minute or two on 2 cores; it needs
about 8 GB of memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config.schema import StageConfig  # noqa: E402
from models.build import build_model  # noqa: E402
from models.measure import MALLOC_PIN_ENV, peak_memory_mib, pin_malloc_to_mmap, quiet_and_threaded, rss_mib  # noqa: E402
from train.memory_check import (Measured, comparison_table, shape_config, train_steps,  # noqa: E402
                                write_shape_folders)
from train.plan import dry_run  # noqa: E402

# an interpreter that imported torch and nothing else: its peak so far is its resident set, MiB
TORCH_BASELINE = ("import json, resource, torch; "
                  "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
BASE = ["projector", "fusion", "head"]
STAGES = {
    "head": StageConfig(name="head", trainable=BASE),
    "last_stage": StageConfig(name="last_stage", trainable=[*BASE, "vision.last_stage", "vision.final_norm"]),
    "all": StageConfig(name="all", trainable=[*BASE, "vision.all"]),
    "all_ckpt": StageConfig(name="all_ckpt", trainable=[*BASE, "vision.all"], gradient_checkpointing=True),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="swin", help="a registry name (its recipe's real_config is used)")
    parser.add_argument("--image-size", type=int, default=448, help="square input side, px")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per measured stage")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the measuring children")
    parser.add_argument("--folders", type=Path, help=argparse.SUPPRESS)  # child: the config-only folders
    parser.add_argument("--measure", choices=list(STAGES), help=argparse.SUPPRESS)  # child: measure this stage
    return parser.parse_args(argv)


def measure_child(args: argparse.Namespace) -> dict[str, float]:
    """In the child: build the model on the CPU, then the resident peak of `--steps` training steps, MiB."""
    pin_malloc_to_mmap()
    quiet_and_threaded(args.threads)
    size = (args.image_size, args.image_size)
    config = shape_config(ROOT / "config" / "base.yaml", _folders(args.folders), args.encoder, size,
                          args.batch_size, [STAGES[args.measure]])
    imports_baseline = rss_mib()
    torch.manual_seed(0)
    model = build_model(config.model, load_weights=False)
    gc.collect()
    before = rss_mib()
    extra = peak_memory_mib(lambda: train_steps(model, config.train.stages[0], args.batch_size, args.steps),
                            torch.device("cpu"))
    return {"peak": before + extra, "imports_baseline": imports_baseline}


def run_child(*args: str) -> dict[str, float]:
    """`python ARGS` with glibc pinned to mmap; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, *args], env={**os.environ, **MALLOC_PIN_ENV}, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure_child(args)))
        return 0
    quiet_and_threaded(None)
    size = (args.image_size, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_shape_folders(Path(tmp), args.encoder, size)
        config = shape_config(ROOT / "config" / "base.yaml", folders, args.encoder, size, args.batch_size,
                              [STAGES[s] for s in args.stages])
        plans = dry_run(config)
        torch_rss = run_child("-c", TORCH_BASELINE)["rss"]
        common = [__file__, "--folders", tmp, "--encoder", args.encoder, "--image-size", str(args.image_size),
                  "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads)]
        measured = []
        for stage in args.stages:
            child = run_child(*common, "--measure", stage)
            measured.append(Measured(child["peak"], torch_rss, child["imports_baseline"]))
            print(f"  {stage}: peak {child['peak']:,.0f} MiB", file=sys.stderr, flush=True)
    print(f"InternVL2.5-1B shapes + {args.encoder} (recipe.real_config), batch {args.batch_size}, "
          f"{args.image_size} px, float32, {args.steps} AdamW steps per stage, {args.threads} threads; MiB\n")
    print(comparison_table(plans, measured))
    return 0


def _folders(path: Path) -> dict[str, Path]:
    vision = path / "vision"
    return {"internvl2": path / "internvl2", "vision": vision if vision.is_dir() else path / "internvl2"}


if __name__ == "__main__":
    sys.exit(main())
