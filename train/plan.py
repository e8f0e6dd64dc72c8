"""The training plan: what each stage trains and the accelerator memory it needs, with no weights loaded.

`python -m train --config X --dry-run` builds the model on the meta device (`build_model(...,
load_weights=False)`: the checkpoints' config.json files only, no storage), then walks the stages
as `train.loop.Trainer` does (LoRA injected when a stage first lists it, `apply_stage`, gradient
checkpointing as the stage sets it) and sizes each one:

    weights      every parameter and buffer as stored: accelerate's `calculate_maximum_sizes`
                 (what `accelerate estimate-memory` reports). accelerate's mixed precision autocasts
                 the forward but keeps float32 weights, so bf16/fp16 change nothing here.
    gradients    one per trainable parameter, in its dtype (float32).
    Adam state   AdamW's exp_avg and exp_avg_sq: 2 float32 tensors per trainable parameter.
    activations  the bytes autograd saves for backward in one forward + loss at `data.batch_size`
                 and `model.vision.image_size`, counted on meta tensors by `SavedTensorCounter`
                 (each storage once, parameters and buffers left out), fused attention counted as
                 the fused kernels save it (`FusedAttentionOnMeta`). Under bf16/fp16 autocast the
                 matmul outputs that make up most of them are half precision, so floating saved
                 tensors are counted at 2 bytes an element (autocast does not run on meta tensors;
                 the few it keeps in float32, such as softmax inputs, are under-counted).
Not counted: transient buffers that live within one op or one backward step, the allocator's slack,
the CUDA context, the batch's data-loader copies, and what a sharded run divides by its world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import calculate_maximum_sizes
from torch.overrides import TorchFunctionMode

from config.schema import Config, StageConfig
from models.build import build_model
from models.internvl2 import InternVL2MultimodalModel
from models.measure import markdown_table
from train.lora import inject_planned, lora_groups, lora_plan
from train.saved_tensors import SavedTensorCounter, model_tensors
from train.trainability import apply_stage

HALF_PRECISIONS = ("bf16", "fp16")
ADAM_STATES = 2  # exp_avg, exp_avg_sq
ADAM_STATE_BYTES = 4  # float32, whatever the parameter's precision


@dataclass
class StagePlan:
    """One stage's trainable parameters (per group, as `apply_stage` resolves them) and memory in bytes."""

    stage: str
    groups: dict[str, int]  # trainable group -> parameters it trains in this stage
    total_parameters: int
    weights: int
    gradients: int
    adam: int
    activations: int
    gradient_checkpointing: bool

    @property
    def trainable_parameters(self) -> int:
        return sum(self.groups.values())

    @property
    def total_bytes(self) -> int:
        return self.weights + self.gradients + self.adam + self.activations


def build_meta_model(config: Config) -> InternVL2MultimodalModel:
    """The configured model on the meta device: the architecture from config.json files, no tensor read."""
    with torch.device("meta"):
        return build_model(config.model, load_weights=False)


def plan_stages(model: InternVL2MultimodalModel, stages: list[StageConfig], batch_size: int,
                mixed_precision: str = "no") -> list[StagePlan]:
    """Apply every stage to `model` in order, as the trainer does, and size each.

    Args:
        model: the unwrapped model, on the meta device (or a real one: then the activation count
            runs a real forward). Its trainability, LoRA adapters and checkpointing are changed.
        stages: `train.stages`.
        batch_size: images per forward (`data.batch_size`).
        mixed_precision: `train.mixed_precision`.
    """
    plans = []
    for stage in stages:
        inject_planned(model, lora_plan([stage]))  # a no-op for groups already injected
        groups = {**model.parameter_groups(), **lora_groups(model)}
        trainable = apply_stage(model, stage, groups, [f"vision.{g}" for g in model.vision.depth_groups])
        model.vision.set_grad_checkpointing(stage.gradient_checkpointing)
        per_group: dict[str, int] = {}
        for t in trainable:
            per_group[t.group] = per_group.get(t.group, 0) + t.param.numel()
        n_trainable = sum(per_group.values())
        plans.append(StagePlan(
            stage=stage.name, groups=per_group, total_parameters=sum(p.numel() for p in model.parameters()),
            weights=calculate_maximum_sizes(model)[0],
            gradients=sum(t.param.numel() * t.param.element_size() for t in trainable),
            adam=ADAM_STATES * ADAM_STATE_BYTES * n_trainable,
            activations=activation_bytes(model, batch_size, mixed_precision),
            gradient_checkpointing=stage.gradient_checkpointing))
    return plans


