"""Staged training end to end on a tiny config: stages, trainability, LoRA, export, resume, multi-process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from config.schema import StageConfig
from models.calibration import Calibration
from models.build import build_model
from models.internvl2 import InternVL2MultimodalModel
from train.checkpoints import list_checkpoints
from train.data import augment_config
from train.lora import has_lora, inject_lora, lora_groups, merge_lora, merged_copy
from train.run import main
from train.loop import Trainer
from train.trainability import apply_stage, resolve_groups
from tests.conftest import TWO_PROCESSES, RunsCode, make_config, run_args, train_subprocess


def test_full_run_writes_manifests_metrics_and_exports(tiny_checkpoints, receipts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(tiny_checkpoints, receipts, out)) == 0
    manifest = json.loads((out / "stages" / "0-align" / "trainable.json").read_text())
    assert sorted(manifest["groups"]) == ["fusion", "head", "projector"]
    stage2 = json.loads((out / "stages" / "1-vision" / "trainable.json").read_text())
    assert stage2["groups"]["vision.last_stage"]["lr_scales"] == [0.01]
    assert "language.lora" in json.loads((out / "stages" / "2-lora" / "trainable.json").read_text())["groups"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in lines] == ["align", "vision", "lora"]
    assert all(m["encoder"] == "swinv2" and m["val_samples"] == 6 for m in lines)
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["samples"] == 6 and results["encoder"] == "swinv2"
    assert len(list_checkpoints(out)) == 2  # keep_last_checkpoints
    assert all((c / "config.yaml").read_text() == (out / "config.yaml").read_text() for c in list_checkpoints(out))
    final = InternVL2MultimodalModel.from_pretrained(out / "final")  # LoRA merged: a plain model loads
    assert not has_lora(final) and final.config.vision.encoder == "swinv2"
    assert (out / "best" / "config.json").is_file() and (out / "final" / "run_config.yaml").is_file()
    timing = json.loads((out / "timing.json").read_text())["stages"]
    assert [t["stage"] for t in timing] == ["align", "vision", "lora"]
    # 12 images at batch 4: 3 optimizer steps per stage, the first timed apart as warm-up
    assert all(t["timed_steps"] == 2 and 0 < t["seconds_per_step"] < t["seconds"] for t in timing)
    assert all(t["peak_memory_mib"] > 100 and t["peak_memory"] == "peak RSS (VmHWM)" for t in timing)


def test_frozen_parameters_stay_bit_identical(tiny_checkpoints, receipts, tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_checkpoints, receipts, out, "train.stages=[{name: align, epochs: 1, lr: 0.001, "
                                                     "trainable: [projector, head]}]")
    assert main(args) == 0
    trained = safetensors.torch.load_file(out / "final" / "model.safetensors")
    torch.manual_seed(0)
    initial = build_model(make_config(tiny_checkpoints, "swinv2", "model.vision.image_size=[64, 64]").model)
    for name, value in initial.state_dict().items():
        if name.startswith(("vision.", "language.", "fusion.")):
            assert torch.equal(trained[name], value), f"{name} is frozen but changed"
    assert not torch.equal(trained["head.2.weight"], initial.state_dict()["head.2.weight"])


def test_gradient_accumulation_counts_optimizer_steps(tiny_checkpoints, receipts, tmp_path):
    out = tmp_path / "run"
    stage = "train.stages=[{name: a, epochs: 2, lr: 0.001, grad_accum_steps: 2, trainable: [head]}]"
    assert main(run_args(tiny_checkpoints, receipts, out, stage)) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 12 images, batch 4: 3 micro-batches an epoch -> 2 optimizer steps (the last one flushes)
    assert [m["global_step"] for m in lines] == [2, 4]
    assert lines[-1]["lr"] == pytest.approx(0.0)  # the cosine schedule ends exactly at the last step


def test_adam_state_carries_over_for_parameters_that_stay_trainable(tiny_checkpoints, tmp_path):
    model = build_model(make_config(tiny_checkpoints, "swin").model)
    trainer = Trainer(make_config(tiny_checkpoints, "swin"), Accelerator(cpu=True), model, None, tmp_path)
    groups = model.parameter_groups()
    first = apply_stage(model, StageConfig(trainable=["head"]), groups, [])
    optimizer = trainer._make_optimizer(StageConfig(trainable=["head"]), first)
    model(torch.randn(1, 3, 224, 224), labels=torch.tensor([1])).loss.backward()
    optimizer.step()
    trainer._previous_optimizer = optimizer
    stage = StageConfig(trainable=["head", "projector"], lr=5e-4, lr_multipliers={"projector": 0.1})
    second = trainer._make_optimizer(stage, apply_stage(model, stage, groups, []))
    for module in groups["head"]:
        for p in module.parameters():
            assert second.state[p] is optimizer.state[p] and second.state[p]["step"] == 1
    for p in groups["projector"][0].parameters():
        assert p not in second.state
    lrs = sorted({g["lr"] for g in second.param_groups})
    assert lrs == pytest.approx([5e-5, 5e-4])


def test_early_stopping_ends_a_stage(tiny_checkpoints, receipts, tmp_path):
    out = tmp_path / "run"
    stage = "train.stages=[{name: a, epochs: 5, lr: 0.0, trainable: [head]}]"
    assert main(run_args(tiny_checkpoints, receipts, out, stage, "train.early_stopping_patience=1")) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # epoch 1 sets the best, epoch 2 does not improve -> stop


def test_without_a_validation_split_the_export_says_its_temperature_was_not_fitted(tiny_checkpoints, receipts,
                                                                                 tmp_path, caplog):
    out = tmp_path / "run"
    stage = "train.stages=[{name: a, epochs: 1, max_steps: 1, lr: 0.0, trainable: [head]}]"
    assert main(run_args(tiny_checkpoints, receipts, out, stage, "data.val=null", "data.test=null")) == 0
    assert not (out / "best").exists()  # nothing to pick a best model by
    assert json.loads((out / "final" / "config.json").read_text())["calibration"] == Calibration().to_dict()
    assert "**Not calibrated**" in (out / "final" / "README.md").read_text()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("export 'final': NO TEMPERATURE FITTED (the run has no validation split" in w for w in warnings)


def test_stage_groups_are_checked(tiny_checkpoints):
    model = build_model(make_config(tiny_checkpoints, "swin").model)
    groups = model.parameter_groups()
    with pytest.raises(ValueError, match="unknown trainable group 'vision.lastt'; valid groups: .*vision.last_stage"):
        resolve_groups(StageConfig(trainable=["vision.lastt"]), groups)
    with pytest.raises(ValueError, match=r"lr_multipliers for groups not in trainable: \['fusion'\]"):
        resolve_groups(StageConfig(trainable=["head"], lr_multipliers={"fusion": 0.1}), groups)


def test_smallest_group_wins_and_layer_decay_scales(tiny_checkpoints):
    model = build_model(make_config(tiny_checkpoints, "swin").model)
    stage = StageConfig(trainable=["vision.all", "vision.last_stage"], lr=1.0,
                        lr_multipliers={"vision.all": 0.1}, layer_decay=0.5)
    depth = [f"vision.{g}" for g in model.vision.depth_groups]
    trainable = apply_stage(model, stage, model.parameter_groups(), depth)
    by_name = {t.name: t for t in trainable}
    last = by_name["vision.backbone.encoder.layers.3.blocks.0.attention.q_proj.weight"]
    assert (last.group, last.lr_scale) == ("vision.last_stage", 1.0)
    first = by_name["vision.backbone.encoder.layers.0.blocks.0.attention.q_proj.weight"]
    assert first.group == "vision.all" and first.lr_scale == pytest.approx(0.1 * 0.5 ** 3)  # stage.0 of 5 groups
    assert by_name["vision.backbone.layernorm.weight"].decay is False
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(by_name)


@pytest.mark.parametrize("name", ["swin", "internvit"])
def test_lora_export_matches_the_unmerged_model(name, tiny_checkpoints, tmp_path):
    model = build_model(make_config(tiny_checkpoints, name).model).eval()
    inject_lora(model, "language.lora", rank=4, alpha=8, dropout=0.0)
    inject_lora(model, "vision.lora", rank=4, alpha=8, dropout=0.0)
    groups = lora_groups(model)
    assert set(groups) == {"language.lora", "vision.lora"}
    with torch.no_grad():
        for module in groups["language.lora"] + groups["vision.lora"]:
            for p in module.parameters():
                p.normal_(0, 0.2)  # lora_B starts at zero; make the adapters matter
        for block in model.fusion.blocks:
            block.attn_gate.alpha.fill_(1.0)
    x = torch.randn(2, 3, 224, 224)
    expected = model(x).logits
    merge_lora(model.language)
    merge_lora(model.vision)
    assert not has_lora(model)
    model.save_pretrained(tmp_path / "export")
    torch.testing.assert_close(InternVL2MultimodalModel.from_pretrained(tmp_path / "export")(x).logits, expected,
                               rtol=1e-4, atol=1e-5)


def test_the_export_copy_merges_lora_and_shares_what_the_merge_leaves_alone(tiny_checkpoints):
    model = build_model(make_config(tiny_checkpoints, "swin").model).eval()
    inject_lora(model, "language.lora", rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for module in lora_groups(model)["language.lora"]:
            for p in module.parameters():
                p.normal_(0, 0.2)
        for block in model.fusion.blocks:
            block.attn_gate.alpha.fill_(1.0)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x).logits
        exported = merged_copy(model)
        torch.testing.assert_close(exported(x).logits, expected, rtol=1e-4, atol=1e-5)
    assert has_lora(model) and not has_lora(exported)  # the training model keeps its adapters ...
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # ... and its values
    shared = {p.data_ptr() for p in model.parameters()}
    assert model.language.embed_tokens.weight.data_ptr() in {p.data_ptr() for p in exported.parameters()}
    q_proj = exported.language.layers[0].self_attn.q_proj
    assert isinstance(q_proj, torch.nn.Linear) and q_proj.weight.data_ptr() not in shared  # merged into a copy


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tiny_checkpoints, receipts, tmp_path):
    extra = ("train.save_every_steps=1", "train.keep_last_checkpoints=3")
    reference = train_subprocess(run_args(tiny_checkpoints, receipts, tmp_path / "ref", *extra))
    killed_dir = tmp_path / "killed"
    victim = train_subprocess(run_args(tiny_checkpoints, receipts, killed_dir, *extra))
    deadline = time.time() + 300
    # 3 steps an epoch, 1 epoch a stage: step 4 is inside stage 2's epoch
    while time.time() < deadline and not any(int(c.name[5:]) >= 4 for c in list_checkpoints(killed_dir)):
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    resumed = train_subprocess(run_args(tiny_checkpoints, receipts, killed_dir, *extra) + ["--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    assert reference.wait(timeout=600) == 0, reference.stdout.read()
    expected = json.loads((tmp_path / "ref" / "results.json").read_text())
    got = json.loads((killed_dir / "results.json").read_text())
    assert got == expected  # results.json identical: test metrics, best metric and step, world size
    ref_weights = safetensors.torch.load_file(tmp_path / "ref" / "final" / "model.safetensors")
    for name, value in safetensors.torch.load_file(killed_dir / "final" / "model.safetensors").items():
        assert torch.equal(value, ref_weights[name]), name
    steps = [json.loads(line)["global_step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and len(steps) == 3  # no duplicate lines from the killed run
    for name in ("metrics.jsonl", "steps.jsonl"):  # losses and skipped counts summed across the kill
        assert (killed_dir / name).read_text() == (tmp_path / "ref" / name).read_text(), name


def test_resume_refuses_a_changed_config(tiny_checkpoints, receipts, tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_checkpoints, receipts, out, "train.stages=[{name: a, max_steps: 1, trainable: [head]}]")
    assert main(args) == 0
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        main(args)
    with pytest.raises(SystemExit, match=r"train.stages.0.lr: 0.0001 -> 0.5"):
        main(args + ["--set", "train.stages.0.lr=0.5", "--resume"])
    assert main(args + ["--set", "train.stages.0.lr=0.5", "--resume", "--allow-config-change"]) == 0


def test_two_processes_agree_with_one_process(tiny_checkpoints, receipts, tmp_path):
    """2 gloo processes x batch 2 take the same steps as 1 process x batch 4: the seedable sampler deals the
    same global batches, DDP averages the two halves' gradients."""
    single = tmp_path / "single"
    assert main(run_args(tiny_checkpoints, receipts, single)) == 0
    out = tmp_path / "ddp"
    proc = train_subprocess(run_args(tiny_checkpoints, receipts, out, "train.report_to=[tensorboard]",
                                     "data.batch_size=2"), launcher=TWO_PROCESSES)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3  # one line per epoch: only the main process writes
    assert all(m["val_samples"] == 6 and m["world_size"] == 2 for m in lines)  # gathered once per sample
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["test"]["samples"] == 6
    tested = [json.loads(line)["image"] for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert sorted(tested) == sorted(str(p) for p in (receipts / "test").glob("*.jpg"))  # each test image once
    # Tolerance: the two runs sum the same gradients in another order (float32), over 9 Adam steps.
    reference = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip(lines, reference):
        assert got["global_step"] == want["global_step"] and got["val_accuracy"] == want["val_accuracy"]
        assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-4)
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-4)
    ref_weights = safetensors.torch.load_file(single / "final" / "model.safetensors")
    for name, value in safetensors.torch.load_file(out / "final" / "model.safetensors").items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-3, atol=1e-4, msg=name)
    events = EventAccumulator(str(out / "trackers" / out.name), size_guidance={"scalars": 0})
    events.Reload()  # only the main process logs: every step once
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("vision/val/accuracy")] == [
        (m["global_step"], m["val_accuracy"]) for m in lines if m["stage"] == "vision"]
    assert len(list((out / "trackers" / out.name).glob("events.out.tfevents.*"))) == 1
    assert json.loads((out / "results.json").read_text())["test"]["samples"] == 6
    InternVL2MultimodalModel.from_pretrained(out / "final")


