"""`python -m train --dry-run` (train/plan.py): exact trainable counts, memory terms, no weights read, nothing written."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import torch

from config import load_config
from config.schema import StageConfig
from models.build import build_model
from tests.conftest import REPO
from train.lora import inject_planned, lora_groups, lora_plan
from train.memory_check import shape_config, train_steps, write_shape_folders
from train.plan import activation_bytes, build_meta_model, dry_run, plan_stages
from train.run import main
from train.trainability import apply_stage

DEMO = REPO / "config" / "demo_swin.yaml"  # three stages: align, the encoder's last stage, LoRA on the LLM


def demo_args(tiny, out, *overrides: str) -> list[str]:
    sets = [f"model.vision.checkpoint={tiny['swin']}", f"model.language.checkpoint={tiny['internvl2']}",
            f"output_dir={out}", *overrides]
    return ["--config", str(DEMO), *(a for s in sets for a in ("--set", s)), "--dry-run"]


def demo_config(tiny, *overrides: str):
    return load_config(DEMO, [f"model.vision.checkpoint={tiny['swin']}",
                              f"model.language.checkpoint={tiny['internvl2']}", *overrides])


def whole_encoder(stage):
    """The demo stage, training the whole encoder as well (the demo itself trains only its last stage)."""
    return dataclasses.replace(stage, trainable=[*stage.trainable, "vision.all"])


def real_counts(tiny) -> list[tuple[int, int, dict[str, int]]]:
    """Per demo stage, applied for real to the loaded model: (requires_grad parameters, all parameters,
    parameters per group)."""
    config = demo_config(tiny)
    model = build_model(config.model)
    counts = []
    for stage in config.train.stages:
        inject_planned(model, lora_plan([stage]))
        trainable = apply_stage(model, stage, {**model.parameter_groups(), **lora_groups(model)},
                                [f"vision.{g}" for g in model.vision.depth_groups])
        per_group: dict[str, int] = {}
        for t in trainable:
            per_group[t.group] = per_group.get(t.group, 0) + t.param.numel()
        counts.append((sum(p.numel() for p in model.parameters() if p.requires_grad),
                       sum(p.numel() for p in model.parameters()), per_group))
    return counts


def test_dry_run_prints_every_stage_and_group_with_exact_counts(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(demo_args(tiny_checkpoints, out)) == 0
    printed = capsys.readouterr().out
    assert not out.exists(), "a dry run must not create the run folder"
    stages = demo_config(tiny_checkpoints).train.stages
    for i, (stage, (trainable, total, groups)) in enumerate(zip(stages, real_counts(tiny_checkpoints))):
        assert f"stage {i} {stage.name!r}: {trainable:,} of {total:,} parameters trainable" in printed
        assert sum(groups.values()) == trainable
        block = printed.split(f"stage {i} {stage.name!r}")[1].split("\nstage ")[0]
        for group, count in groups.items():
            assert re.search(rf"^  {re.escape(group)} +{count:,}$", block, re.M), f"{stage.name}: {group} {count:,}"
    assert "language.lora" in printed  # LoRA groups count their adapter parameters
    for column in ("weights", "gradients", "Adam state", "activations", "total"):
        assert column in printed


def test_memory_terms(tiny_checkpoints):
    config = demo_config(tiny_checkpoints)
    plans = dry_run(config)
    model = build_model(config.model)
    for plan in plans:
        assert plan.adam == 8 * plan.trainable_parameters  # two float32 states per trainable parameter
        assert plan.gradients == 4 * plan.trainable_parameters
        assert plan.activations > 0
        assert plan.total_bytes == plan.weights + plan.gradients + plan.adam + plan.activations
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert plans[0].weights == 4 * sum(p.numel() for p in model.parameters()) + buffers  # float32, before LoRA
    assert plans[2].weights > plans[1].weights  # the LoRA adapters of the last stage


def test_dry_run_reads_no_checkpoint_tensor(tiny_checkpoints, tmp_path, capsys):
    tiny = {name: shutil.copytree(path, tmp_path / name) for name, path in tiny_checkpoints.items()}
    for name in ("internvl2", "swin"):
        (tiny[name] / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        build_model(demo_config(tiny).model)  # anything that reads the weights stumbles on the garbage
    assert main(demo_args(tiny, tmp_path / "run")) == 0
    assert "stage 2 'lora'" in capsys.readouterr().out


def test_activations_scale_linearly_with_batch(tiny_checkpoints):
    config = demo_config(tiny_checkpoints)
    small = dry_run(dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=2)))
    large = dry_run(dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=8)))
    for s, g in zip(small, large):
        assert 3.6 < g.activations / s.activations < 4.05, (s.stage, s.activations, g.activations)


def test_checkpointing_and_frozen_encoder_lower_the_estimate(tiny_checkpoints):
    config = demo_config(tiny_checkpoints)
    vision = whole_encoder(config.train.stages[1])
    plans = plan_stages(build_meta_model(config), [config.train.stages[0], vision,
                                                   dataclasses.replace(vision, gradient_checkpointing=True)], 4)
    frozen, trained, checkpointed = (p.activations for p in plans)
    assert frozen < trained / 10  # a frozen encoder saves nothing for backward
    assert checkpointed < trained / 3


def test_meta_estimate_equals_the_count_on_real_tensors(tiny_checkpoints):
    """Shapes alone give the same saved bytes as a real forward (no SDPA with grouped heads here)."""
    config = demo_config(tiny_checkpoints)
    stage = whole_encoder(config.train.stages[1])
    meta, real = build_meta_model(config), build_model(config.model)
    for model in (meta, real):
        apply_stage(model, stage, model.parameter_groups(), [f"vision.{g}" for g in model.vision.depth_groups])
    assert next(meta.parameters()).device == torch.device("meta")
    assert activation_bytes(meta, 2) == activation_bytes(real, 2)


def test_real_shapes_are_planned_on_meta_in_seconds(tmp_path):
    """InternVL2.5-1B + Swin-B from config-only folders (scripts/check_plan.py's shapes): nothing allocated."""
    folders = write_shape_folders(tmp_path, "swin", (448, 448))
    stage = StageConfig(name="encoder", trainable=["head", "vision.all"], gradient_checkpointing=True)
    config = shape_config(REPO / "config" / "base.yaml", folders, "swin", (448, 448), 2, [stage])
    model = build_meta_model(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    (plan,) = plan_stages(model, config.train.stages, 2)
    assert plan.groups["vision.all"] == 86_743_224  # Swin-B without its pooler and classifier
    assert plan.weights == 4 * plan.total_parameters + sum(b.numel() * b.element_size() for b in model.buffers())
    assert plan.total_parameters > 580e6 and plan.activations > 0


def test_measured_steps_train_only_the_stage(tiny_checkpoints):
    """`train_steps` (what scripts/check_plan.py measures) applies the stage as the trainer does."""
    config = demo_config(tiny_checkpoints)
    model = build_model(config.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, config.train.stages[0], batch_size=2, steps=1)  # align: projector, fusion, head
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("head.") for n in changed)
    assert not any(n.startswith(("vision.", "language.")) for n in changed)


def test_half_precision_halves_activations_only(tiny_checkpoints):
    config = demo_config(tiny_checkpoints)
    full = dry_run(config)
    half = dry_run(dataclasses.replace(config, train=dataclasses.replace(config.train, mixed_precision="bf16")))
    for f, h in zip(full, half):
        assert (h.weights, h.gradients, h.adam) == (f.weights, f.gradients, f.adam)  # float32 masters under autocast
        assert 0.45 * f.activations < h.activations <= 0.5 * f.activations + 2**16  # integer tensors keep their size
