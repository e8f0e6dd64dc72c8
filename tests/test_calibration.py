"""Temperature scaling: the fit against a grid search, T through an export and back, legacy exports,
scripts/calibrate.py (atomic rewrite, one-line errors), and the `uncertain` threshold from config."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from config import load_config
from config.schema import InferenceConfig
from models.build import build_model
from models.calibration import (MIN_TEMPERATURE, Calibration, fit_calibration, fit_temperature,
                                negative_log_likelihood, scaled_probabilities)
from models.inference import ReceiptCounter
from models.internvl2 import write_calibration
from models.metrics import expected_calibration_error
from tests.conftest import REPO, load_script, make_config, run_args
from tests.test_inference import draw_image, export_tiny_model
from train.run import main as train_main

calibrate = load_script("calibrate")


def overconfident(n: int = 600, sharpness: float = 4.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `sharpness` times too large: labels are drawn from softmax(base), the model reports sharpness x base."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, generator=g, dtype=torch.float64) * 1.5
    labels = torch.multinomial(base.softmax(-1), 1, generator=g).squeeze(1)
    return base * sharpness, labels


def test_fitted_temperature_lowers_the_nll_and_matches_a_grid_search():
    logits, labels = overconfident()
    temperature = fit_temperature(logits, labels)
    grid = torch.exp(torch.linspace(math.log(0.1), math.log(20.0), 4001, dtype=torch.float64)).tolist()
    best = min(grid, key=lambda t: negative_log_likelihood(logits, labels, t))
    assert temperature == pytest.approx(best, rel=2e-3)  # one grid step is 0.13 %
    assert temperature == pytest.approx(4.0, rel=0.15)  # the sharpness the logits were given
    cal = fit_calibration(logits, labels, fitted_on="toy")
    assert cal.temperature == temperature and cal.fitted and cal.num_samples == 600
    assert cal.nll_after < cal.nll_before - 0.3 and cal.ece_after < cal.ece_before / 2
    assert cal.nll_before == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert fit_temperature(logits, labels) == temperature  # deterministic
    # an under-confident model is sharpened, and the argmax never moves
    assert fit_temperature(logits / 16, labels) == pytest.approx(temperature / 16, rel=1e-3)
    assert torch.equal(scaled_probabilities(logits, temperature).argmax(1), logits.argmax(1))


def test_fit_edge_cases_and_errors():
    separable = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # all right: the likelihood wants T -> 0
    assert MIN_TEMPERATURE <= fit_temperature(separable, torch.tensor([0, 1])) < 1.0
    assert fit_temperature(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])) == 1.0  # no signal: stays at 1
    with pytest.raises(ValueError, match="no samples"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \(N, num_classes\) for 3 targets"):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


@pytest.fixture(scope="module")
def export(tiny_checkpoints, tmp_path_factory) -> Path:
    return export_tiny_model(tiny_checkpoints, tmp_path_factory.mktemp("calibration") / "export")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("calibration_images")
    paths = [root / f"im{i}.png" for i in range(6)]
    for i, path in enumerate(paths):
        draw_image(200 + 30 * i, 300 - 20 * i, seed=40 + i).save(path)
    return paths


def copy_export(export: Path, to: Path) -> Path:
    shutil.copytree(export, to)
    return to


def test_temperature_is_written_read_back_and_divides_the_logits(export, images, tmp_path):
    folder = copy_export(export, tmp_path / "scaled")
    recorded = Calibration(temperature=2.5, fitted=True, fitted_on="somewhere.csv", num_samples=6,
                           nll_before=1.0, nll_after=0.9, ece_before=0.3, ece_after=0.1)
    write_calibration(folder, recorded)
    assert json.loads((folder / "config.json").read_text())["calibration"] == recorded.to_dict()
    assert "**T = 2.5000**, fitted on `somewhere.csv`" in (folder / "README.md").read_text()
    plain, scaled = ReceiptCounter.from_pretrained(export), ReceiptCounter.from_pretrained(folder)
    assert plain.temperature == 1.0 and scaled.calibration == recorded
    before, after = plain.predict(images), scaled.predict(images)
    logits = torch.tensor([p.logits for p in before])
    assert torch.equal(logits, torch.tensor([p.logits for p in after]))  # same model, only the softmax differs
    got = torch.tensor([list(p.probabilities.values()) for p in after])
    torch.testing.assert_close(got, (logits / 2.5).softmax(-1), rtol=0, atol=1e-7)
    torch.testing.assert_close(torch.tensor([list(p.probabilities.values()) for p in before]), logits.softmax(-1),
                               rtol=0, atol=1e-7)
    assert [p.class_index for p in before] == [p.class_index for p in after]


def test_an_export_without_the_fields_reads_as_t_1_not_fitted(export, images, tmp_path):
    legacy = copy_export(export, tmp_path / "legacy")
    config = json.loads((legacy / "config.json").read_text())
    del config["calibration"], config["inference"]
    (legacy / "config.json").write_text(json.dumps(config))
    counter = ReceiptCounter.from_pretrained(legacy)
    assert counter.calibration == Calibration() and counter.temperature == 1.0 and not counter.calibration.fitted
    assert counter.uncertain_below == InferenceConfig().uncertain_below
    new = ReceiptCounter.from_pretrained(export).predict(images)
    assert [p.probabilities for p in counter.predict(images)] == [p.probabilities for p in new]


@pytest.mark.parametrize("field, value, message", [
    ("calibration", {"temperature": 0.0}, r"config.json: calibration.temperature must be a finite number > 0, got 0.0"),
    ("calibration", {"temperatur": 2.0}, r"config.json: calibration.temperatur: unknown key; did you mean "
                                         r"calibration.temperature\?"),
    ("inference", {"uncertain_below": 1.5}, r"config.json: inference.uncertain_below must be a probability in "
                                            r"\[0, 1\], got 1.5"),
])
def test_a_bad_field_names_the_file_the_key_and_the_value(export, tmp_path, field, value, message):
    folder = copy_export(export, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=message) as exc:
        ReceiptCounter.from_pretrained(folder)
    assert str(folder / "config.json") in str(exc.value)


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("file_name", "label"), *rows])
    return path


def test_calibrate_script_fits_on_the_users_images_and_rewrites_the_export(export, images, tmp_path, capsys):
    folder = copy_export(export, tmp_path / "export")
    manifest = write_manifest(images[0].parent / "labels.csv",
                              [(p.name, ["0", "1", "2+"][i % 3]) for i, p in enumerate(images)])
    predictions = ReceiptCounter.from_pretrained(folder).predict(images)
    want = fit_calibration(torch.tensor([p.logits for p in predictions]), torch.tensor([i % 3 for i in range(6)]),
                           fitted_on=str(manifest))
    assert calibrate.main(["--checkpoint", str(folder), "--data", str(manifest), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"temperature 1.0000 -> {want.temperature:.4f} (fitted on 6 images)" in out
    assert f"ECE {want.ece_before:.4f} before temperature scaling (T = 1), {want.ece_after:.4f} after" in out
    recorded = json.loads((folder / "config.json").read_text())["calibration"]
    assert recorded == pytest.approx(want.to_dict())
    assert ReceiptCounter.from_pretrained(folder).temperature == pytest.approx(want.temperature)
    card = (folder / "README.md").read_text()
    assert card.count("## Calibration") == 1 and f"**T = {want.temperature:.4f}**" in card
    assert "Not calibrated" not in card and card.index("## Calibration") < card.index("## Intended use and limits")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in export.iterdir())  # no leftovers


def test_calibrate_never_leaves_a_half_written_config(export, images, tmp_path, monkeypatch):
    folder = copy_export(export, tmp_path / "export")
    manifest = write_manifest(images[0].parent / "labels2.csv", [(p.name, "1") for p in images])
    before = (folder / "config.json").read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # the rename into place fails: the old file must stay whole
    with pytest.raises(OSError, match="disk full"):
        calibrate.main(["--checkpoint", str(folder), "--data", str(manifest), "--device", "cpu"])
    assert (folder / "config.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in export.iterdir())  # temp file gone


def test_calibrate_errors_are_one_line_naming_the_file(export, images, tmp_path, capsys):
    bad = write_manifest(images[0].parent / "bad.csv", [(images[0].name, "1"), (images[1].name, "seven")])
    assert calibrate.main(["--checkpoint", str(export), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot load manifest {bad}: ")
    assert f"{bad}:3: unknown label 'seven'" in err
    assert calibrate.main(["--checkpoint", str(export), "--data", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'none.csv'}: no such manifest file or folder" in err
    assert calibrate.main(["--checkpoint", str(tmp_path), "--data", str(bad)]) == 2
    assert "error: cannot load checkpoint: " in capsys.readouterr().err


def test_the_uncertain_threshold_comes_from_the_config_and_is_recorded(tiny_checkpoints, export, images, tmp_path):
    config = make_config(tiny_checkpoints, "swin", "inference.uncertain_below=0.9")
    folder = build_model(config.model).save_pretrained(tmp_path / "strict", inference=config.inference)
    assert json.loads((folder / "config.json").read_text())["inference"] == {"uncertain_below": 0.9}
    assert "below 0.9 is flagged `uncertain`" in (folder / "README.md").read_text()
    counter = ReceiptCounter.from_pretrained(folder)
    assert counter.uncertain_below == 0.9
    top = [max(p.probabilities.values()) for p in counter.predict(images)]
    assert [p.uncertain for p in counter.predict(images)] == [t < 0.9 for t in top]
    # the flag flips exactly at the threshold: a top probability equal to it is not uncertain
    p0 = ReceiptCounter.from_pretrained(export).predict(images[:1])[0]
    top0 = max(p0.probabilities.values())
    assert ReceiptCounter.from_pretrained(export, uncertain_below=top0).predict(images[:1])[0].uncertain is False
    above = math.nextafter(top0, 1.0)
    assert ReceiptCounter.from_pretrained(export, uncertain_below=above).predict(images[:1])[0].uncertain is True
    with pytest.raises(ValueError, match=r"inference.uncertain_below must be a probability in \[0, 1\], got 1.5"):
        build_model(config.model).save_pretrained(tmp_path / "bad", inference=InferenceConfig(uncertain_below=1.5))


def test_training_refuses_a_threshold_outside_0_1(tiny_checkpoints, receipts, tmp_path, capsys):
    args = run_args(tiny_checkpoints, receipts, tmp_path / "run", "inference.uncertain_below=-0.1")
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "config error: inference.uncertain_below must be a probability in [0, 1], got -0.1" in err
    assert load_config(REPO / "config" / "base.yaml").inference.uncertain_below == 0.5