def test_augment_options_are_checked():
    assert augment_config({"max_rotation": 0.0, "jpeg_quality": [50, 60]}).jpeg_quality == (50, 60)
    with pytest.raises(ValueError, match=r"data.augment_options: unknown field\(s\) \['rotate'\]"):
        augment_config({"rotate": 3})


def test_resume_runs_no_code_from_a_tampered_checkpoint(tiny_checkpoints, receipts, tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_checkpoints, receipts, out, "train.stages=[{name: a, epochs: 2, lr: 0.001, trainable: [head]}]",
                    "train.keep_last_checkpoints=5")
    assert main(args) == 0
    first, *later = list_checkpoints(out)
    for checkpoint in later:  # resume from the end of epoch 1
        shutil.rmtree(checkpoint)
    pickled = sorted(p.name for p in first.iterdir() if p.suffix in (".bin", ".pkl"))
    assert pickled == ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"]  # nothing of ours is pickled
    pristine = tmp_path / "pristine"
    shutil.copytree(first, pristine)
    marker = tmp_path / "code-ran"
    for name in pickled + ["custom_checkpoint_0.pkl"]:
        shutil.rmtree(first)
        shutil.copytree(pristine, first)
        torch.save(RunsCode(marker), first / name)
        with pytest.raises(SystemExit, match=rf"refusing to resume: .*{name} "):
            main(args + ["--resume"])
        assert not marker.exists(), f"resuming ran code from a tampered {name}"
    shutil.rmtree(first)
    shutil.copytree(pristine, first)
    assert main(args + ["--resume"]) == 0  # the untouched checkpoint resumes


