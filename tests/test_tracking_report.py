"""Trackers, step logs, the run report and model cards, on a real tiny run."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from models import files
from models.build import build_model
from config import load_config
from data.manifest import load_records
from models.calibration import Calibration, fit_calibration
from models.files import atomic_path, replace_dir, write_json
from models.inference import ReceiptCounter, labelled_logits
from models.metrics import per_source_metrics
from models.internvl2 import InternVL2MultimodalModel
from train.checkpoints import list_checkpoints
from train.plots import COLOURS, nice_ticks
from train.report import confident_mistakes, stage_boundaries, write_report
from train.run import main
from train.tracking import flat_hyperparameters
from tests.conftest import make_config, run_args

TRACKED = ("train.report_to=[tensorboard]", "train.log_every_steps=2", "train.save_every_steps=2",
           "train.keep_last_checkpoints=50", "train.stages.1.max_grad_norm=null")


@pytest.fixture(scope="module")
def tracked_run(tiny_checkpoints, receipts, tmp_path_factory) -> Path:
    """One run of all three stages with TensorBoard on: 3 steps an epoch, 9 steps in all."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    assert main(run_args(tiny_checkpoints, receipts, out, *TRACKED)) == 0
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's TensorBoard folder -> (step, value) pairs, as TensorBoard shows them."""
    events = EventAccumulator(str(run / "trackers" / run.name), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _expected_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What the jsonl files say the trackers should hold."""
    expected: dict[str, list[tuple[int, float]]] = {}

    def add(tag: str, step: int, value: float) -> None:
        expected.setdefault(tag, []).append((step, value))

    for r in _rows(run / "steps.jsonl"):
        add(f"{r['stage']}/train/loss", r["global_step"], r["train_loss"])
        if r["grad_norm"] is not None:
            add(f"{r['stage']}/train/grad_norm", r["global_step"], r["grad_norm"])
        for group, lr in r["lr"].items():
            add(f"{r['stage']}/lr/{group}", r["global_step"], lr)
    for r in _rows(run / "metrics.jsonl"):
        add(f"{r['stage']}/train/epoch_loss", r["global_step"], r["train_loss"])
        add(f"{r['stage']}/skipped_images", r["global_step"], r["skipped_images"])
        for key in ("loss", "accuracy", "macro_f1"):
            add(f"{r['stage']}/val/{key}", r["global_step"], r[f"val_{key}"])
        for name, f1 in r["val_per_class_f1"].items():
            add(f"{r['stage']}/val/f1/{name}", r["global_step"], f1)
    test = json.loads((run / "results.json").read_text())
    for key in ("loss", "accuracy", "macro_f1"):
        add(f"test/{key}", test["global_step"], test["test"][key])
    return expected


def _assert_same_scalars(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # every step once, in order
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-7), tag


def test_tensorboard_events_hold_exactly_the_logged_rows(tracked_run):
    _assert_same_scalars(_scalars(tracked_run), _expected_scalars(tracked_run))
    hparams = list((tracked_run / "trackers" / tracked_run.name).glob("*/hparams.yml"))
    assert len(hparams) == 1
    logged = yaml.safe_load(hparams[0].read_text())
    assert logged["model.vision.encoder"] == "swinv2" and logged["train.stages.1.name"] == "vision"
    assert logged["train.report_to"] == '["tensorboard"]'


def test_step_rows_average_their_window_and_name_every_group(tracked_run):
    steps, epochs = _rows(tracked_run / "steps.jsonl"), _rows(tracked_run / "metrics.jsonl")
    # 3 optimizer steps an epoch, a row at every even step and at each epoch end: 2, 3 | 4, 6 | 8, 9
    assert [r["global_step"] for r in steps] == [2, 3, 4, 6, 8, 9]
    previous = 0
    for epoch in epochs:  # batches are all 4 images: the epoch loss is the step-weighted mean of its windows
        rows = [r for r in steps if r["stage_index"] == epoch["stage_index"]]
        sizes = [b["global_step"] - a for a, b in zip([previous] + [r["global_step"] for r in rows], rows)]
        previous = rows[-1]["global_step"]
        assert sum(sizes) == 3
        mean = sum(r["train_loss"] * n for r, n in zip(rows, sizes)) / 3
        assert epoch["train_loss"] == pytest.approx(mean, rel=1e-9)
    vision = [r for r in steps if r["stage"] == "vision"]
    assert set(vision[0]["lr"]) == {"projector", "fusion", "head", "vision.last_stage", "vision.final_norm"}
    assert vision[0]["lr"]["vision.last_stage"] == pytest.approx(0.01 * vision[0]["lr"]["projector"])
    # stage 1 has no clipping (max_grad_norm null): the norm is still measured
    assert all(r["grad_norm"] > 0 for r in steps)
    assert all("language.lora" in r["lr"] for r in steps if r["stage"] == "lora")


def test_resume_continues_the_tensorboard_run_without_duplicate_steps(tracked_run, tiny_checkpoints, receipts,
                                                                      tmp_path):
    """A run killed right after its step-4 checkpoint (a deterministic kill point: the later checkpoints are
    removed, the later rows, events and exports are left as a kill would leave them) resumes."""
    run = tmp_path / tracked_run.name
    shutil.copytree(tracked_run, run)
    for checkpoint in list_checkpoints(run):
        if int(checkpoint.name[5:]) > 4:
            shutil.rmtree(checkpoint)
    # the copy differs from the original run only in output_dir
    assert main(run_args(tiny_checkpoints, receipts, run, *TRACKED) + ["--resume", "--allow-config-change"]) == 0
    for name in ("metrics.jsonl", "steps.jsonl", "results.json"):  # row-identical to the uninterrupted run
        assert (run / name).read_text() == (tracked_run / name).read_text(), name
    _assert_same_scalars(_scalars(run), _expected_scalars(run))
    assert json.loads((run / "trackers.json").read_text())["run_name"] == tracked_run.name


def test_a_missing_tracker_package_fails_before_anything_runs(tiny_checkpoints, receipts, tmp_path, monkeypatch,
                                                              capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    assert main(run_args(tiny_checkpoints, receipts, out, "train.report_to=[tensorboard, wandb]")) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("config error: train.report_to: 'wandb' needs the wandb package, which is not installed: "
                   "pip install -e .[wandb]")
    assert not out.exists()
    assert main(run_args(tiny_checkpoints, receipts, out, "train.report_to=[tensorbored]")) == 2
    assert "unknown tracker 'tensorbored'; choose from none, aim, clearml" in capsys.readouterr().err
    assert main(run_args(tiny_checkpoints, receipts, out, "train.report_to=[none, tensorboard]")) == 2
    assert "'none' cannot be combined" in capsys.readouterr().err


def test_hyperparameters_are_flat_scalars(tiny_checkpoints):
    flat = flat_hyperparameters(make_config(tiny_checkpoints, "swin"))
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat["train.stages.0.trainable"] == '["projector", "fusion", "head"]'
    assert flat["model.vision.fallback"] == "internvit" and flat["train.stages.0.max_steps"] == "null"


def test_run_report_matches_the_run_files(tracked_run):
    text = (tracked_run / "report.md").read_text()
    results = json.loads((tracked_run / "results.json").read_text())
    assert "Vision encoder actually used: **swinv2** (as requested; no fallback)." in text
    for index, name in enumerate(["align", "vision", "lora"]):
        manifest = json.loads((tracked_run / "stages" / f"{index}-{name}" / "trainable.json").read_text())
        total = f"{manifest['trainable_parameters']:,} of {manifest['total_parameters']:,}"
        assert f"| {index} | {name} | " in text and total in text
    for name, row in zip(["0", "1", "2+"], results["test"]["confusion_matrix"]):
        assert f"| {name} | " + " | ".join(map(str, row)) + " |" in text
    assert f"| {results['test']['accuracy']:.4f} | {results['test']['macro_f1']:.4f} |" in text
    assert "| synthetic | 6 |" in text  # make_receipts writes source=synthetic: per-source metrics
    curves = Image.open(tracked_run / "curves.png").convert("RGB")
    colours = set(curves.get_flattened_data())
    assert curves.size == (1100, 680) and COLOURS[0] in colours and COLOURS[1] in colours
    wrong = sum(r["label"] != max(range(3), key=r["probabilities"].__getitem__)
                for r in _rows(tracked_run / "test_predictions.jsonl"))
    assert (tracked_run / "mistakes.png").is_file() == (wrong > 0)


def test_report_script_rewrites_a_run_and_refuses_a_plain_folder(tracked_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tracked_run, run)
    for name in ("curves.png", "report.md"):
        (run / name).unlink()
    assert set(write_report(run)) >= {"curves", "report"}
    assert (run / "report.md").read_text() == (tracked_run / "report.md").read_text().replace(
        f"# Run report: {tracked_run.name}", "# Run report: copy")
    with pytest.raises(FileNotFoundError, match="config.yaml is missing: .* is not a training run folder"):
        write_report(tmp_path)


def test_confident_mistakes_and_per_source_metrics():
    rows = [{"image": "a", "label": 0, "probabilities": [0.2, 0.7, 0.1], "source": "scans"},
            {"image": "b", "label": 1, "probabilities": [0.1, 0.8, 0.1], "source": "scans"},
            {"image": "c", "label": 2, "probabilities": [0.95, 0.0, 0.05], "source": "photos"},
            {"image": "d", "label": 2, "probabilities": [0.1, 0.1, 0.8], "source": None}]
    mistakes = confident_mistakes(rows, ["0", "1", "2+"])
    assert [(m["image"], m["predicted"]) for m in mistakes] == [("c", 0), ("a", 1)]
    preds = [max(range(3), key=r["probabilities"].__getitem__) for r in rows]
    metrics = per_source_metrics([r["label"] for r in rows], preds, [r["source"] for r in rows], 3)
    assert metrics["scans"]["images"] == 2 and metrics["scans"]["accuracy"] == 0.5
    assert metrics["photos"]["accuracy"] == 0.0 and set(metrics) == {"scans", "photos"}


def test_stage_boundaries_and_ticks():
    rows = [{"stage": "a", "stage_index": 0, "global_step": 3}, {"stage": "b", "stage_index": 1, "global_step": 5},
            {"stage": "b", "stage_index": 1, "global_step": 8}]
    assert stage_boundaries(rows[:1], rows[1:]) == [(0.0, "a"), (3.0, "b")]
    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(1.03, 1.23) == pytest.approx([1.05, 1.1, 1.15, 1.2])


def test_exported_cards_hold_the_encoder_and_the_metrics(tracked_run):
    results = json.loads((tracked_run / "results.json").read_text())
    card = ModelCard.load(tracked_run / "final" / "README.md")
    assert card.data.library_name == "receipt-counter" and card.data.pipeline_tag == "image-classification"
    config = yaml.safe_load((tracked_run / "config.yaml").read_text())
    assert card.data.base_model == [config["model"]["language"]["checkpoint"], config["model"]["vision"]["checkpoint"]]
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"accuracy": round(results["test"]["accuracy"], 4), "f1": round(results["test"]["macro_f1"], 4)}
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert "| vision encoder | `swinv2` |" in card.text and "sources: synthetic 12" in card.text
    assert "**Trained on generated data only**" in card.text and "| lora | " in card.text
    best = ModelCard.load(tracked_run / "best" / "README.md")
    assert {r.dataset_split for r in best.data.eval_results} == {"validation"}


@pytest.mark.parametrize("name", ["best", "final"])
def test_exports_carry_a_temperature_fitted_on_the_validation_split(tracked_run, name):
    config = load_config(tracked_run / "config.yaml")
    folder = tracked_run / name
    recorded = json.loads((folder / "config.json").read_text())
    assert recorded["inference"] == {"uncertain_below": config.inference.uncertain_below}
    calibration = Calibration(**recorded["calibration"])
    assert calibration.fitted and calibration.fitted_on == config.data.val and calibration.num_samples == 6
    assert calibration.nll_after <= calibration.nll_before
    assert f"**T = {calibration.temperature:.4f}**" in (folder / "README.md").read_text()
    # the same fit on the exported model's own predictions for the validation images
    counter = ReceiptCounter.from_pretrained(folder)
    records = load_records(config.data.val, counter.class_names)
    logits, labels = labelled_logits(records, counter.predict([r.path for r in records]))
    assert counter.temperature == pytest.approx(fit_calibration(logits, labels, "again").temperature, rel=1e-3)


def test_from_pretrained_never_reads_the_card(tracked_run, tmp_path):
    folder = tmp_path / "final"
    shutil.copytree(tracked_run / "final", folder)
    x = torch.randn(2, 3, 64, 64)
    expected = InternVL2MultimodalModel.from_pretrained(folder)(x).logits
    (folder / "README.md").write_text("---\n: not yaml [\n---\n")
    torch.testing.assert_close(InternVL2MultimodalModel.from_pretrained(folder)(x).logits, expected)
    (folder / "README.md").unlink()
    torch.testing.assert_close(InternVL2MultimodalModel.from_pretrained(folder)(x).logits, expected)


def test_save_pretrained_outside_training_writes_a_plain_card(tiny_checkpoints, tmp_path):
    model = build_model(make_config(tiny_checkpoints, "swin").model)
    card = ModelCard.load(model.save_pretrained(tmp_path / "m") / "README.md")
    assert card.data.eval_results is None and card.data.pipeline_tag == "image-classification"
    assert "Not recorded: this folder was saved outside a training run." in card.text


def test_atomic_writes_leave_the_old_file_on_error(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"a": 1})
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            1 / 0
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _export(folder: Path, text: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(text)
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_replace_dir_never_leaves_the_folder_missing(tmp_path, monkeypatch):
    best = _export(tmp_path / "best", "0")
    rename = Path.rename

    def guarded(self: Path, target):  # moving the live folder away would open a gap
        assert Path(self) != best, "best/ was renamed away: it would be missing until the next rename"
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", guarded)
    for i in range(1, 4):
        replace_dir(_export(tmp_path / f".best.tmp-{i}", str(i)), best)
        assert (best / "config.json").read_text() == str(i)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_replace_dir_without_an_atomic_exchange_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    best = _export(tmp_path / "best", "old")
    replace_dir(_export(tmp_path / ".new", "new"), best)
    assert (best / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["best"]
    assert "no atomic folder exchange here" in caplog.text
