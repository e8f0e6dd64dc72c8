"""The staged training loop: stages are data, trainability is checked, state is resumable.

One `Trainer` runs every stage of `train.stages`. At each stage start it injects LoRA if the stage
asks for it, applies the stage's trainable groups to the *unwrapped* model (so DDP never sees a
changed trainable set), builds the optimizer (carrying Adam state over for parameters that stay
trainable), and prepares everything with accelerate.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from config.loader import save_config
from config.schema import Config, StageConfig
from data import make_dataloader
from models.internvl2 import InternVL2MultimodalModel
from models.metrics import accuracy, confusion_matrix, macro_f1, per_class_scores
from train.checkpoints import TrainingProgress, save_checkpoint
from train.data import RunDatasets
from train.lora import LORA_GROUPS, inject_lora, lora_groups, merge_lora
from train.trainability import TrainableParam, apply_stage, check_gradients, log_manifest, manifest

logger = logging.getLogger(__name__)

SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup", "linear": "linear"}


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
        self.model = model  # always the unwrapped model
        self.datasets = datasets
        self.run_dir = run_dir
        self.progress = TrainingProgress()
        accelerator.register_for_checkpointing(self.progress)
        self._previous_optimizer: torch.optim.Optimizer | None = None
        self._skipped_images = 0

    # ----------------------------------------------------------------------------------- stages
    def run(self, resume_from: Path | None = None, resume_progress: TrainingProgress | None = None) -> dict:
        """Train every stage (from `resume_from` when given), then evaluate on data.test and export."""
        start = resume_progress.stage if resume_progress else 0
        for index, stage in enumerate(self.config.train.stages):
            if index < start:
                self._inject_lora(stage)  # replay structural changes of finished stages
                continue
            run = self._setup_stage(index, stage)
            if resume_from is not None and index == start:
                self.accelerator.load_state(str(resume_from))
                logger.info("resumed from %s (stage %d, epoch %d, step %d)", resume_from,
                            self.progress.stage, self.progress.epoch, self.progress.global_step)
            self._train_stage(run)
            self._previous_optimizer = run.optimizer.optimizer
            self.progress.stage, self.progress.epoch, self.progress.batches_done = index + 1, 0, 0
            self.progress.stage_step, self.progress.bad_epochs, self.progress.stage_stopped_early = 0, 0, False
        self.progress.finished = True
        return self._finish()

    def _inject_lora(self, stage: StageConfig) -> None:
        for group in LORA_GROUPS:
            if group in stage.trainable:
                inject_lora(self.model, group, stage.lora_rank, stage.lora_alpha, stage.lora_dropout)

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
        model, optimizer, train_loader = acc.prepare(self.model, optimizer, train_loader)
        val_loader = acc.prepare(val_loader) if val_loader is not None else None
        total = self._total_steps(stage, len(train_loader))
        scheduler = acc.prepare(get_scheduler(SCHEDULES[stage.schedule], optimizer.optimizer,
                                              num_warmup_steps=stage.warmup_steps, num_training_steps=total))
        return StageRun(index, stage, model, optimizer, scheduler, train_loader, val_loader, trainable, total)

    def _total_steps(self, stage: StageConfig, batches_per_epoch: int) -> int:
        per_epoch = math.ceil(batches_per_epoch / stage.grad_accum_steps)
        return min(stage.max_steps, per_epoch * stage.epochs) if stage.max_steps else per_epoch * stage.epochs

    def _make_optimizer(self, stage: StageConfig, trainable: list[TrainableParam]) -> torch.optim.AdamW:
        """AdamW over parameter groups of equal (LR scale, decay); Adam state carried from the last stage."""
        buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
        for t in trainable:
            buckets.setdefault((t.lr_scale, t.decay), []).append(t.param)
        param_groups = [{"params": params, "lr": stage.lr * scale, "weight_decay": stage.weight_decay if decay else 0.0}
                        for (scale, decay), params in buckets.items()]
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

    def _save_manifest(self, index: int, stage: StageConfig, trainable: list[TrainableParam]) -> None:
        summary = manifest(trainable, self.model)
        if self.accelerator.is_main_process:
            log_manifest(stage, summary)
            path = self.run_dir / "stages" / f"{index}-{stage.name}" / "trainable.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=1))

    # ----------------------------------------------------------------------------------- epochs
    def _train_stage(self, run: StageRun) -> None:
        stage, p = run.config, self.progress
        while p.epoch < stage.epochs and not p.stage_stopped_early and not self._hit_max_steps(run):
            train_loss = self._train_epoch(run)
            metrics = self._end_epoch(run, train_loss)
            p.epoch, p.batches_done = p.epoch + 1, 0
            self._log_metrics(metrics)
            save_checkpoint(self.accelerator, self.run_dir, p, self.config.train.keep_last_checkpoints)

    def _hit_max_steps(self, run: StageRun) -> bool:
        return run.config.max_steps is not None and self.progress.stage_step >= run.config.max_steps

    def _train_epoch(self, run: StageRun) -> float:
        acc, p = self.accelerator, self.progress
        self.datasets.train.set_epoch(p.epoch)
        run.train_loader.set_epoch(p.epoch)
        loader = acc.skip_first_batches(run.train_loader, p.batches_done) if p.batches_done else run.train_loader
        run.model.train()
        loss_sum = torch.zeros(2, device=acc.device)  # (sum of loss x batch size, samples)
        bar = tqdm(loader, desc=f"{run.config.name} epoch {p.epoch + 1}/{run.config.epochs}",
                   disable=not acc.is_local_main_process, initial=p.batches_done, total=len(run.train_loader))
        for batch in bar:
            loss_sum += self._train_step(run, batch)
            p.batches_done += 1
            if acc.sync_gradients:
                p.stage_step, p.global_step = p.stage_step + 1, p.global_step + 1
                bar.set_postfix(loss=f"{loss_sum[0].item() / max(loss_sum[1].item(), 1):.4f}")
                self._maybe_save_periodic()
                if self._hit_max_steps(run):
                    break
        totals = acc.reduce(loss_sum, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1)).item()

    def _train_step(self, run: StageRun, batch: dict) -> torch.Tensor:
        """One micro-batch: forward, backward, (at accumulation boundaries) clip, step. Returns (loss x B, B)."""
        acc = self.accelerator
        self._skipped_images += batch["num_skipped"]
        with acc.accumulate(run.model):
            size = batch["labels"].shape[0]
            if size == 0:  # every image of this batch was bad: a zero loss keeps DDP's collectives in step
                loss = sum(t.param.sum() * 0.0 for t in run.trainable)
            else:
                ids, mask = self.model.tokenize(batch["questions"], acc.device)
                loss = run.model(batch["pixel_values"], ids, mask, labels=batch["labels"]).loss
            acc.backward(loss)
            if self.progress.stage_step == 0 and self.progress.batches_done == 0 and size > 0:
                check_gradients(run.trainable, {id(q) for g in run.optimizer.param_groups for q in g["params"]})
            if acc.sync_gradients and run.config.max_grad_norm is not None:
                acc.clip_grad_norm_([t.param for t in run.trainable], run.config.max_grad_norm)
            run.optimizer.step()
            if acc.sync_gradients and not acc.optimizer_step_was_skipped:  # the schedule counts optimizer steps
                run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss.detach() * size, torch.tensor(float(size), device=acc.device)])

    def _maybe_save_periodic(self) -> None:
        every = self.config.train.save_every_steps
        if every and self.progress.global_step % every == 0:
            save_checkpoint(self.accelerator, self.run_dir, self.progress, self.config.train.keep_last_checkpoints)

    def _end_epoch(self, run: StageRun, train_loss: float) -> dict[str, Any]:
        p = self.progress
        metrics: dict[str, Any] = {"stage": run.config.name, "stage_index": run.index, "epoch": p.epoch + 1,
                                   "global_step": p.global_step, "train_loss": train_loss,
                                   "lr": run.scheduler.get_last_lr()[0], **self._encoder_record(),
                                   "skipped_images": self._count_skipped()}
        if run.val_loader is None:
            return metrics
        val = self.evaluate(run.model, run.val_loader)
        metrics.update({f"val_{k}": v for k, v in val.items()})
        self._track_best(val["macro_f1"], run.config)
        p.history.append({k: metrics[k] for k in ("stage", "epoch", "global_step", "val_macro_f1", "val_accuracy")})
        return metrics

    def _track_best(self, score: float, stage: StageConfig) -> None:
        p = self.progress
        if p.best_metric is None or score > p.best_metric:
            p.best_metric, p.best_step, p.bad_epochs = score, p.global_step, 0
            self.export("best")
            return
        p.bad_epochs += 1
        patience = self.config.train.early_stopping_patience
        if patience is not None and p.bad_epochs >= patience:
            logger.info("stage %r: no macro-F1 gain for %d epochs, stopping the stage early", stage.name, patience)
            p.stage_stopped_early = True

    def _count_skipped(self) -> int:
        local = torch.tensor(self._skipped_images, device=self.accelerator.device)
        return int(self.accelerator.reduce(local, reduction="sum").item())

    # ------------------------------------------------------------------------- evaluation, export
    def _eval_loader(self, dataset) -> Any:
        if dataset is None:
            return None
        return make_dataloader(dataset, self.config.data.eval_batch_size, shuffle=False,
                               num_workers=self.config.data.num_workers)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any) -> dict[str, Any]:
        """Loss, accuracy, macro-F1 and per-class F1 over a (sharded) loader, gathered once per sample."""
        acc = self.accelerator
        model.eval()
        losses, preds, labels = [], [], []
        for batch in loader:
            if batch["labels"].shape[0] == 0:
                continue
            ids, mask = self.model.tokenize(batch["questions"], acc.device)
            logits = model(batch["pixel_values"], ids, mask).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
            g_loss, g_pred, g_label = acc.gather_for_metrics((loss, logits.argmax(-1), batch["labels"]))
            losses.append(g_loss.cpu())
            preds.append(g_pred.cpu())
            labels.append(g_label.cpu())
        model.train()
        if not labels:
            raise RuntimeError("evaluation saw no usable image")
        preds, labels, names = torch.cat(preds), torch.cat(labels), self.model.class_names
        f1 = per_class_scores(confusion_matrix(labels, preds, len(names))).f1
        return {"samples": labels.numel(), "loss": torch.cat(losses).mean().item(), "accuracy": accuracy(labels, preds),
                "macro_f1": macro_f1(labels, preds, len(names)),
                "per_class_f1": {name: f1[i].item() for i, name in enumerate(names)}}

    def _encoder_record(self) -> dict[str, Any]:
        vision = self.model.config.vision
        return {"encoder": vision.encoder, "requested_encoder": vision.requested_encoder,
                "fallback_cause": vision.fallback_cause}

    def export(self, name: str) -> Path | None:
        """Write the self-describing model folder RUN/name/ (LoRA merged) and the run's resolved config."""
        self.accelerator.wait_for_everyone()
        target = None
        if self.accelerator.is_main_process:
            exported = copy.deepcopy(self.model)
            merge_lora(exported.language)
            merge_lora(exported.vision)
            target = exported.eval().save_pretrained(self.run_dir / name)
            save_config(self.config, target / "run_config.yaml")
        self.accelerator.wait_for_everyone()
        return target

    def _log_metrics(self, metrics: dict[str, Any]) -> None:
        self.progress.metric_lines += 1
        if not self.accelerator.is_main_process:
            return
        logger.info("epoch done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
                                       if not isinstance(v, (dict, list))})
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def _finish(self) -> dict[str, Any]:
        self.export("final")
        result: dict[str, Any] = {**self._encoder_record(), "best_val_macro_f1": self.progress.best_metric,
                                  "global_step": self.progress.global_step}
        if self.datasets.test is not None:
            loader = self.accelerator.prepare(self._eval_loader(self.datasets.test))
            result["test"] = self.evaluate(self.model, loader)
        if self.accelerator.is_main_process:
            (self.run_dir / "results.json").write_text(json.dumps(result, indent=1))
        return result
