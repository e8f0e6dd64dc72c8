"""LoRA through peft on the language model (and optionally the vision backbone), merged on export.

Adapters are injected in place with `peft.inject_adapter_in_model`, so the model keeps its own
structure; the LoRA parameters form the groups `language.lora` / `vision.lora`.
"""

from __future__ import annotations

import logging
from copy import deepcopy

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from config.schema import StageConfig
from models.internvl2 import InternVL2MultimodalModel

logger = logging.getLogger(__name__)

LORA_GROUPS = {"language.lora": "language", "vision.lora": "vision"}


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in module.modules())


def inject_lora(model: InternVL2MultimodalModel, group: str, rank: int, alpha: int, dropout: float) -> None:
    """Add LoRA adapters for `group` ("language.lora" or "vision.lora") unless already present."""
    if group == "language.lora":
        target, names = model.language, list(model.config.language.lora_targets)
    elif group == "vision.lora":
        target, names = model.vision.backbone, list(model.vision.lora_target_modules)
    else:
        raise ValueError(f"not a LoRA group: {group!r}")
    if has_lora(target):
        return
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    inject_adapter_in_model(config, target)
    logger.info("LoRA r=%d alpha=%d on %s: %s", rank, alpha, group, ", ".join(names))


def lora_plan(stages: list[StageConfig]) -> dict[str, StageConfig]:
    """Each LoRA group the stages train -> the first stage that lists it (its rank, alpha and dropout apply)."""
    plan: dict[str, StageConfig] = {}
    for stage in stages:
        for group in LORA_GROUPS:
            if group in stage.trainable:
                plan.setdefault(group, stage)
    return plan


def inject_planned(model: InternVL2MultimodalModel, plan: dict[str, StageConfig]) -> None:
    """`inject_lora` for every group of `plan` (a `lora_plan`, or part of one) with its stage's settings."""
    for group, stage in plan.items():
        inject_lora(model, group, stage.lora_rank, stage.lora_alpha, stage.lora_dropout)


def lora_groups(model: InternVL2MultimodalModel) -> dict[str, list[nn.Module]]:
    """The LoRA parameter groups present in the model (exact: the adapters' own A/B modules)."""
    groups = {}
    for group, attr in LORA_GROUPS.items():
        layers = [m for m in getattr(model, attr).modules() if isinstance(m, LoraLayer)]
        if layers:
            groups[group] = [sub for layer in layers for sub in (layer.lora_A, layer.lora_B)]
    return groups


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRA adapter merged, for export; `model` itself is left as it is.

    Only the base layers the merge writes into are copied; every other parameter and buffer (the frozen
    LLM and encoder, the adapters, fusion, head) is shared with `model`, so exporting a 1B model does not
    hold it twice. The copy is for reading: writing into a shared tensor would change `model`.
    """
    merged = {id(t) for m in model.modules() if isinstance(m, BaseTunerLayer)
              for t in [*m.get_base_layer().parameters(), *m.get_base_layer().buffers()]}
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in merged}
    copy = deepcopy(model, memo=shared)
    for attr in ("language", "vision"):
        if hasattr(copy, attr):
            merge_lora(getattr(copy, attr))
    return copy


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back, in place."""
    for name, sub in list(module.named_modules()):
        if isinstance(sub, BaseTunerLayer):
            sub.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, sub.get_base_layer())
    return module