def test_batches_of_only_bad_images_still_step_in_line(tiny_checkpoints, receipts, tmp_path):
    """Every training image is unreadable: each batch runs a zero-loss forward/backward on a blank image
    (what keeps DDP / FSDP collectives in step), the skips are counted, validation and export still work."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(12):
        (bad / f"b{i}.jpg").write_bytes(b"not a jpeg")
    (bad / "metadata.csv").write_text("file_name,label\n" + "".join(f"b{i}.jpg,{i % 3}\n" for i in range(12)))
    out = tmp_path / "run"
    stage = "train.stages=[{name: a, epochs: 2, lr: 0.001, trainable: [head]}]"
    assert main(run_args(tiny_checkpoints, receipts, out, stage, f"data.train={bad}")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["skipped_images"], r["train_loss"], r["global_step"]) for r in rows] == [(12, 0.0, 3), (24, 0.0, 6)]
    assert rows[-1]["val_samples"] == 6
    InternVL2MultimodalModel.from_pretrained(out / "final")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path / "model.safetensors")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_checkpoints_hold_only_what_the_bases_cannot_give_back(tiny_checkpoints, receipts, tmp_path):
    """config/base.yaml's stages, one epoch each (3 steps): align trains projector, fusion, head; vision adds the
    encoder's last stage and final norm; lora adds the LLM's adapters. Each checkpoint holds every tensor that
    came from no base folder plus the base tensors trained so far, never the frozen rest of the LLM or encoder."""
    out = tmp_path / "run"
    assert main(run_args(tiny_checkpoints, receipts, out, "train.save_every_steps=1", "train.keep_last_checkpoints=20",
                         "train.export_dtype=bfloat16")) == 0
    model = build_model(make_config(tiny_checkpoints, "swinv2", "model.vision.image_size=[64, 64]").model)
    full = model.state_dict()
    own = {k for k in full if not k.startswith(("language.", "vision."))}  # projector (not reused), fusion, head
    groups = model.parameter_groups()
    trained_vision = {f"{name}.{k}" for g in ("vision.last_stage", "vision.final_norm") for m in groups[g]
                      for name, mod in model.named_modules() if mod is m for k in m.state_dict()}
    checkpoints = list_checkpoints(out)
    assert set(_weights(checkpoints[2])) == own  # the end of align
    assert set(_weights(checkpoints[5])) == own | trained_vision  # the end of vision
    lora = set(_weights(checkpoints[8])) - own - trained_vision
    assert lora and all("lora_" in k and k.startswith("language.") for k in lora)  # no base_layer weights
    bases = json.loads((checkpoints[0] / "base_checkpoints.json").read_text())
    assert {k: v["folder"] for k, v in bases.items()} == {
        "model.language.checkpoint": str(tiny_checkpoints["internvl2"]),
        "model.vision.checkpoint": str(tiny_checkpoints["swinv2"])}
    assert set(bases["model.vision.checkpoint"]["files"]) == {"config.json", "model.safetensors",
                                                             "preprocessor_config.json"}
    model_bytes = sum(v.numel() * v.element_size() for v in full.values())
    # The whole align checkpoint (model part, Adam moments, scheduler, RNG, progress) against the model alone:
    # measured 1.03 MB against 2.22 MB (about 2.9 MB when checkpoints held the whole model).
    assert _folder_bytes(checkpoints[2]) < 0.5 * model_bytes
    exported = json.loads((out / "final" / "config.json").read_text())
    assert exported["dtype"] == "bfloat16"
    assert 0.45 < (out / "final" / "model.safetensors").stat().st_size / model_bytes < 0.55
    final = InternVL2MultimodalModel.from_pretrained(out / "final")
    assert {p.dtype for p in final.parameters()} == {torch.float32}


def test_resume_after_a_stage_froze_what_the_last_one_trained_is_exact(tiny_checkpoints, receipts, tmp_path):
    """Stage a trains the encoder's last stage (a base tensor), stage b freezes it. A checkpoint inside b holds
    it still, and resuming from there gives the uninterrupted run's weights bit for bit and its losses."""
    out = tmp_path / "run"
    stages = ("train.stages=[{name: a, epochs: 1, lr: 0.001, trainable: [vision.last_stage, head]}, "
              "{name: b, epochs: 2, lr: 0.001, trainable: [fusion, head]}]")
    args = run_args(tiny_checkpoints, receipts, out, stages, "train.save_every_steps=1", "train.keep_last_checkpoints=20")
    assert main(args) == 0
    want = {name: (out / name).read_text() for name in ("metrics.jsonl", "steps.jsonl", "results.json")}
    want_weights = _weights(out / "final")
    checkpoints = list_checkpoints(out)
    initial = build_model(make_config(tiny_checkpoints, "swinv2", "model.vision.image_size=[64, 64]").model)
    last_stage = "vision.backbone.encoder.layers.3.blocks.0.attention.self.query.weight"
    held = _weights(checkpoints[3])  # step 4: the first step of b
    assert not torch.equal(held[last_stage], initial.state_dict()[last_stage])  # trained in a, kept in b
    assert torch.equal(held[last_stage], want_weights[last_stage])
    for checkpoint in checkpoints[4:]:
        shutil.rmtree(checkpoint)
    for name in ("final", "best"):
        shutil.rmtree(out / name)
    assert main(args + ["--resume"]) == 0
    for name, value in _weights(out / "final").items():
        assert torch.equal(value, want_weights[name]), name
    for name, text in want.items():
        assert (out / name).read_text() == text, name


