"""Sharded training: who shards the model, how its full weights are gathered, how its shards are saved.

A model is sharded one of two ways:
- by accelerate, from its config file (`config/accelerate/fsdp.yaml`, `fsdp2.yaml`, `deepspeed_zero*.yaml`):
  `accelerator.prepare` wraps it, `save_state` / `load_state` write and read its shards with the plugin's
  state-dict settings, `get_state_dict` gathers its full weights;
- by the trainer, with torch's FSDP2 (`fully_shard`), when `train.sharding: fsdp2` asks for it where
  accelerate does not shard (several CPU processes: accelerate refuses FSDP without GPUs). The trainer
  then saves the model's and optimizer's shards itself with torch.distributed.checkpoint (`SHARDED_STATE`
  inside the checkpoint) and gathers with `get_model_state_dict`.

Either way the model is wrapped once and stays wrapped: every structural change (LoRA of every stage) is
made before the wrap, and a stage changes only `requires_grad`, which FSDP2 reads per parameter at each
all-gather (FSDP1 with `use_orig_params` at each forward). Exports are built from the gathered weights on
the main process (`unsharded_copy`), never from the shards a process holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from config.schema import StageConfig, TrainConfig
from models.internvl2 import InternVL2MultimodalModel
from train.lora import inject_planned

SHARDED_STATE = "sharded"  # a checkpoint's folder of model and optimizer shards (torch.distributed.checkpoint)
# The layers each get their own FSDP unit: the LLM's decoder layer and every encoder's block. The accelerate
# FSDP configs list the same classes (tests/test_accelerate_configs.py checks both against every encoder).
SHARDED_LAYERS = ("Qwen2DecoderLayer", "InternVLVisionLayer", "SwinLayer", "Swinv2Layer", "SwinV2Block")


def accelerate_shards(accelerator: Accelerator) -> bool:
    """accelerate's config shards the model (FSDP 1 or 2, DeepSpeed): accelerate wraps, saves and gathers it."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def sharding_function(train: TrainConfig, accelerator: Accelerator) -> Callable[[nn.Module], nn.Module] | None:
    """`fsdp2_shard` when `train.sharding: fsdp2` asks the trainer to shard, else None (accelerate decides).

    Raises:
        ValueError: accelerate's config shards already, or mixed precision is asked for (the trainer's FSDP2
            trains in float32; config/accelerate/fsdp2.yaml gives mixed precision on GPUs).
    """
    if train.sharding is None:
        return None
    if accelerate_shards(accelerator):
        raise ValueError(f"train.sharding: {train.sharding} while accelerate's config already shards the model "
                         f"({accelerator.distributed_type.value}): use one of them")
    if train.mixed_precision != "no":
        raise ValueError(f"train.sharding: {train.sharding} trains in float32: set train.mixed_precision: no, "
                         f"or use config/accelerate/fsdp2.yaml for mixed precision on GPUs")
    return fsdp2_shard


def fsdp2_shard(model: nn.Module) -> nn.Module:
    """Shard `model` in place with torch's FSDP2: each `SHARDED_LAYERS` module is one unit, the rest the root's.

    Every process calls this on the same model; afterwards its parameters are DTensors sharded along dim 0.
    """
    for module in reversed(list(model.modules())):  # inner units before the ones that hold them
        if type(module).__name__ in SHARDED_LAYERS:
            fully_shard(module)
    fully_shard(model)
    return model


def holds_dtensors(model: nn.Module) -> bool:
    """The model's parameters are DTensors: sharded by torch's FSDP2 (by the trainer or by accelerate)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The complete weights of a sharded model, on the main process's CPU ({} on the other processes).

    Every process must call this (it gathers). None when the model is not sharded: its own state_dict is
    complete on every process.

    Args:
        model: the model as prepared (wrapped by accelerate, or sharded in place by `fsdp2_shard`).
    """
    if accelerate_shards(accelerator):
        return accelerator.get_state_dict(model)
    if holds_dtensors(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def unsharded_copy(model: InternVL2MultimodalModel, state: dict[str, torch.Tensor],
                   lora: dict[str, StageConfig]) -> InternVL2MultimodalModel:
    """A plain model on the CPU with the architecture of `model` (LoRA included) and the weights `state`.

    The structure is built on the meta device from `model.export_config()` and its LoRA adapters; the
    gathered tensors are then copied into it (cast to the dtype the model declares: DeepSpeed ZeRO-3 gathers
    16-bit weights). Buffers outside the state dict stay on the meta device: the copy is for saving.

    Args:
        model: the live (sharded) model; only its structure is read.
        state: its full state dict (`full_state_dict`), keys as in `model.state_dict()`.
        lora: the LoRA groups injected into `model`, each with the stage that set it up (`lora_plan`).
    """
    with torch.device("meta"):
        copy = InternVL2MultimodalModel.from_export_config(model.export_config(), model.tokenizer)
        inject_planned(copy, lora)
    dtypes = {k: v.dtype for k, v in copy.state_dict().items()}
    # A copy of each tensor: gathered ones can be views of one all-gather buffer, which safetensors refuses.
    copy.load_state_dict({k: v.to(dtypes.get(k, v.dtype), copy=True) for k, v in state.items()}, strict=True,
                         assign=True)
    return copy


def save_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, keep: set[str]) -> None:
    """Every process writes its shards of the model tensors named in `keep` and of the optimizer to `folder`
    (torch.distributed.checkpoint)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    model_state = {k: v for k, v in model_state.items() if k in keep}
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, keep: set[str]) -> None:
    """Read what `save_sharded_state` wrote into the same sharded model and an optimizer over the same parameters;
    the model tensors outside `keep` keep the values the model was built with.

    Check the folder with `train.checkpoints.check_safe_to_load` first: torch unpickles its `.metadata`.
    """
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": {k: v for k, v in model_state.items() if k in keep}, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))  # a tensor of `keep` missing from the folder is an error here
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))
