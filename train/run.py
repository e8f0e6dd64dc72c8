"""`accelerate launch -m train --config config/NAME.yaml [--set key=value ...] [--resume | --dry-run]`.

Sets up accelerate, builds the model (recording any encoder fallback), checks the run folder,
and hands over to `train.loop.Trainer`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from transformers.utils import logging as hf_logging

from config import Config, config_differences, load_config, save_config
from config.loader import ConfigError
from models.build import build_model
from models.calibration import check_uncertain_below
from models.internvl2 import InternVL2MultimodalModel
from train.checkpoints import (RESOLVED_CONFIG, UnsafeCheckpointError, latest_checkpoint, read_progress,
                               remove_stale_temporaries)
from train.data import build_datasets
from train.fingerprints import BaseCheckpointChanged, check_same_bases
from models.files import write_text_atomic
from train.loop import Trainer
from train.plan import dry_run, plan_report
from train.sharding import sharding_function
from train.tracking import TrackerError, check_report_to

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (may start with `base:`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.vision.encoder=swinv2 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what each stage trains and its estimated accelerator memory, then exit: the "
                             "model is built on the meta device from config.json files, no weights are loaded")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though the resolved config differs from the saved one")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.dry_run:
            return _dry_run(config)
        trackers = check_report_to(config.train.report_to)  # a missing package fails here, before any work
    except (ConfigError, TrackerError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    # Several processes on a machine without CUDA (`accelerate launch --multi_gpu` here): accelerate only
    # picks its gloo CPU backend when told the run is on CPU.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    run_dir = Path(config.output_dir)
    accelerator = Accelerator(cpu=multi_cpu, mixed_precision=config.train.mixed_precision,
                              step_scheduler_with_optimizer=False, log_with=trackers or None,
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(run_dir / "trackers")),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                        data_seed=config.seed))
    try:
        sharding_function(config.train, accelerator)  # refused here, before any work
        check_uncertain_below(config.inference.uncertain_below, "inference.uncertain_below")
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    _setup_logging(accelerator.is_main_process)
    set_seed(config.seed)
    model = build_model(config.model)
    config = dataclasses.replace(config, model=model.config)  # resolved: the encoder actually used
    last_logged = _last_logged_step(run_dir)  # before a resume truncates the killed run's rows
    checkpoint = _prepare_run_dir(accelerator, config, run_dir, args.resume, args.allow_config_change, model)
    datasets = build_datasets(config.data, model.class_names, model.preprocessing, config.seed)
    trainer = Trainer(config, accelerator, model, datasets, run_dir)
    progress = read_progress(checkpoint) if checkpoint else None
    try:
        result = trainer.run(checkpoint, progress, last_logged)
    except UnsafeCheckpointError as e:  # raised before anything of the checkpoint is loaded
        raise SystemExit(str(e)) from None
    if accelerator.is_main_process:
        print(json.dumps(result, indent=1))
    accelerator.end_training()
    return 0


def _dry_run(config: Config) -> int:
    """`--dry-run`: print the plan of every stage (`train.plan`); nothing is written."""
    try:
        plans = dry_run(config)
    except ValueError as e:  # an unknown group in a stage, shapes that do not fit
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(plan_report(plans, config))
    return 0


def _prepare_run_dir(accelerator: Accelerator, config: Config, run_dir: Path, resume: bool,
                     allow_change: bool, model: InternVL2MultimodalModel) -> Path | None:
    """Check the run folder against `--resume`; return the checkpoint to resume from, if any.

    A checkpoint leaves out the frozen tensors of the base folders, so a changed base is refused, with or without
    `allow_change`."""
    checkpoint = latest_checkpoint(run_dir)
    saved = run_dir / RESOLVED_CONFIG
    if resume and checkpoint is not None:
        _check_same_config(config, saved, allow_change)
        try:
            check_same_bases(checkpoint, model)
        except BaseCheckpointChanged as e:
            raise SystemExit(str(e)) from None
        progress = read_progress(checkpoint)
        if accelerator.is_main_process:
            _truncate(run_dir / "metrics.jsonl", progress.metric_lines)
            _truncate(run_dir / "steps.jsonl", progress.step_lines)
    elif checkpoint is not None:
        raise SystemExit(f"{run_dir} already holds checkpoints ({checkpoint.name}): pass --resume to continue, "
                         f"or set output_dir to a new folder")
    elif resume:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", run_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_stale_temporaries(run_dir)
        save_config(config, saved)
    return checkpoint


def _check_same_config(config: Config, saved_path: Path, allow_change: bool) -> None:
    saved = load_config(saved_path)
    diffs = [f"{key}: {v['saved']!r} -> {v['now']!r}"
             for key, v in config_differences({"saved": saved, "now": config}).items()]
    if diffs and not allow_change:
        raise SystemExit(f"refusing to resume into a different config ({saved_path}):\n  " + "\n  ".join(diffs)
                         + "\npass --allow-config-change to resume anyway")
    if diffs:
        logger.warning("resuming with a changed config: %s", "; ".join(diffs))


def _truncate(path: Path, keep: int) -> None:
    """Drop the lines written after the checkpoint by the run that was killed."""
    if path.exists():
        lines = path.read_text().splitlines()[:keep]
        write_text_atomic(path, "".join(line + "\n" for line in lines))


def _last_logged_step(run_dir: Path) -> int:
    """The highest global step in the run's step and epoch rows (-1 for none): what trackers already hold."""
    steps = [-1]
    for path in (run_dir / "steps.jsonl", run_dir / "metrics.jsonl"):
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                steps.append(json.loads(line)["global_step"])
            except json.JSONDecodeError:  # the last line, cut short by the kill: it is logged again
                continue
    return max(steps)


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    hf_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-file save/load lines drown the progress
