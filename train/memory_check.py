"""Checking `train.plan`'s memory estimate against a real process at real shapes, without checkpoints.

The model is described by config-only folders (`write_shape_folders`: InternVL2.5-1B in OpenGVLab's
original layout, a Swin-B folder; config.json and a tokenizer, no weights), so the estimate
(`build_model(load_weights=False)` on the meta device) and the measured run (the same call on the
CPU: random weights at full size) build the same model through the same code. The measured run
applies one stage as the trainer does and takes optimizer steps on random images
(`train_steps`); `scripts/check_plan.py` runs it in a child process per stage and compares the
child's peak resident memory with the estimate (`comparison_table`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig

from config import load_config
from config.schema import Config, StageConfig
from models.encoders import get_encoder_class
from models.internvl2 import InternVL2MultimodalModel
from models.measure import markdown_table
from models.tiny import write_original_internvl
from train.lora import inject_planned, lora_groups, lora_plan
from train.plan import StagePlan
from train.trainability import apply_stage

def write_shape_folders(out: Path, encoder: str, image_size: tuple[int, int]) -> dict[str, Path]:
    """Config-only folders: `internvl2/`, InternVL2.5-1B in OpenGVLab's original layout without weights
    (`models.tiny.write_original_internvl(..., weights=False)`), and, for an encoder not in that folder,
    `vision/` (its `recipe.real_config`, e.g. Swin-B).

    Returns:
        {"internvl2": folder, "vision": the folder `encoder` is built from}.
    """
    internvl = write_original_internvl(out / "internvl2", preset="internvl2.5-1b", weights=False)
    folders = {"internvl2": internvl, "vision": internvl}
    cls = get_encoder_class(encoder)
    if not cls.in_language_checkpoint:
        with torch.device("meta"):  # the adapter's own config dict for its real shapes, nothing allocated
            fields = cls.build(None, dict(cls.recipe.real_config), image_size).hf_config_dict()
        AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(out / "vision")
        folders["vision"] = out / "vision"
    return folders


def shape_config(base: Path, folders: dict[str, Path], encoder: str, image_size: tuple[int, int],
                 batch_size: int, stages: list[StageConfig]) -> Config:
    """`base` (a YAML) pointed at the config-only folders, at `image_size` and `batch_size`, with `stages`."""
    config = load_config(base, [
        f"model.vision.encoder={encoder}", f"model.vision.checkpoint={folders['vision']}",
        "model.vision.fallback=null", f"model.vision.image_size=[{image_size[0]}, {image_size[1]}]",
        f"model.language.checkpoint={folders['internvl2']}", f"data.batch_size={batch_size}",
        "train.mixed_precision=no"])
    config.train.stages = list(stages)
    return config


def train_steps(model: InternVL2MultimodalModel, stage: StageConfig, batch_size: int, steps: int) -> None:
    """Apply `stage` as the trainer does and take `steps` AdamW steps on random images (float32, the model's
    device), the default question, the question-state cache as in training."""
    inject_planned(model, lora_plan([stage]))
    groups = {**model.parameter_groups(), **lora_groups(model)}
    trainable = apply_stage(model, stage, groups, [f"vision.{g}" for g in model.vision.depth_groups])
    model.vision.set_grad_checkpointing(stage.gradient_checkpointing)
    optimizer = torch.optim.AdamW([t.param for t in trainable], lr=stage.lr)
    device = next(model.parameters()).device
    height, width = model.preprocessing.size
    ids, mask = model.tokenize([None] * batch_size, device)
    model.train()
    for _ in range(steps):
        pixels = torch.randn(batch_size, 3, height, width, device=device)
        labels = torch.randint(0, model.config.num_classes, (batch_size,), device=device)
        F.cross_entropy(model(pixels, ids, mask).logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass
class Measured:
    """Resident memory of one measuring child process, MiB."""

    peak: float  # VmHWM after the steps (reset after the model was built, see `scripts/check_plan.py`)
    torch_baseline: float  # a fresh interpreter that has imported torch
    imports_baseline: float  # the child after its imports, before building the model


def comparison_table(plans: list[StagePlan], measured: list[Measured]) -> str:
    """Estimate against measured, per stage, in MiB; the ratio is measured (over the torch baseline) / estimate."""
    headers = ["stage", "trainable params", "ckpt", "weights", "grads + Adam", "activations", "estimate",
               "peak RSS", "- torch baseline", "- imports baseline", "measured / estimate"]
    rows = []
    for p, m in zip(plans, measured):
        over_torch = m.peak - m.torch_baseline
        rows.append([p.stage, f"{p.trainable_parameters:,}", "on" if p.gradient_checkpointing else "off",
                     _mib(p.weights), _mib(p.gradients + p.adam), _mib(p.activations), _mib(p.total_bytes),
                     f"{m.peak:,.0f}", f"{over_torch:,.0f}", f"{m.peak - m.imports_baseline:,.0f}",
                     f"**{over_torch / (p.total_bytes / 2**20):.2f}**"])
    return markdown_table(headers, rows)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f}"
