"""Encoder A/B comparison: train each config the same way, measure the exported models, one table.

    python scripts/compare_encoders.py                                    # every registered encoder
    python scripts/compare_encoders.py --encoders swin internvit [--set train.stages.1.epochs=2 ...] \\
        [--out runs/compare] [--threads 1]
    python scripts/compare_encoders.py --configs A.yaml B.yaml            # your own configs instead

Each encoder runs config/compare/budget.yaml (the shared budget) with `model.vision.encoder=NAME` and
`model.vision.checkpoint=checkpoints/tiny/<its adapter's recipe.tiny_checkpoint>` (written by
`python scripts/make_tiny_checkpoints.py --out checkpoints/tiny`); the budget's fallback is kept
except for the fallback encoder itself. For each run, in order:
1. **train** -- `python -m train --config C --set ... --set output_dir=OUT/runs/NAME` in a child process
   (the project's one training entry point), stdout/stderr to OUT/runs/NAME/train.log. Before anything
   runs, the resolved configs are checked to differ only under `model.vision` (and `output_dir`): same
   data split, seed, batch size, stages and epochs; otherwise it stops and names the differing keys
   (`--allow-differences` to run anyway).
2. **measure** -- a second child (`--measure RUN/final`) loads the exported model with
   `ReceiptCounter.from_pretrained` and predicts the test manifest (`data.test`) from the JPEG files.

Columns (the JSON holds more, e.g. per-stage trainable counts and the training run's own test metrics):
- test accuracy, macro-F1 and expected calibration error (top-1 confidence, 15 bins, `models.metrics`)
  of the exported final model on the test split, from the measure pass;
- trainable parameters: the largest count over the stages (`RUN/stages/*/trainable.json`); total: the
  exported model's parameters;
- visual tokens per image: `model.num_image_tokens()` at the configured size;
- train img/s: images trained on (every stage's epochs x the training set, or its max_steps x batch)
  over the wall time of the whole training command -- model build, per-epoch validation, checkpoints,
  export and the test pass included, so it is a lower bound on the pure step rate;
- infer img/s: the timed test pass, `predict(paths, batch_size=--batch-size)`, JPEG decode and
  preprocessing included (one untimed warm-up batch first); latency: median of `predict([tensor])`
  over `--latency-images` already-preprocessed test images, batch 1 (model only);
- peak RSS: the high-water resident set of each child process (`ru_maxrss` from `os.wait4` on that
  child alone; interpreter, torch and the model included). On CUDA the measure child also records
  `torch.cuda.max_memory_allocated`; the training child's GPU peak is not visible from here.
- encoder used: from the exported model's resolved config and results.json. A run whose encoder is not
  the one its config asked for (a fallback) is marked **FALLBACK** in the table, listed in a warning
  under it, and makes the exit status 1, so a ViT result can never pass for a Swin one.

Children run with OMP_NUM_THREADS/MKL_NUM_THREADS=--threads (default 1: on 2 shared cores two torch
threads spin against other processes and run many times slower). Writes OUT/compare.md and
OUT/compare.json, and prints the table. Exit status: 0 when every run finished on its own encoder,
1 when any run failed, fell back or was skipped (encoder not registered), 2 on a config problem.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from config import Config, config_differences, load_config  # noqa: E402
from config.loader import ConfigError  # noqa: E402
from data.dataset import load_pixel_values  # noqa: E402
from data.manifest import load_records  # noqa: E402
from models.encoders import encoder_names  # noqa: E402
from models.inference import ReceiptCounter, prediction_metrics  # noqa: E402
from models.measure import machine_info, markdown_table, seconds_per_call  # noqa: E402
from models.tiny import tiny_vision_overrides  # noqa: E402

BUDGET = ROOT / "config" / "compare" / "budget.yaml"
TINY_CHECKPOINTS = "checkpoints/tiny"  # relative to the repository, where the training child runs
# Keys allowed to differ between the compared configs: the encoder itself, and where a run writes.
FREE_KEYS = ("model.vision", "output_dir")


@dataclass
class Plan:
    """One config to compare."""

    name: str
    config_path: Path
    config: Config  # resolved with the common overrides
    overrides: list[str]
    run_dir: Path

    @property
    def requested_encoder(self) -> str:
        return self.config.model.vision.encoder


@dataclass
class ChildResult:
    """A finished child process."""

    returncode: int
    wall_s: float
    max_rss_mib: float


# ----------------------------------------------------------------------------------- planning
def _plan(name: str, path: Path, overrides: list[str], out: Path) -> Plan:
    run_dir = out / "runs" / name
    run_overrides = [*overrides, f"output_dir={run_dir}"]
    return Plan(name, path, load_config(path, run_overrides), run_overrides, run_dir)


def encoder_plans(encoders: list[str], overrides: list[str], out: Path) -> list[Plan]:
    """The shared budget once per encoder, on the tiny checkpoint its adapter's recipe names; OUT/runs/NAME."""
    fallback = load_config(BUDGET).model.vision.fallback
    plans = []
    for name in encoders:
        vision = tiny_vision_overrides(name, TINY_CHECKPOINTS) + (["model.vision.fallback=null"] if name == fallback
                                                                  else [])
        plans.append(_plan(name, BUDGET, [*vision, *overrides], out))
    return plans


