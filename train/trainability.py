"""One policy, outside the modules, decides what trains: stages name groups, groups are exact module sets.

A stage's `trainable` list names groups of `model.parameter_groups()` (plus `language.lora` /
`vision.lora` once LoRA is injected). A parameter claimed by several listed groups belongs to the
smallest of them, so `vision.all` at 0.1x with `vision.last_stage` at 1x does what it says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from config.schema import StageConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainableParam:
    name: str
    param: nn.Parameter
    group: str
    lr_scale: float  # group multiplier x layer decay, relative to the stage LR
    decay: bool  # weight decay applies (not to norms, biases, gates, scales: ndim <= 1)


def resolve_groups(stage: StageConfig, groups: dict[str, list[nn.Module]]) -> dict[int, str]:
    """Map id(parameter) -> the group that owns it for this stage.

    Raises:
        ValueError: a listed group or multiplier does not exist, or a listed group has no parameters.
    """
    for name in list(stage.trainable) + list(stage.lr_multipliers):
        if name not in groups:
            raise ValueError(f"stage {stage.name!r}: unknown trainable group {name!r}; "
                             f"valid groups: {', '.join(sorted(groups))}")
    unlisted = sorted(set(stage.lr_multipliers) - set(stage.trainable))
    if unlisted:
        raise ValueError(f"stage {stage.name!r}: lr_multipliers for groups not in trainable: {unlisted}")
    members = {g: {id(p) for m in groups[g] for p in m.parameters()} for g in stage.trainable}
    owner: dict[int, str] = {}
    for group in sorted(stage.trainable, key=lambda g: -len(members[g])):  # smaller groups win
        if not members[group]:
            raise ValueError(f"stage {stage.name!r}: group {group!r} has no parameters")
        owner.update({pid: group for pid in members[group]})
    return owner


def apply_stage(model: nn.Module, stage: StageConfig, groups: dict[str, list[nn.Module]],
                depth_groups: list[str]) -> list[TrainableParam]:
    """Freeze everything, then unfreeze the stage's groups. Returns the trainable parameters.

    Args:
        model: the unwrapped model (freezing happens before any distributed wrapping).
        stage: the stage config.
        groups: `model.parameter_groups()` plus LoRA groups.
        depth_groups: the vision encoder's groups from input to output, names prefixed "vision.".
    """
    owner = resolve_groups(stage, groups)
    depth = _depth_scales(groups, depth_groups, stage.layer_decay)
    model.requires_grad_(False)
    trainable = []
    for name, param in model.named_parameters():
        group = owner.get(id(param))
        if group is None:
            continue
        param.requires_grad_(True)
        scale = stage.lr_multipliers.get(group, 1.0) * depth.get(id(param), 1.0)
        trainable.append(TrainableParam(name, param, group, scale, decay=param.ndim > 1))
    return trainable


def _depth_scales(groups: dict[str, list[nn.Module]], depth_groups: list[str],
                  layer_decay: float | None) -> dict[int, float]:
    """Layer-wise LR decay: the last depth group gets 1, each earlier one `layer_decay` times less."""
    if layer_decay is None:
        return {}
    n = len(depth_groups)
    return {id(p): layer_decay ** (n - 1 - i)
            for i, g in enumerate(depth_groups) for m in groups[g] for p in m.parameters()}


def manifest(trainable: list[TrainableParam], model: nn.Module) -> dict:
    """Per-group counts and names of the trainable parameters, for printing and saving."""
    per_group: dict[str, dict] = {}
    for t in trainable:
        entry = per_group.setdefault(t.group, {"tensors": 0, "parameters": 0, "lr_scales": set(), "names": []})
        entry["tensors"] += 1
        entry["parameters"] += t.param.numel()
        entry["lr_scales"].add(round(t.lr_scale, 8))
        entry["names"].append(t.name)
    for entry in per_group.values():
        entry["lr_scales"] = sorted(entry["lr_scales"])
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_parameters": sum(t.param.numel() for t in trainable), "total_parameters": total,
            "groups": per_group}


def log_manifest(stage: StageConfig, summary: dict) -> None:
    lines = [f"stage {stage.name!r}: {summary['trainable_parameters']:,} of {summary['total_parameters']:,} "
             f"parameters trainable"]
    for group, entry in summary["groups"].items():
        lines.append(f"  {group:<22} {entry['tensors']:>5} tensors {entry['parameters']:>12,} params  "
                     f"lr x {', '.join(f'{s:g}' for s in entry['lr_scales'])}")
    logger.info("\n".join(lines))


def check_gradients(trainable: list[TrainableParam], optimizer_params: set[int]) -> None:
    """After the first step of a stage: every trainable parameter got a gradient and is optimised.

    Raises:
        RuntimeError: naming the parameters without gradient or missing from the optimizer.
    """
    no_grad = [t.name for t in trainable if t.param.grad is None]
    not_optimised = [t.name for t in trainable if id(t.param) not in optimizer_params]
    if no_grad or not_optimised:
        raise RuntimeError(f"trainability check failed: no gradient for {no_grad[:10]}"
                           f"{'...' if len(no_grad) > 10 else ''}; not in the optimizer: {not_optimised[:10]}")
