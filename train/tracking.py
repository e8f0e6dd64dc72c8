"""Experiment trackers (`train.report_to`) through accelerate's tracker API.

`check_report_to` runs before anything is built, so a missing tracker package is a one-line error
naming the extra to install. `RunTracker` then starts the trackers on the main process
(`accelerator.init_trackers`), logs the resolved config as hyperparameters, and sends each step row
and epoch row with the stage name in every key.

Resume continues the same tracker run:
    * TensorBoard writes into the same folder with `purge_step` = the checkpoint's step + 1, so the
      events the killed run wrote after its last checkpoint are hidden and logged again;
    * wandb, mlflow and trackio reopen the run recorded in RUN/trackers.json (its id / name); they
      cannot drop logged points, so steps the killed run already sent are not sent twice.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import uuid
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import LoggerType

from config.loader import to_dict
from config.schema import Config
from models.files import write_json

logger = logging.getLogger(__name__)

TRACKERS_FILE = "trackers.json"  # RUN/trackers.json: run ids, so a resume reopens the same tracker run
# tracker -> (module to import, this project's pip extra or None for a plain pip package)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio"), "aim": ("aim", None),
            "comet_ml": ("comet_ml", None), "clearml": ("clearml", None), "dvclive": ("dvclive", None),
            "swanlab": ("swanlab", None)}
PURGING = {"tensorboard"}  # trackers that can drop points logged after a checkpoint (purge_step)


class TrackerError(ValueError):
    """`train.report_to` names an unknown tracker or one whose package is not installed."""


def check_report_to(report_to: list[str]) -> list[str]:
    """The trackers to start ([] for `none`), each checked to be known and installed.

    Raises:
        TrackerError: one line naming the bad entry and what to install or choose instead.
    """
    names = [n for n in report_to if n != "none"]
    if "none" in report_to and names:
        raise TrackerError(f"train.report_to={report_to}: 'none' cannot be combined with trackers")
    known = sorted(set(LoggerType.list()) - {"all"})
    for name in names:
        if name not in PACKAGES:
            raise TrackerError(f"train.report_to: unknown tracker {name!r}; choose from none, {', '.join(known)}")
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            how = f"pip install -e .[{extra}]" if extra else f"pip install {module}"
            raise TrackerError(f"train.report_to: {name!r} needs the {module} package, which is not installed: {how}")
    return names


def flat_hyperparameters(config: Config) -> dict[str, bool | int | float | str]:
    """The resolved config as flat "a.b.c" -> scalar pairs (lists of scalars as JSON text, None as "null"),
    the form every tracker's hyperparameter table takes."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        elif isinstance(value, (list, type(None))):
            flat[key] = json.dumps(value)
        else:
            flat[key] = value

    walk(to_dict(config), "")
    return flat


class RunTracker:
    """The run's trackers; every method is a no-op when `train.report_to` is none.

    Args:
        accelerator: created with `log_with=check_report_to(...)` and `project_dir=RUN`.
        config: the resolved config (logged as hyperparameters).
        run_dir: the run folder; TensorBoard events go to RUN/trackers/<run name>/.
    """

    def __init__(self, accelerator: Accelerator, config: Config, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.config = config
        self.run_dir = run_dir
        self.names = check_report_to(config.train.report_to)
        self.resent_until = -1  # steps <= this were already sent by a killed run (non-purging trackers)

    def start(self, resume_step: int | None, last_logged_step: int) -> None:
        """Start (or, resuming from the checkpoint at `resume_step`, reopen) the tracker run.

        Args:
            resume_step: global step of the checkpoint resumed from; None for a fresh run.
            last_logged_step: the highest step the killed run had logged (from its jsonl files).
        """
        if not self.names:
            return
        ids = self._run_ids(resume_step is not None)
        kwargs = {"tensorboard": {"purge_step": resume_step + 1} if resume_step is not None else {},
                  "wandb": {"id": ids["wandb_id"], "resume": "allow", "name": ids["run_name"]},
                  "mlflow": {"run_id": ids.get("mlflow_run_id"), "run_name": ids["run_name"]},
                  "trackio": {"name": ids["run_name"], "resume": "allow"}}
        self.accelerator.init_trackers(ids["run_name"], config=flat_hyperparameters(self.config),
                                       init_kwargs={n: kwargs[n] for n in self.names if n in kwargs})
        self.resent_until = last_logged_step if resume_step is not None else -1
        if "mlflow" in self.names and self.accelerator.is_main_process:
            ids["mlflow_run_id"] = self.accelerator.get_tracker("mlflow").tracker.info.run_id
        self._save_ids(ids)
        logger.info("tracking with %s (run %s)", ", ".join(self.names), ids["run_name"])

    def _run_ids(self, resuming: bool) -> dict[str, Any]:
        path = self.run_dir / TRACKERS_FILE
        if resuming and path.is_file():
            return json.loads(path.read_text())
        return {"run_name": self.run_dir.resolve().name, "wandb_id": uuid.uuid4().hex[:12]}

    def _save_ids(self, ids: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            write_json(self.run_dir / TRACKERS_FILE, ids)

    def log(self, values: dict[str, float], step: int) -> None:
        """Send scalars at `step` (main process only, inside accelerate)."""
        if not self.names:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name in PURGING or step > self.resent_until:
                tracker.log(values, step=step)


def step_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A RUN/steps.jsonl row -> tracker scalars: STAGE/train/loss, STAGE/train/grad_norm, STAGE/lr/GROUP."""
    stage = row["stage"]
    values = {f"{stage}/train/loss": row["train_loss"]}
    if row.get("grad_norm") is not None:
        values[f"{stage}/train/grad_norm"] = row["grad_norm"]
    values.update({f"{stage}/lr/{group}": lr for group, lr in row["lr"].items()})
    return values


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A RUN/metrics.jsonl row -> STAGE/train/epoch_loss, STAGE/val/<metric>, STAGE/val/f1/<class>,
    STAGE/skipped_images."""
    stage = row["stage"]
    values = {f"{stage}/train/epoch_loss": row["train_loss"], f"{stage}/skipped_images": row["skipped_images"]}
    for key in ("loss", "accuracy", "macro_f1"):
        if f"val_{key}" in row:
            values[f"{stage}/val/{key}"] = row[f"val_{key}"]
    values.update({f"{stage}/val/f1/{name}": f1 for name, f1 in row.get("val_per_class_f1", {}).items()})
    return values
