"""The staged training loop: stages are data, trainability is checked, state is resumable.

One `Trainer` runs every stage of `train.stages`. At each stage start it injects LoRA if the stage
asks for it, applies the stage's trainable groups to the *unwrapped* model (so DDP never sees a
changed trainable set), builds the optimizer (carrying Adam state over for parameters that stay
trainable), and prepares everything with accelerate. A sharded model (accelerate's FSDP or DeepSpeed,
or `train.sharding: fsdp2`) is wrapped once instead: the LoRA of every stage is injected before the
wrap and a stage only changes `requires_grad` (`train.sharding` explains why); its exports are built from
gathered weights.

What a run writes besides checkpoints and exports:
    RUN/steps.jsonl       every `train.log_every_steps` optimizer steps (and at each epoch end): the
                          mean loss and gradient norm since the last row, the LR of every group;
    RUN/metrics.jsonl     per epoch: training loss, validation metrics, skipped images, encoder;
    RUN/results.json      at the end: best validation macro-F1 and the test metrics;
    RUN/test_predictions.jsonl, RUN/timing.json   what `train.report` needs for RUN/report.md.
The same rows go to the trackers of `train.report_to` (`train.tracking`). Losses and skipped counts
are running sums over all processes kept in `TrainingProgress`, so a resumed run logs the rows an
uninterrupted one would have.

Every export (RUN/best/, RUN/final/) carries a temperature fitted on the validation split's logits
(`models.calibration`), or T = 1 recorded as not fitted, with a warning, when the run has no validation split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_scheduler

from config.loader import save_config
from config.schema import Config, StageConfig
from data import make_dataloader
from models.calibration import Calibration, fit_calibration
from models.card import TrainingSummary, model_card
from models.internvl2 import EXPORT_DTYPES, InternVL2MultimodalModel
from models.measure import peak_memory_kind, peak_memory_since_reset_mib, reset_peak_memory, synchronize
from models.metrics import classification_report
from train.checkpoints import TrainingProgress, check_safe_to_load, save_checkpoint, save_model_subset
from train.fingerprints import base_fingerprints
from train.data import RunDatasets
from models.files import append_jsonl, write_json, write_jsonl
from train.lora import inject_planned, lora_groups, lora_plan, merge_lora, merged_copy
from train.report import write_report
from train.sharding import (SHARDED_STATE, accelerate_shards, full_state_dict, load_sharded_state,
                            save_sharded_state, sharding_function, unsharded_copy)
from train.tracking import RunTracker, epoch_scalars, step_scalars
from train.trainability import (TrainableParam, apply_stage, check_gradients, log_manifest, manifest,
                                resolve_groups)

logger = logging.getLogger(__name__)

SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup", "linear": "linear"}


@dataclass
class Evaluation:
    """One pass over a split: its metrics (`Trainer.evaluate`) and the gathered logits and labels."""

    metrics: dict[str, Any]
    logits: torch.Tensor  # (N, num_classes) float32, CPU
    labels: torch.Tensor  # (N,) int64, CPU


@dataclass
class StageRun:
    """What one stage trains with (the prepared objects)."""

    index: int
    config: StageConfig
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    trainable: list[TrainableParam]
    total_steps: int


class Trainer:
    """Runs all stages of `config.train.stages` on `model` with `accelerator`."""

    def __init__(self, config: Config, accelerator: Accelerator, model: InternVL2MultimodalModel,
                 datasets: RunDatasets, run_dir: Path) -> None:
        self.config = config
        self.accelerator = accelerator
        self.model = model  # the model itself (sharded in place under FSDP2; inside the wrapper otherwise)
        self.shard = sharding_function(config.train, accelerator)  # the trainer shards (train.sharding)
        self.wrap_once = self.shard is not None or accelerate_shards(accelerator)
        if self.wrap_once:  # a sharded LLM all-gathers in its forward: every process must run it at the same
            model.question_cache = None  # batches, which a per-process cache of questions would not guarantee
        self._prepared: torch.nn.Module | None = None  # the model as last prepared (sharded: the one wrap)
        self.datasets = datasets
        self.run_dir = run_dir
        self.progress = TrainingProgress()  # saved as progress.json beside accelerate's state, never pickled
        self.bases = base_fingerprints(model)  # what the left-out tensors of every checkpoint are rebuilt from
        save_model_subset(accelerator, self._checkpoint_tensors)
        self.tracker = RunTracker(accelerator, config, run_dir)
        self._previous_optimizer: torch.optim.Optimizer | None = None
        # this process's sums since the last flush into `progress`: loss x B, samples, grad norm, steps, skipped
        self._local = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
        self._clock = time.perf_counter()

    # ----------------------------------------------------------------------------------- stages
    def run(self, resume_from: Path | None = None, resume_progress: TrainingProgress | None = None,
            last_logged_step: int = -1) -> dict:
        """Train every stage (from `resume_from` when given), then evaluate on data.test and export.

        Args:
            resume_from: the checkpoint to continue from, None for a fresh run.
            resume_progress: its progress (read before the model was set up).
            last_logged_step: the highest step the interrupted run had logged, so trackers that cannot
                drop points are not sent a step twice.
        """
        start = resume_progress.stage if resume_progress else 0
        self.tracker.start(resume_progress.global_step if resume_progress else None, last_logged_step)
        if self.wrap_once:  # every structural change before the one wrap
            inject_planned(self.model, lora_plan(self.config.train.stages))
        if self.shard is not None:
            self._prepared = self.shard(self.model)
        for index, stage in enumerate(self.config.train.stages):
            if index < start:
                self._inject_lora(stage)  # replay structural changes of finished stages
                continue
            run = self._setup_stage(index, stage)
            if resume_from is not None and index == start:
                check_safe_to_load(resume_from)
                self.progress.load_state_dict(resume_progress.state_dict())  # first: the model's part follows it
                self.accelerator.load_state(str(resume_from))
                if self.shard is not None:
                    load_sharded_state(self.model, run.optimizer.optimizer, resume_from / SHARDED_STATE,
                                       self._checkpoint_names())
                logger.info("resumed from %s (stage %d, epoch %d, step %d)", resume_from,
                            self.progress.stage, self.progress.epoch, self.progress.global_step)
            self._clock = time.perf_counter()
            self._train_stage(run)
            self._log_stage_timing(run)
            self._previous_optimizer = run.optimizer.optimizer
            self.progress.stage, self.progress.epoch, self.progress.batches_done = index + 1, 0, 0
            self.progress.stage_step, self.progress.bad_epochs, self.progress.stage_stopped_early = 0, 0, False
        self.progress.finished = True
        return self._finish()

    def _inject_lora(self, stage: StageConfig) -> None:
        inject_planned(self.model, lora_plan([stage]))  # a no-op for groups already injected

    def _setup_stage(self, index: int, stage: StageConfig) -> StageRun:
        acc = self.accelerator
        acc.free_memory()  # forget the previous stage's prepared objects (the unwrapped model stays)
        self._inject_lora(stage)
        groups = {**self.model.parameter_groups(), **lora_groups(self.model)}
        depth = [f"vision.{g}" for g in self.model.vision.depth_groups]
        trainable = apply_stage(self.model, stage, groups, depth)
        self._save_manifest(index, stage, trainable)
        self.model.vision.set_grad_checkpointing(stage.gradient_checkpointing)
        optimizer = self._make_optimizer(stage, trainable)
        acc.gradient_accumulation_steps = stage.grad_accum_steps
        train_loader = make_dataloader(self.datasets.train, self.config.data.batch_size, shuffle=True,
                                       num_workers=self.config.data.num_workers, seed=self.config.seed)
        val_loader = self._eval_loader(self.datasets.val)
        model, optimizer, train_loader, trainable = self._prepare(optimizer, train_loader, trainable)
        val_loader = acc.prepare(val_loader) if val_loader is not None else None
        total = self._total_steps(stage, len(train_loader))
        scheduler = acc.prepare(get_scheduler(SCHEDULES[stage.schedule], optimizer.optimizer,
                                              num_warmup_steps=stage.warmup_steps, num_training_steps=total))
        return StageRun(index, stage, model, optimizer, scheduler, train_loader, val_loader, trainable, total)

    def _prepare(self, optimizer: torch.optim.Optimizer, train_loader: Any, trainable: list[TrainableParam]
                 ) -> tuple[torch.nn.Module, Any, Any, list[TrainableParam]]:
        """The model, optimizer and loader as the stage trains with them; `trainable` bound to the model's
        parameters as they are after the wrap.

        Unsharded, accelerate wraps the model afresh each stage (a DDP wrapper is separate from the model).
        Sharded by accelerate, FSDP wraps at the first stage and gets that wrapped model back later, which it
        does not wrap again (it only re-points the new optimizer at the sharded parameters). Sharded by the
        trainer, accelerate sees only the loader: its optimizer wrapper is used for gradient accumulation but
        not registered, because `save_state` would pickle the optimizer's DTensor state from the main process
        alone (the trainer saves it sharded instead).
        """
        acc = self.accelerator
        if self.shard is not None:
            return self.model, AcceleratedOptimizer(optimizer, device_placement=False), acc.prepare(train_loader), \
                trainable
        reuse = self._prepared is not None and acc.distributed_type == DistributedType.FSDP
        model, optimizer, train_loader = acc.prepare(self._prepared if reuse else self.model, optimizer, train_loader)
        self._prepared = model
        if self.wrap_once:  # wrapping replaced the parameters (DTensors, FSDP1's views): use the new ones
            params = {name.replace("_fsdp_wrapped_module.", ""): p for name, p in self.model.named_parameters()}
            trainable = [dataclasses.replace(t, param=params[t.name.replace("_fsdp_wrapped_module.", "")])
                         for t in trainable]
        return model, optimizer, train_loader, trainable

    def _total_steps(self, stage: StageConfig, batches_per_epoch: int) -> int:
        per_epoch = math.ceil(batches_per_epoch / stage.grad_accum_steps)
        return min(stage.max_steps, per_epoch * stage.epochs) if stage.max_steps else per_epoch * stage.epochs

    def _make_optimizer(self, stage: StageConfig, trainable: list[TrainableParam]) -> torch.optim.AdamW:
        """AdamW over one parameter group per (trainable group, LR scale, decay), each named after its
        trainable group (with its scale when layer decay gives the group several); Adam state carried
        over from the last stage."""
        buckets: dict[tuple[str, float, bool], list[torch.nn.Parameter]] = {}
        for t in trainable:
            buckets.setdefault((t.group, t.lr_scale, t.decay), []).append(t.param)
        scales: dict[str, set[float]] = {}
        for group, scale, _ in buckets:
            scales.setdefault(group, set()).add(scale)
        param_groups = [{"params": params, "lr": stage.lr * scale, "weight_decay": stage.weight_decay if decay else 0.0,
                         "name": group if len(scales[group]) == 1 else f"{group}@x{scale:.4g}"}
                        for (group, scale, decay), params in buckets.items()]
        optimizer = torch.optim.AdamW(param_groups, lr=stage.lr)
        if self._previous_optimizer is not None:
            kept = 0
            for t in trainable:
                if t.param in self._previous_optimizer.state:
                    optimizer.state[t.param] = self._previous_optimizer.state[t.param]
                    kept += 1
            logger.info("stage %r: Adam state carried over for %d of %d trainable tensors", stage.name, kept,
                        len(trainable))
        return optimizer

    def _checkpoint_tensors(self) -> set[int]:
        """The model tensors (ids) a checkpoint holds: all but the base checkpoints' parameters that no stage so
        far has trained, which `--resume` rebuilds from the same folders (`train.fingerprints` checks that).
        So a stage-2 checkpoint also holds what stage 1 trained and stage 2 froze, and every tensor that came
        from no folder (fusion, head, LoRA adapters, a projector or encoder initialised at random)."""
        adapters = lora_groups(self.model)
        groups = {**self.model.parameter_groups(), **adapters}
        trained: set[int] = set()
        for stage in self.config.train.stages[: self.progress.stage + 1]:
            trained.update(resolve_groups(stage, groups))
        lora = {id(p) for modules in adapters.values() for m in modules for p in m.parameters()}
        base = {id(p) for b in self.model.base_checkpoints() for m in b.modules for p in m.parameters()} - lora
        return {id(t) for t in self.model.state_dict(keep_vars=True).values() if id(t) not in base or id(t) in trained}

    def _checkpoint_names(self) -> set[str]:
        """`_checkpoint_tensors` by name (the model sharded in place by the trainer keeps its names)."""
        keep = self._checkpoint_tensors()
        return {name for name, tensor in self.model.state_dict(keep_vars=True).items() if id(tensor) in keep}

    def _save_manifest(self, index: int, stage: StageConfig, trainable: list[TrainableParam]) -> None:
        summary = manifest(trainable, self.model)
        if self.accelerator.is_main_process:
            log_manifest(stage, summary)
            path = self.run_dir / "stages" / f"{index}-{stage.name}" / "trainable.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, summary)

    # ----------------------------------------------------------------------------------- epochs
    def _train_stage(self, run: StageRun) -> None:
        stage, p = run.config, self.progress
        while p.epoch < stage.epochs and not p.stage_stopped_early and not self._hit_max_steps(run):
            reset_peak_memory(self.accelerator.device)
            self._train_epoch(run)
            self._record_peak_memory(run)  # of the training steps: validation and checkpoints come after
            self._flush(run)
            if p.window_steps:  # the epoch's last, partial window: rows never span two epochs
                self._log_step(run)
            train_loss = p.epoch_loss_sum / max(p.epoch_samples, 1.0)
            metrics = self._end_epoch(run, train_loss)
            p.epoch, p.batches_done, p.epoch_loss_sum, p.epoch_samples = p.epoch + 1, 0, 0.0, 0.0
            self._log_metrics(metrics)
            self._save_checkpoint(run)

    def _hit_max_steps(self, run: StageRun) -> bool:
        return run.config.max_steps is not None and self.progress.stage_step >= run.config.max_steps

    def _train_epoch(self, run: StageRun) -> None:
        """One pass over the training data (from `progress.batches_done` on); sums go to `self._local`."""
        acc, p = self.accelerator, self.progress
        self.datasets.train.set_epoch(p.epoch)
        run.train_loader.set_epoch(p.epoch)
        loader = acc.skip_first_batches(run.train_loader, p.batches_done) if p.batches_done else run.train_loader
        run.model.train()
        bar = tqdm(loader, desc=f"{run.config.name} epoch {p.epoch + 1}/{run.config.epochs}",
                   disable=not acc.is_local_main_process, initial=p.batches_done, total=len(run.train_loader))
        step_start = time.perf_counter()
        for batch in bar:
            self._train_step(run, batch)
            p.batches_done += 1
            if acc.sync_gradients:
                synchronize(acc.device)
                self._time_step(run, time.perf_counter() - step_start)
                p.stage_step, p.global_step = p.stage_step + 1, p.global_step + 1
                last = p.batches_done == len(run.train_loader) or self._hit_max_steps(run)
                if p.global_step % self.config.train.log_every_steps == 0:
                    self._flush(run)
                    self._log_step(run)
                    bar.set_postfix(loss=f"{p.epoch_loss_sum / max(p.epoch_samples, 1.0):.4f}")
                if not last:  # the epoch's end saves a checkpoint anyway
                    self._maybe_save_periodic(run)
                if self._hit_max_steps(run):
                    break
                step_start = time.perf_counter()

    def _train_step(self, run: StageRun, batch: dict) -> None:
        """One micro-batch: forward, backward, (at accumulation boundaries) clip, step; adds to `self._local`."""
        acc = self.accelerator
        with acc.accumulate(run.model):
            size = batch["labels"].shape[0]
            # Every image of the batch was bad: one blank image with its loss times zero, so this process runs
            # the same forward and backward as the others (DDP's all-reduce, FSDP's all-gathers stay in step).
            inputs = batch if size else self._blank_batch()
            ids, mask = self.model.tokenize(inputs["questions"], acc.device)
            loss = run.model(inputs["pixel_values"], ids, mask, labels=inputs["labels"]).loss
            loss = loss if size else loss * 0.0
            acc.backward(loss)
            if self.progress.stage_step == 0 and self.progress.batches_done == 0 and size > 0:
                check_gradients(run.trainable, {id(q) for g in run.optimizer.param_groups for q in g["params"]})
            grad_norm = None
            if acc.sync_gradients:  # max_grad_norm None: an infinite bound measures the norm without clipping
                grad_norm = acc.clip_grad_norm_([t.param for t in run.trainable], run.config.max_grad_norm or math.inf)
                if isinstance(grad_norm, DTensor):  # FSDP2: the norm over all shards, the same on every process
                    grad_norm = grad_norm.full_tensor()
            run.optimizer.step()
            if acc.sync_gradients and not acc.optimizer_step_was_skipped:  # the schedule counts optimizer steps
                run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        self._local[0] += loss.detach().double() * size
        self._local[1] += size
        self._local[4] += batch["num_skipped"]
        if grad_norm is not None:
            self._local[2] += grad_norm.detach().double()
            self._local[3] += 1

    def _blank_batch(self) -> dict[str, Any]:
        """One image of zeros (the normalisation mean) at the model's input size, default question, class 0."""
        height, width = self.model.preprocessing.size
        return {"pixel_values": torch.zeros(1, 3, height, width, device=self.accelerator.device),
                "questions": [None], "labels": torch.zeros(1, dtype=torch.long, device=self.accelerator.device)}

    def _flush(self, run: StageRun) -> None:
        """Add every process's sums since the last flush into `progress` (a collective: all processes call it
        at the same steps), and this stretch's wall time into the stage's."""
        local, self._local = self._local, torch.zeros_like(self._local)
        total = self.accelerator.reduce(local.clone(), reduction="sum").tolist()
        p = self.progress
        p.epoch_loss_sum += total[0]
        p.epoch_samples += total[1]
        p.window_loss_sum += total[0]
        p.window_samples += total[1]
        p.window_grad_norm_sum += local[2].item()  # the global norm: the same on every process
        p.window_steps += int(local[3].item())
        p.skipped_images += int(total[4])
        now, key = time.perf_counter(), str(run.index)
        p.stage_seconds[key] = p.stage_seconds.get(key, 0.0) + now - self._clock
        self._clock = now

    def _log_step(self, run: StageRun) -> None:
        """Write the window's row to RUN/steps.jsonl and the trackers, and start a new window."""
        p = self.progress
        lrs = {g["name"]: lr for g, lr in zip(run.optimizer.param_groups, run.scheduler.get_last_lr())}
        row = {"stage": run.config.name, "stage_index": run.index, "epoch": p.epoch + 1, "global_step": p.global_step,
               "train_loss": p.window_loss_sum / max(p.window_samples, 1.0),
               "grad_norm": p.window_grad_norm_sum / p.window_steps if p.window_steps else None, "lr": lrs}
        p.window_loss_sum, p.window_samples, p.window_grad_norm_sum, p.window_steps = 0.0, 0.0, 0.0, 0
        p.step_lines += 1
        if self.accelerator.is_main_process:
            append_jsonl(self.run_dir / "steps.jsonl", row)
            self.tracker.log(step_scalars(row), p.global_step)

    def _maybe_save_periodic(self, run: StageRun) -> None:
        every = self.config.train.save_every_steps
        if every and self.progress.global_step % every == 0:
            self._flush(run)
            self._save_checkpoint(run)

    def _save_checkpoint(self, run: StageRun) -> None:
        save_more = None
        if self.shard is not None:  # accelerate does not hold the model: its shards and the optimizer's go beside
            def save_more(folder: Path) -> None:
                save_sharded_state(self.model, run.optimizer.optimizer, folder / SHARDED_STATE,
                                   self._checkpoint_names())
        save_checkpoint(self.accelerator, self.run_dir, self.progress, self.config.train.keep_last_checkpoints,
                        self.bases, save_more)
        if self.accelerator.is_main_process:
            write_json(self.run_dir / "timing.json", self._timing())

    def _time_step(self, run: StageRun, seconds: float) -> None:
        """Add one optimizer step's wall time: the stage's first apart (warm-up), the later ones summed."""
        first, later, count = self.progress.stage_step_seconds.setdefault(str(run.index), [0.0, 0.0, 0])
        if self.progress.stage_step == 0:
            first = seconds
        else:
            later, count = later + seconds, count + 1
        self.progress.stage_step_seconds[str(run.index)] = [first, later, count]

    def _record_peak_memory(self, run: StageRun) -> None:
        """The peak memory of this process during the epoch's training steps; the stage keeps the highest."""
        peak = peak_memory_since_reset_mib(self.accelerator.device)
        if peak is not None:
            key = str(run.index)
            self.progress.stage_peak_mib[key] = max(peak, self.progress.stage_peak_mib.get(key, 0.0))

    def _log_stage_timing(self, run: StageRun) -> None:
        key = str(run.index)
        first, later, count = self.progress.stage_step_seconds.get(key, [0.0, 0.0, 0])
        peak = self.progress.stage_peak_mib.get(key)
        logger.info("stage %r: %s s/step over %d steps after the first (%.2f s); peak memory while training %s (%s)",
                    run.config.name, f"{later / count:.2f}" if count else "-", count, first,
                    "-" if peak is None else f"{peak:.0f} MiB", peak_memory_kind(self.accelerator.device))

    def _timing(self) -> dict[str, Any]:
        """Per stage: training wall time (its evaluations and exports included), summed over resumes;
        seconds per optimizer step (the first, warm-up, step apart); peak memory while training."""
        stages, p = self.config.train.stages, self.progress
        rows = []
        for k, seconds in sorted(p.stage_seconds.items(), key=lambda kv: int(kv[0])):
            first, later, count = p.stage_step_seconds.get(k, [None, 0.0, 0])
            rows.append({"stage": stages[int(k)].name, "index": int(k), "seconds": round(seconds, 3),
                         "first_step_seconds": None if first is None else round(first, 3),
                         "seconds_per_step": round(later / count, 3) if count else None, "timed_steps": count,
                         "peak_memory_mib": None if k not in p.stage_peak_mib else round(p.stage_peak_mib[k], 1),
                         "peak_memory": peak_memory_kind(self.accelerator.device),
                         "batch_size": self.config.data.batch_size})
        return {"stages": rows}

    def _end_epoch(self, run: StageRun, train_loss: float) -> dict[str, Any]:
        p = self.progress
        metrics: dict[str, Any] = {"stage": run.config.name, "stage_index": run.index, "epoch": p.epoch + 1,
                                   "global_step": p.global_step, "train_loss": train_loss,
                                   "lr": run.scheduler.get_last_lr()[0], **self._encoder_record(),
                                   "skipped_images": p.skipped_images, "world_size": self.accelerator.num_processes}
        if run.val_loader is None:
            return metrics
        val = self.evaluate(run.model, run.val_loader)
        metrics.update({f"val_{k}": v for k, v in val.metrics.items()})
        self._track_best(val, run.config)
        p.history.append({k: metrics[k] for k in ("stage", "epoch", "global_step", "val_macro_f1", "val_accuracy")})
        return metrics

    def _track_best(self, val: Evaluation, stage: StageConfig) -> None:
        p, score = self.progress, val.metrics["macro_f1"]
        if p.best_metric is None or score > p.best_metric:
            p.best_metric, p.best_step, p.bad_epochs = score, p.global_step, 0
            self.export("best", {"split": "validation", "source": self.config.data.val, **val.metrics},
                        self._calibration("best", val))
            return
        p.bad_epochs += 1
        patience = self.config.train.early_stopping_patience
        if patience is not None and p.bad_epochs >= patience:
            logger.info("stage %r: no macro-F1 gain for %d epochs, stopping the stage early", stage.name, patience)
            p.stage_stopped_early = True

    # ------------------------------------------------------------------------- evaluation, export
    def _eval_loader(self, dataset) -> Any:
        if dataset is None:
            return None
        return make_dataloader(dataset, self.config.data.eval_batch_size, shuffle=False,
                               num_workers=self.config.data.num_workers)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, rows: list[dict] | None = None) -> Evaluation:
        """Loss, accuracy, macro-F1, per-class F1 and the confusion matrix (rows true, columns predicted)
        over a (sharded) loader, with the logits and labels, gathered once per sample.

        Args:
            rows: when given, one {"image", "label", "probabilities"} dict per sample is appended to it.
        """
        acc = self.accelerator
        model.eval()
        losses, logits, labels = [], [], []
        for batch in loader:
            if batch["labels"].shape[0] == 0:
                continue
            ids, mask = self.model.tokenize(batch["questions"], acc.device)
            scores = model(batch["pixel_values"], ids, mask).logits.float()
            loss = torch.nn.functional.cross_entropy(scores, batch["labels"], reduction="none")
            g_loss, g_logits, g_label = acc.gather_for_metrics((loss, scores, batch["labels"]))
            losses.append(g_loss.cpu())
            logits.append(g_logits.cpu())
            labels.append(g_label.cpu())
            if rows is not None:
                paths = acc.gather_for_metrics(batch["paths"], use_gather_object=True)
                rows.extend({"image": path, "label": int(label), "probabilities": prob}
                            for path, label, prob in zip(paths, g_label.tolist(), g_logits.softmax(-1).tolist()))
        model.train()
        if not labels:
            raise RuntimeError("evaluation saw no usable image")
        names, all_logits, all_labels = self.model.class_names, torch.cat(logits), torch.cat(labels)
        report = classification_report(all_labels, all_logits.softmax(-1), names)
        metrics = {"samples": report["num_samples"], "loss": torch.cat(losses).mean().item(),
                   "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                   "per_class_f1": {name: report["per_class"][name]["f1"] for name in names},
                   "confusion_matrix": report["confusion_matrix"]["counts"]}
        return Evaluation(metrics, all_logits, all_labels)

    def _calibration(self, name: str, val: Evaluation | None) -> Calibration:
        """The temperature export `name` records: fitted on the validation logits, or T = 1 (loudly) without them.

        Every process fits the same T from the same gathered logits (the fit is deterministic)."""
        if val is None:
            logger.warning("export %r: NO TEMPERATURE FITTED (the run has no validation split, data.val): "
                           "probabilities are the uncalibrated softmax (T = 1, recorded as not fitted); fit one "
                           "with scripts/calibrate.py --checkpoint %s --data MANIFEST", name, self.run_dir / name)
            return Calibration()
        calibration = fit_calibration(val.logits, val.labels, fitted_on=str(self.config.data.val))
        logger.info("export %r: temperature %.4f fitted on %d validation images: ECE %.4f -> %.4f, NLL %.4f -> %.4f",
                    name, calibration.temperature, calibration.num_samples, calibration.ece_before,
                    calibration.ece_after, calibration.nll_before, calibration.nll_after)
        return calibration

    def _encoder_record(self) -> dict[str, Any]:
        return self.model.config.vision.encoder_record()

    def export(self, name: str, evaluation: dict[str, Any] | None = None,
               calibration: Calibration | None = None) -> Path | None:
        """Write the self-describing model folder RUN/name/ (LoRA merged) with `calibration` and the run's
        `inference` settings in its config.json, the run's resolved config, and a model card (README.md) with
        how it was trained, `evaluation` (metrics plus "split" and "source") and the calibration.

        Sharded, every process takes part in gathering the full weights and the main process builds the
        export from them; unsharded, the main process copies the model it holds whole."""
        self.accelerator.wait_for_everyone()
        state = full_state_dict(self.accelerator, self._prepared) if self.wrap_once else None
        target = None
        if self.accelerator.is_main_process:
            if state is None:  # shares every tensor the LoRA merge leaves alone with the training model
                exported = merged_copy(self.model)
            else:
                injected = {g: s for g, s in lora_plan(self.config.train.stages).items() if g in lora_groups(self.model)}
                exported = unsharded_copy(self.model, state, injected)
                merge_lora(exported.language)
                merge_lora(exported.vision)
            summary = TrainingSummary(self.config, self._data_sizes(), self.progress.global_step,
                                      dict(Counter(r.data_source for r in self.datasets.train.records)))
            calibration = calibration or Calibration()
            card = model_card(exported, summary, evaluation, calibration, self.config.inference)
            target = exported.eval().save_pretrained(self.run_dir / name, card=card,
                                                     dtype=EXPORT_DTYPES[self.config.train.export_dtype],
                                                     inference=self.config.inference, calibration=calibration)
            save_config(self.config, target / "run_config.yaml")
        self.accelerator.wait_for_everyone()
        return target

    def _data_sizes(self) -> dict[str, int]:
        splits = {"train": self.datasets.train, "validation": self.datasets.val, "test": self.datasets.test}
        return {split: len(d) for split, d in splits.items() if d is not None}

    def _log_metrics(self, metrics: dict[str, Any]) -> None:
        self.progress.metric_lines += 1
        if not self.accelerator.is_main_process:
            return
        logger.info("epoch done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
                                       if not isinstance(v, (dict, list))})
        append_jsonl(self.run_dir / "metrics.jsonl", metrics)
        self.tracker.log(epoch_scalars(metrics), metrics["global_step"])

    def _finish(self) -> dict[str, Any]:
        """Evaluate on data.test, export final/ (its card holding the test metrics, its temperature fitted on
        the final model's validation logits), write results and report."""
        result: dict[str, Any] = {**self._encoder_record(), "best_val_macro_f1": self.progress.best_metric,
                                  "best_step": self.progress.best_step, "global_step": self.progress.global_step,
                                  "world_size": self.accelerator.num_processes}
        rows: list[dict] = []
        evaluation = None
        model = self._prepared if self.wrap_once else self.model
        if self.datasets.test is not None:
            loader = self.accelerator.prepare(self._eval_loader(self.datasets.test))
            result["test"] = self.evaluate(model, loader, rows).metrics
            evaluation = {"split": "test", "source": self.config.data.test, **result["test"]}
            self.tracker.log({f"test/{k}": result["test"][k] for k in ("loss", "accuracy", "macro_f1")},
                             self.progress.global_step)
        val = None
        if self.datasets.val is not None:
            val = self.evaluate(model, self.accelerator.prepare(self._eval_loader(self.datasets.val)))
        self.export("final", evaluation, self._calibration("final", val))
        if self.accelerator.is_main_process:
            write_jsonl(self.run_dir / "test_predictions.jsonl", self._with_sources(rows))
            write_json(self.run_dir / "results.json", result)
            write_json(self.run_dir / "timing.json", self._timing())
            write_report(self.run_dir)
        return result

    def _with_sources(self, rows: list[dict]) -> list[dict]:
        """Test rows with the manifest's `source` column (None without one), for per-source metrics."""
        sources = {r.path: r.data_source for r in self.datasets.test.records} if self.datasets.test else {}
        return [{**row, "source": sources.get(row["image"])} for row in rows]
