"""Sharded training on 2 gloo CPU processes with torch's FSDP2 (`train.sharding: fsdp2`): complete exports,
stage transitions that change what trains, exact resume, and sharded checkpoints that run no code."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator

from config.schema import TrainConfig
from models.build import build_model
from models.internvl2 import InternVL2MultimodalModel
from train.checkpoints import UnsafeCheckpointError, check_safe_to_load, list_checkpoints
from train.lora import inject_planned, lora_plan, merge_lora
from train.sharding import SHARDED_STATE, sharding_function
from tests.conftest import TWO_PROCESSES, RunsCode, make_config, run_args, train_subprocess

# 12 training images, 2 processes x batch 2: 3 optimizer steps an epoch, one epoch for each of the 3 stages.
SHARDED = ("train.sharding=fsdp2", "data.batch_size=2", "train.save_every_steps=1", "train.keep_last_checkpoints=20")


def _initial_model(tiny: dict[str, Path]) -> InternVL2MultimodalModel:
    """The run's model as built, with the LoRA of every stage injected (as the trainer does before sharding)."""
    config = make_config(tiny, "swinv2", "model.vision.image_size=[64, 64]")
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    inject_planned(model, lora_plan(config.train.stages))
    return model


def _held(checkpoint: Path) -> set[str]:
    """The model tensors a sharded checkpoint holds."""
    metadata = dcp.FileSystemReader(str(checkpoint / SHARDED_STATE)).read_metadata()
    return {k.removeprefix("model.") for k in metadata.state_dict_metadata if k.startswith("model.")}


def _checkpoint_weights(checkpoint: Path, model: InternVL2MultimodalModel) -> dict[str, torch.Tensor]:
    """The model weights a sharded checkpoint gives (every process's shards, read in this one process) over
    `model`'s own: it leaves out the base tensors no stage has trained yet, which resume takes from the bases."""
    check_safe_to_load(checkpoint)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dcp.load({"model": {k: state[k] for k in _held(checkpoint)}}, checkpoint_id=str(checkpoint / SHARDED_STATE),
             no_dist=True)
    return state


def _run(tiny: dict[str, Path], receipts: Path, out: Path, *flags: str) -> None:
    """The tiny 3-stage run on 2 processes, sharded by the trainer, a checkpoint after every step."""
    proc = train_subprocess(run_args(tiny, receipts, out, *SHARDED) + list(flags), launcher=TWO_PROCESSES)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()


@pytest.fixture(scope="module")
def sharded_run(tiny_checkpoints, receipts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "run"
    _run(tiny_checkpoints, receipts, out)
    return out


def test_sharded_export_is_complete_and_equals_the_gathered_weights(sharded_run, tiny_checkpoints):
    final = safetensors.torch.load_file(sharded_run / "final" / "model.safetensors")
    plain = build_model(make_config(tiny_checkpoints, "swinv2", "model.vision.image_size=[64, 64]").model)
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in plain.state_dict().items()}  # no shard
    InternVL2MultimodalModel.from_pretrained(sharded_run / "final")  # strict load of the whole folder
    # The last checkpoint holds each process's half; merged here in one process it must give the export.
    model = _initial_model(tiny_checkpoints)
    model.load_state_dict(_checkpoint_weights(list_checkpoints(sharded_run)[-1], model))
    for name, value in merge_lora(model).state_dict().items():
        assert torch.equal(final[name], value), name
    assert json.loads((sharded_run / "results.json").read_text())["world_size"] == 2