def activation_bytes(model: InternVL2MultimodalModel, batch_size: int, mixed_precision: str = "no") -> int:
    """Bytes saved for backward by one training forward + loss at `batch_size` and the model's input size.

    Runs on the device of the model's parameters (meta: shapes only) with the trainability and
    checkpointing the model has now, every image asking the default question (no padding). The
    question-state cache is bypassed (`_LLMEveryCall`): while the LLM is frozen it saves nothing for
    backward either way, and its lookup reads token values, which meta tensors lack.
    """
    device = next(model.parameters()).device
    height, width = model.preprocessing.size
    ids, mask = (t.expand(batch_size, -1).to(device) for t in model.tokenize([None]))
    pixels = torch.zeros(batch_size, 3, height, width, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    cache, model.question_cache = model.question_cache, _LLMEveryCall()
    was_training = model.training
    model.train()  # as in training: dropout masks, checkpointing (transformers only checkpoints in train mode)
    try:
        with SavedTensorCounter(model_tensors(model)) as counter, FusedAttentionOnMeta():
            model(pixels, ids, mask, labels=labels)
    finally:
        model.question_cache = cache
        model.train(was_training)
    if mixed_precision not in HALF_PRECISIONS:
        return counter.bytes
    return sum(n * 2 // dtype.itemsize if dtype.is_floating_point and dtype.itemsize > 2 else n
               for dtype, n in counter.bytes_by_dtype.items())


class FusedAttentionOnMeta(TorchFunctionMode):
    """Meta tensors through `F.scaled_dot_product_attention` take the fused kernel's path, as on CPU and CUDA.

    On the meta device torch picks the math path, which saves the (B, heads, L, L) attention weights for
    backward; the fused kernels (flash and memory-efficient on CUDA, flash on CPU) keep only q, k, v,
    the mask, the output and the (B, heads, L) log-sum-exp. CPU flash attention's meta kernel saves
    exactly that. Where CPU flash attention does not run, neither does this: calls with `enable_gqa`,
    and masks that need a gradient (Swin's trainable position bias rides in the mask; torch's math path
    takes those, on CPU as here; CUDA's memory-efficient kernel would save less).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta" and _flash_takes(*args, **kwargs):
            return _flash_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _flash_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 *args: object, enable_gqa: bool = False, **kwargs: object) -> bool:
    """Whether CPU flash attention runs this call: no grouped heads, no mask that needs a gradient."""
    return not enable_gqa and (attn_mask is None or not attn_mask.requires_grad)


def _flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention`'s arguments -> the output of CPU flash attention, (B, heads, L, D)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                      attn_mask=attn_mask, scale=scale)[0]


class _LLMEveryCall:
    """Takes the question-state cache's place in `activation_bytes`: the LLM runs on every call, and without
    the attention mask (all ones there), because transformers' check for padding reads the mask's values."""

    @staticmethod
    def text_states(language: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
        return language(input_ids=input_ids).last_hidden_state  # (B, T, D)


def dry_run(config: Config) -> list[StagePlan]:
    """The plan of every stage of `config` on the meta-device model."""
    model = build_meta_model(config)
    return plan_stages(model, config.train.stages, config.data.batch_size, config.train.mixed_precision)


def memory_unit(largest: int) -> tuple[str, int]:
    """GiB for plans of a gigabyte or more, MiB below (the tiny models)."""
    return ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20)


def plan_report(plans: list[StagePlan], config: Config) -> str:
    """The dry-run printout: per stage its trainable groups, then one memory table over the stages."""
    height, width = config.model.vision.image_size
    lines = [f"Plan for {config.model.vision.encoder} + {config.model.language.checkpoint}: batch "
             f"{config.data.batch_size}, {height}x{width} px, mixed precision {config.train.mixed_precision} "
             f"(meta device, no weights loaded)", ""]
    for i, plan in enumerate(plans):
        lines.append(f"stage {i} {plan.stage!r}: {plan.trainable_parameters:,} of {plan.total_parameters:,} "
                     f"parameters trainable")
        lines += [f"  {group:<22} {count:>14,}" for group, count in plan.groups.items()]
    unit, scale = memory_unit(max(p.total_bytes for p in plans))
    lines += ["", f"Estimated accelerator memory per stage, {unit} (activations: saved for backward by one "
                  f"forward + loss):", ""]
    headers = ["stage", "trainable params", "weights", "gradients", "Adam state", "activations", "checkpointing",
               "total"]
    rows = [[p.stage, f"{p.trainable_parameters:,}", *(f"{n / scale:.3f}" for n in (p.weights, p.gradients, p.adam,
             p.activations)), "on" if p.gradient_checkpointing else "off", f"**{p.total_bytes / scale:.3f}**"]
            for p in plans]
    lines.append(markdown_table(headers, rows))
    return "\n".join(lines)