def make_plans(paths: list[Path], overrides: list[str], out: Path) -> list[Plan]:
    """Resolve every config with the common overrides; each run writes to OUT/runs/<config stem>."""
    plans, seen = [], set()
    for path in (p.resolve() for p in paths):
        name = path.stem if path.stem not in seen else f"{path.parent.name}_{path.stem}"
        seen.add(name)
        plans.append(_plan(name, path, overrides, out))
    return plans


def repo_path(path: str) -> Path:
    """A config path as the training child (run from the repo root) reads it."""
    return Path(path) if Path(path).is_absolute() else ROOT / path


def budget_differences(plans: list[Plan]) -> list[str]:
    """Keys outside FREE_KEYS whose values differ between the plans, as "key: name=value, ...".

    Anything listed means the runs do not share data split, seed or training budget.
    """
    diffs = config_differences({p.name: p.config for p in plans}, ignore=FREE_KEYS)
    return [f"{key}: " + ", ".join(f"{n}={v!r}" for n, v in values.items()) for key, values in diffs.items()]


# ------------------------------------------------------------------------------------ children
def run_child(command: list[str], log_path: Path, threads: int) -> ChildResult:
    """Run `command`, output to `log_path`; its own peak RSS comes from wait4 on that child alone."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    return ChildResult(proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024)  # KiB on Linux


def train_command(plan: Plan) -> list[str]:
    command = [sys.executable, "-m", "train", "--config", str(plan.config_path)]
    for item in plan.overrides:
        command += ["--set", item]
    return command


def measure_command(plan: Plan, args: argparse.Namespace) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--measure", str(plan.run_dir / "final"),
            "--data", str(repo_path(plan.config.data.test)), "--json", str(plan.run_dir / "measure.json"),
            "--batch-size", str(args.batch_size), "--latency-images", str(args.latency_images),
            "--threads", str(args.threads), "--device", args.device]


# -------------------------------------------------------------------------- measure (in a child)
def measure_export(folder: Path, data: str, batch_size: int, latency_images: int, device: str) -> dict[str, Any]:
    """Accuracy, macro-F1, ECE, speed and provenance of one exported model on a labelled manifest."""
    counter = ReceiptCounter.from_pretrained(folder, device=device)
    records = load_records(data, counter.class_names)
    paths = [r.path for r in records]
    counter.predict(paths[:batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    predictions = counter.predict(paths, batch_size=batch_size)
    seconds = time.perf_counter() - start
    report = prediction_metrics(counter, [r.label for r in records], predictions)
    readable = [r.path for r, p in zip(records, predictions) if p.ok]
    model = counter.model
    return {**model.config.vision.encoder_record(), "device": str(counter.device),
            "visual_tokens": model.num_image_tokens(), "image_size": list(model.preprocessing.size),
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "test": {k: report[k] for k in ("num_samples", "accuracy", "macro_f1", "ece")},
            "num_failed": report["num_failed"], "infer_images_per_s": len(paths) / seconds,
            "latency_ms_p50": latency_ms(counter, readable[:latency_images]),
            "cuda_max_memory_allocated_mib": (torch.cuda.max_memory_allocated() / 2**20
                                              if counter.device.type == "cuda" else None)}


def latency_ms(counter: ReceiptCounter, paths: list[str]) -> float:
    """Median ms of a batch-1 `predict` on already-preprocessed tensors (model only, no decoding)."""
    tensors = [load_pixel_values(p, counter.model.preprocessing) for p in paths]
    counter.predict([tensors[0]], batch_size=1)  # warm-up
    return 1000 * statistics.median(seconds_per_call(lambda tensor: counter.predict([tensor], batch_size=1), tensors))


# ---------------------------------------------------------------------------------------- rows
def read_run(run_dir: Path) -> dict[str, Any]:
    """results.json and the per-stage trainable manifests of a finished training run."""
    stages = {}
    for path in sorted((run_dir / "stages").glob("*/trainable.json")):
        summary = json.loads(path.read_text())
        stages[path.parent.name] = {k: summary[k] for k in ("trainable_parameters", "total_parameters")}
    return {"results": json.loads((run_dir / "results.json").read_text()), "stages": stages}


def trained_images(config: Config, num_train: int) -> int:
    """Images the stages of `config` train on (each stage: epochs x the set, capped by max_steps)."""
    total = 0
    for stage in config.train.stages:
        images = stage.epochs * num_train
        if stage.max_steps is not None:
            per_step = config.data.batch_size * stage.grad_accum_steps
            images = min(images, stage.max_steps * per_step)
        total += images
    return total


def fallback_note(requested: str, *records: dict[str, Any]) -> str | None:
    """Why a run is not a result for `requested`: a record whose encoder differs, or that names a cause.

    Each record is a dict with "encoder" (and optionally "fallback_cause"), e.g. results.json or the
    exported model's resolved vision config. None when every record used the requested encoder.
    """
    for record in records:
        used = record.get("encoder")
        if used != requested or record.get("fallback_cause"):
            cause = record.get("fallback_cause") or "encoder differs from the config"
            return f"FALLBACK: ran {used!r}, config asked for {requested!r} ({cause})"
    return None


def make_row(plan: Plan, train: ChildResult, measure: ChildResult, num_train: int) -> dict[str, Any]:
    """One comparison row from a finished run and its measurement (both children exited 0)."""
    run = read_run(plan.run_dir)
    m = json.loads((plan.run_dir / "measure.json").read_text())
    images = trained_images(plan.config, num_train)
    return {"config": plan.name, "config_path": str(plan.config_path), "requested_encoder": plan.requested_encoder,
            "encoder": m["encoder"], "status": "ok",
            "fallback": fallback_note(plan.requested_encoder, run["results"], m),
            "test_accuracy": m["test"]["accuracy"], "test_macro_f1": m["test"]["macro_f1"], "test_ece": m["test"]["ece"],
            "test_samples": m["test"]["num_samples"], "train_run_test": run["results"].get("test"),
            "best_val_macro_f1": run["results"].get("best_val_macro_f1"),
            "trainable_parameters": max(s["trainable_parameters"] for s in run["stages"].values()),
            "trainable_per_stage": run["stages"], "total_parameters": m["total_parameters"],
            "visual_tokens": m["visual_tokens"], "image_size": m["image_size"], "train_images": images,
            "train_wall_s": train.wall_s, "train_images_per_s": images / train.wall_s,
            "infer_images_per_s": m["infer_images_per_s"], "latency_ms_p50": m["latency_ms_p50"],
            "train_peak_rss_mib": train.max_rss_mib, "infer_peak_rss_mib": measure.max_rss_mib,
            "cuda_infer_peak_mib": m["cuda_max_memory_allocated_mib"], "device": m["device"],
            "measure_wall_s": measure.wall_s}


def failed_row(plan: Plan, status: str) -> dict[str, Any]:
    return {"config": plan.name, "config_path": str(plan.config_path), "requested_encoder": plan.requested_encoder,
            "encoder": None, "status": status, "fallback": None}


# -------------------------------------------------------------------------------------- tables
HEADERS = ["config", "encoder used", "test acc", "macro-F1", "ECE", "trainable params", "total params",
           "visual tokens", "train img/s", "infer img/s", "latency ms (b1)", "train peak RSS MiB",
           "infer peak RSS MiB", "run wall s"]


MAX_CELL = 120  # characters of a fallback cause shown in the table; the warning and the JSON hold all


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def table_cells(row: dict[str, Any]) -> list[Any]:
    """A row's cells in HEADERS order; a fallback's encoder cell says so in bold, a failure fills the row."""
    if row["status"] != "ok":
        return [row["config"], f"**{row['status']}**"] + [None] * (len(HEADERS) - 2)
    encoder = f"**{_clip(row['fallback'], MAX_CELL)}**" if row["fallback"] else row["encoder"]
    return [row["config"], encoder, f"{row['test_accuracy']:.3f}", f"{row['test_macro_f1']:.3f}",
            f"{row['test_ece']:.3f}", _count(row["trainable_parameters"]), _count(row["total_parameters"]),
            row["visual_tokens"], f"{row['train_images_per_s']:.1f}", f"{row['infer_images_per_s']:.1f}",
            f"{row['latency_ms_p50']:.1f}", f"{row['train_peak_rss_mib']:.0f}", f"{row['infer_peak_rss_mib']:.0f}",
            f"{row['train_wall_s'] + row['measure_wall_s']:.0f}"]


def render(rows: list[dict[str, Any]]) -> str:
    """The Markdown table, then a loud warning for every fallback or failed row."""
    text = markdown_table(HEADERS, [table_cells(r) for r in rows])
    for row in rows:
        if row["fallback"]:
            text += (f"\n\n**WARNING: {row['config']} did not run its encoder. {' '.join(row['fallback'].split())}. "
                     f"Its numbers are {row['encoder']} numbers, not {row['requested_encoder']} ones.**")
        elif row["status"] != "ok":
            text += f"\n\n**WARNING: {row['config']}: {row['status']}.**"
    return text


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", choices=encoder_names(),
                        help="registry names, each run on config/compare/budget.yaml (default: every encoder)")
    parser.add_argument("--configs", nargs="+", type=Path, help="your own configs to compare instead of --encoders")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every config (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare" / time.strftime("%Y%m%d-%H%M%S"),
                        help="where runs and tables go (default: runs/compare/<date-time>)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every child")
    parser.add_argument("--batch-size", type=int, default=16, help="inference batch of the timed test pass")
    parser.add_argument("--latency-images", type=int, default=16, help="batch-1 calls for the latency median")
    parser.add_argument("--device", default="auto", help="inference device of the measure pass")
    parser.add_argument("--allow-differences", action="store_true",
                        help="run even if the configs differ outside model.vision (not a fair A/B)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child mode: an exported folder
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure_main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    result = measure_export(args.measure, args.data, args.batch_size, args.latency_images, args.device)
    args.json.write_text(json.dumps(result, indent=1))
    return 0


def compare_one(plan: Plan, args: argparse.Namespace, num_train: int) -> dict[str, Any]:
    """Train, then measure, one config; a failed step gives a failed row (logs named)."""
    if plan.requested_encoder not in encoder_names():
        return failed_row(plan, f"SKIPPED: encoder {plan.requested_encoder!r} is not registered")
    if (plan.run_dir / "checkpoints").exists():
        return failed_row(plan, f"SKIPPED: {plan.run_dir} holds an earlier run; pick another --out")
    train = run_child(train_command(plan), plan.run_dir / "train.log", args.threads)
    if train.returncode != 0:
        return failed_row(plan, f"FAILED: training exit {train.returncode}, see {plan.run_dir / 'train.log'}")
    measure = run_child(measure_command(plan, args), plan.run_dir / "measure.log", args.threads)
    if measure.returncode != 0:
        return failed_row(plan, f"FAILED: measuring exit {measure.returncode}, see {plan.run_dir / 'measure.log'}")
    return make_row(plan, train, measure, num_train)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    if args.measure:
        return measure_main(args)
    try:
        if args.configs:
            plans = make_plans(args.configs, args.overrides, args.out.resolve())
        else:
            plans = encoder_plans(args.encoders or encoder_names(), args.overrides, args.out.resolve())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    diffs = budget_differences(plans)
    if diffs and not args.allow_differences:
        print("the configs differ outside model.vision, so this would not be a fair A/B:\n  " + "\n  ".join(diffs),
              file=sys.stderr)
        return 2
    num_train = len(load_records(repo_path(plans[0].config.data.train), plans[0].config.model.class_names))
    report: dict[str, Any] = {"command": " ".join(["python scripts/compare_encoders.py", *(argv or sys.argv[1:])]),
                              "before": machine_info(args.threads), "differences": diffs, "rows": []}
    start = time.perf_counter()
    for plan in plans:
        print(f"[{plan.name}] training {plan.requested_encoder} ...", file=sys.stderr, flush=True)
        report["rows"].append(compare_one(plan, args, num_train))
    report.update(after=machine_info(args.threads), wall_s=time.perf_counter() - start)
    write_outputs(report, args.out)
    return 1 if any(r["fallback"] or r["status"] != "ok" for r in report["rows"]) else 0


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """OUT/compare.md (machine line + table + warnings) and OUT/compare.json; prints the Markdown."""
    before, after = report["before"], report["after"]
    text = (f"{before['processor']}, {before['cpu_count']} cores, torch {before['torch']}, {before['threads']} "
            f"thread(s) per child; load average {before['load_average'][0]} before, {after['load_average'][0]} "
            f"after; total wall time {report['wall_s'] / 60:.1f} min\n\n" + render(report["rows"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