def test_stage_transitions_under_fsdp2_change_what_trains(sharded_run, tiny_checkpoints):
    """config/base.yaml: align trains projector, fusion, head; vision adds the encoder's last stage; lora adds
    the LLM's adapters, injected (frozen, lora_B = 0) before the one wrap. Read from the checkpoints that end
    each stage (steps 3, 6, 9)."""
    def changed(name: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return not torch.equal(a[name], b[name])

    model = _initial_model(tiny_checkpoints)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    after = {step: _checkpoint_weights(list_checkpoints(sharded_run)[step - 1], model) for step in (3, 6, 9)}
    last_stage = "vision.backbone.encoder.layers.3.blocks.0.attention.self.query.weight"
    lora_b = next(k for k in initial if k.startswith("language.") and "lora_B" in k)
    base = "language.layers.0.mlp.up_proj.base_layer.weight"
    assert changed("head.2.weight", initial, after[3]) and changed("projector.projectors.0.linear_2.weight", after[3], after[6])
    assert not changed(last_stage, initial, after[3]) and changed(last_stage, after[3], after[6])
    first_stage = last_stage.replace("layers.3", "layers.0")  # trains in no stage
    assert all(not changed(first_stage, initial, after[s]) for s in (3, 6, 9))
    assert not changed(lora_b, initial, after[6]) and changed(lora_b, after[6], after[9])
    assert all(not changed(base, initial, after[s]) for s in (3, 6, 9))
    # The shards hold what the bases cannot give back: the encoder's last stage only once a stage trained it,
    # never the frozen LLM or the never-trained encoder layer.
    held = {step: _held(list_checkpoints(sharded_run)[step - 1]) for step in (3, 6, 9)}
    assert lora_b in held[3] and "head.2.weight" in held[3] and last_stage not in held[3] and last_stage in held[6]
    assert all(base not in held[s] and first_stage not in held[s] for s in (3, 6, 9))


def test_sharded_resume_continues_exactly(sharded_run, tiny_checkpoints, receipts, tmp_path):
    """Resume mid-stage 2 (step 4) from the 2 processes' shards: the same weights, logs and results as the
    uninterrupted run."""
    resumed = tmp_path / "run"
    shutil.copytree(sharded_run, resumed)
    for checkpoint in list_checkpoints(resumed)[4:]:
        shutil.rmtree(checkpoint)
    for name in ("final", "best"):
        shutil.rmtree(resumed / name)
    (resumed / "results.json").unlink()
    _run(tiny_checkpoints, receipts, resumed, "--resume", "--allow-config-change")  # output_dir differs
    want = safetensors.torch.load_file(sharded_run / "final" / "model.safetensors")
    for name, value in safetensors.torch.load_file(resumed / "final" / "model.safetensors").items():
        assert torch.equal(value, want[name]), name
    for name in ("metrics.jsonl", "steps.jsonl", "results.json"):
        assert (resumed / name).read_text() == (sharded_run / name).read_text(), name


def test_a_tampered_sharded_checkpoint_runs_no_code(sharded_run, tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "step"
    shutil.copytree(list_checkpoints(sharded_run)[3], checkpoint)
    (checkpoint / SHARDED_STATE / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"sharded/\.metadata is not plain .*builtins\.exec"):
        check_safe_to_load(checkpoint)
    assert not marker.exists()


def test_a_non_tensor_entry_that_would_run_code_is_refused(tmp_path):
    """torch.distributed.checkpoint reads non-tensor entries with weights_only=False; the check does not."""
    dcp.save({"w": torch.ones(2), "lr": 0.1}, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    check_safe_to_load(tmp_path / "ok")  # plain values pass
    marker = tmp_path / "code-ran"
    dcp.save({"w": torch.ones(2), "evil": RunsCode(marker)}, checkpoint_id=str(tmp_path / "bad"), no_dist=True)
    with pytest.raises(UnsafeCheckpointError, match=r"bad/__0_0\.distcp entry 'evil' does not load"):
        check_safe_to_load(tmp_path / "bad")
    assert not marker.exists()


def test_trainer_sharding_is_refused_with_mixed_precision():
    with pytest.raises(ValueError, match="train.sharding: fsdp2 trains in float32"):
        sharding_function(TrainConfig(sharding="fsdp2", mixed_precision="bf16"), Accelerator(cpu=True))
    assert sharding_function(TrainConfig(), Accelerator(cpu=True)) is None