def test_resume_refuses_changed_base_weights_whatever_the_flags(tiny_checkpoints, receipts, tmp_path):
    vision = tmp_path / "swinv2"
    shutil.copytree(tiny_checkpoints["swinv2"], vision)
    out = tmp_path / "run"
    args = run_args(tiny_checkpoints, receipts, out, "train.stages=[{name: a, epochs: 2, trainable: [head]}]",
                    f"model.vision.checkpoint={vision}")  # the later --set wins
    assert main(args) == 0
    shutil.rmtree(list_checkpoints(out)[-1])  # resume from the end of epoch 1
    pristine = {name: (vision / name).read_bytes() for name in ("model.safetensors", "config.json")}
    weights = safetensors.torch.load_file(vision / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0  # the same tensors, names and shapes: only the values differ
    safetensors.torch.save_file(weights, vision / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=rf"model.vision.checkpoint \({vision}\): model.safetensors holds other "
                                         rf"values \(same tensors, data differs\)"):
        main(args + ["--resume", "--allow-config-change"])
    (vision / "model.safetensors").write_bytes(pristine["model.safetensors"])
    config = json.loads(pristine["config.json"])
    (vision / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))
    with pytest.raises(SystemExit, match=r"model.vision.checkpoint .*: config.json has other content"):
        main(args + ["--resume"])
    (vision / "config.json").write_bytes(pristine["config.json"])
    moved = tmp_path / "moved"
    vision.rename(moved)  # the same content elsewhere is the same base (the path change is a config change)
    assert main(args + ["--set", f"model.vision.checkpoint={moved}", "--resume", "--allow-config-change"]) == 0


def test_a_checkpoint_holding_the_whole_model_still_resumes(tiny_checkpoints, receipts, tmp_path, caplog):
    """What checkpoints held before they were lean: the whole model, no base fingerprints."""
    out = tmp_path / "run"
    args = run_args(tiny_checkpoints, receipts, out, "train.stages=[{name: a, epochs: 2, lr: 0.001, trainable: [head]}]")
    assert main(args) == 0
    want = _weights(out / "final")
    first, last = list_checkpoints(out)
    shutil.rmtree(last)
    whole = build_model(make_config(tiny_checkpoints, "swinv2", "model.vision.image_size=[64, 64]").model).state_dict()
    safetensors.torch.save_file({**whole, **_weights(first)}, first / "model.safetensors", metadata={"format": "pt"})
    (first / "base_checkpoints.json").unlink()
    assert main(args + ["--resume"]) == 0
    assert "not checking the base checkpoints" in caplog.text
    for name, value in _weights(out / "final").items():
        assert torch.equal(value, want[name]), name
