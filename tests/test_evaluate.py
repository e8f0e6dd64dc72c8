"""Metrics against hand-computed values, and scripts/evaluate.py end to end on a tiny exported model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.calibration import Calibration
from models.inference import ReceiptCounter
from models.internvl2 import write_calibration
from models.metrics import (accuracy, classification_report, confusion_matrix, expected_calibration_error,
                            macro_f1, per_class_scores)
from tests.test_inference import draw_image, export_tiny_model
from tests.conftest import load_script

evaluate = load_script("evaluate")

# targets / predictions of six samples; confusion [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
TARGETS, PREDS = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2]


def test_confusion_matrix_and_accuracy():
    assert confusion_matrix(TARGETS, PREDS, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert accuracy(TARGETS, PREDS) == pytest.approx(4 / 6)
    assert accuracy(torch.tensor(TARGETS), torch.tensor(PREDS)) == pytest.approx(4 / 6)  # tensors or lists
    assert accuracy([], []) == 0.0 and confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="6 targets but 5 predictions"):
        accuracy(TARGETS, PREDS[:5])
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_per_class_scores_and_macro_f1():
    s = per_class_scores(confusion_matrix(TARGETS, PREDS, 3))
    torch.testing.assert_close(s.precision, torch.tensor([1 / 2, 2 / 3, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s.recall, torch.tensor([1 / 2, 1.0, 1 / 2], dtype=torch.float64))
    torch.testing.assert_close(s.f1, torch.tensor([1 / 2, 0.8, 2 / 3], dtype=torch.float64))
    assert s.support.tolist() == [2, 2, 2]
    assert macro_f1(TARGETS, PREDS, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_macro_f1_when_a_class_is_absent():
    # classes 2 and 3 occur nowhere: left out of the mean, not counted as F1 = 0
    assert macro_f1([0, 0, 1], [0, 1, 1], 4) == pytest.approx(2 / 3)
    # class 1 predicted but never true: precision 0 and recall 0 (not NaN), F1 0, and it counts
    assert macro_f1([0, 0], [0, 1], 3) == pytest.approx((2 / 3 + 0) / 2)
    s = per_class_scores(confusion_matrix([0, 0], [0, 1], 3))
    assert not torch.isnan(s.precision).any() and s.precision.tolist() == [1.0, 0.0, 0.0]
    assert macro_f1([], [], 3) == 0.0
    assert macro_f1([1, 1], [1, 1], 3) == 1.0


def test_expected_calibration_error_hand_computed():
    # confidences 0.9 (right), 0.6 (wrong), 0.7 (right), 0.34 (right), each alone in its 1/15-wide bin
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.34, 0.33, 0.33]])
    assert expected_calibration_error(probs, [0, 1, 1, 0]) == pytest.approx((0.1 + 0.6 + 0.3 + 0.66) / 4)
    # 0.9 and 0.88 share the bin (13/15, 14/15]: accuracy 0.5 vs mean confidence 0.89
    assert expected_calibration_error(torch.tensor([[0.9, 0.1], [0.88, 0.12]]), [0, 1]) == pytest.approx(0.39)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), [0]) == 0.0  # confidence 1 is in the last bin
    assert expected_calibration_error(torch.zeros(0, 3), []) == 0.0
    with pytest.raises(ValueError, match="probabilities must be"):
        expected_calibration_error(torch.zeros(3, 2), [0, 1])


def test_classification_report_is_json_ready():
    probs = torch.eye(3)[PREDS] * 0.8 + 0.2 / 3
    report = classification_report(TARGETS, probs, ["0", "1", "2+"])
    assert json.loads(json.dumps(report)) == report
    assert report["accuracy"] == pytest.approx(4 / 6) and report["macro_f1"] == pytest.approx(0.65555555)
    assert report["per_class"]["1"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                        "support": 2}
    assert report["confusion_matrix"]["counts"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


@pytest.fixture(scope="module")
def export(tiny_checkpoints, tmp_path_factory) -> Path:
    return export_tiny_model(tiny_checkpoints, tmp_path_factory.mktemp("evaluate") / "export")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A CSV manifest of 8 drawn images (labels spread over the classes) and one corrupt file."""
    root = tmp_path_factory.mktemp("eval_data")
    rows = []
    for i in range(8):
        draw_image(240 + 40 * i, 400 - 20 * i, seed=10 + i).save(root / f"im{i}.jpg")
        rows.append((f"im{i}.jpg", ["0", "1", "2+"][i % 3]))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG body")
    rows.append(("broken.jpg", "1"))
    with (root / "metadata.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("file_name", "label"), *rows])
    return root / "metadata.csv"


def test_evaluate_writes_metrics_png_and_misclassified(export, dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(export), "--data", str(dataset), "--out", str(out),
                          "--batch-size", "3"]) == 0
    assert "accuracy" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    names = ["0", "1", "2+"]
    # the same predictions through the API, counted by hand
    paths = [dataset.parent / f"im{i}.jpg" for i in range(8)]
    labels = [i % 3 for i in range(8)]
    preds = [p.class_index for p in ReceiptCounter.from_pretrained(export).predict(paths)]
    counts = [[sum(1 for t, p in zip(labels, preds) if (t, p) == (i, j)) for j in range(3)] for i in range(3)]
    assert metrics["confusion_matrix"]["counts"] == counts
    assert metrics["num_samples"] == 8 and metrics["accuracy"] == pytest.approx(sum(counts[k][k] for k in range(3)) / 8)
    assert metrics["macro_f1"] == pytest.approx(macro_f1(labels, preds, 3))
    assert 0.0 <= metrics["ece"] <= 1.0 and metrics["ece_bins"] == 15
    assert set(metrics["per_class"]) == set(names)
    assert metrics["encoder"] == "swin" and metrics["requested_encoder"] == "swin" and metrics["fallback_cause"] is None
    assert metrics["num_failed"] == 1 and metrics["failed"][0]["image"].endswith("broken.jpg")

    with (out / "misclassified.csv").open(newline="") as handle:
        wrong = list(csv.DictReader(handle))
    assert len(wrong) == metrics["num_misclassified"] == sum(t != p for t, p in zip(labels, preds))
    if wrong:
        assert list(wrong[0]) == ["image", "true", "predicted", "prob_0", "prob_1", "prob_2+"]
        assert wrong[0]["true"] != wrong[0]["predicted"]

    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.size == evaluate.confusion_image_size(3)
        low, high = png.convert("L").getextrema()
        assert low < 64 and high > 240  # dark text/cells on a white page, not a blank image


def test_confusion_picture_scales_with_classes_and_fits_long_names():
    names = ["no receipt at all, only letters", "1", "2", "3", "4+"]
    counts = [[5, 1, 0, 0, 0], [0, 3, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 2, 0], [0, 0, 0, 0, 7]]
    image = evaluate.draw_confusion_matrix(counts, names, "Confusion matrix, accuracy 89.5%")
    assert image.size == evaluate.confusion_image_size(5) and image.mode == "RGB"


def test_evaluate_errors_name_the_problem(export, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(export), "--data", str(tmp_path / "none.csv")]) == 2
    assert "cannot load manifest" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path), "--data", str(tmp_path / "none.csv")]) == 2
    assert "config.json is missing" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sourced(tmp_path_factory) -> Path:
    """A manifest with a `source` column: 4 scans, 3 photos, 1 row without a source, and a broken scan."""
    root = tmp_path_factory.mktemp("sourced")
    rows = []
    for i, source in enumerate(["scans"] * 4 + ["photos"] * 3 + [""]):
        draw_image(260 + 30 * i, 380 - 25 * i, seed=60 + i).save(root / f"im{i}.png")
        rows.append((f"im{i}.png", ["0", "1", "2+"][i % 3], source))
    (root / "broken.png").write_bytes(b"not a PNG")
    rows.append(("broken.png", "0", "scans"))
    with (root / "metadata.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("file_name", "label", "source"), *rows])
    return root / "metadata.csv"


def test_evaluate_reports_per_source_calibration_and_coverage(export, sourced, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    write_calibration(folder, Calibration(temperature=2.0, fitted=True, fitted_on="val.csv", num_samples=9))
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(folder), "--data", str(sourced), "--out", str(out),
                          "--uncertain-below", "0.4"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    # the same images through the API, uncalibrated: the script's figures, computed by hand
    predictions = ReceiptCounter.from_pretrained(export).predict([sourced.parent / f"im{i}.png" for i in range(8)])
    labels = torch.tensor([i % 3 for i in range(8)])
    logits = torch.tensor([p.logits for p in predictions])
    preds = logits.argmax(1)
    correct = (preds == labels).tolist()
    calibrated = (logits / 2).softmax(-1)  # per-source ECE is of the probabilities the rows carry
    assert metrics["per_source"] == {
        "photos": {"images": 3, "accuracy": pytest.approx(sum(correct[4:7]) / 3),
                   "macro_f1": pytest.approx(macro_f1(labels[4:7], preds[4:7], 3)),
                   "ece": pytest.approx(expected_calibration_error(calibrated[4:7], labels[4:7]))},
        "scans": {"images": 4, "accuracy": pytest.approx(sum(correct[:4]) / 4),
                  "macro_f1": pytest.approx(macro_f1(labels[:4], preds[:4], 3)),
                  "ece": pytest.approx(expected_calibration_error(calibrated[:4], labels[:4]))}}  # the broken scan left out
    assert "| scans | 4 |" in printed and "| photos | 3 |" in printed
    calibration = metrics["calibration"]
    assert calibration["temperature"] == 2.0 and calibration["fitted"] and calibration["fitted_on"] == "val.csv"
    assert calibration["ece_before"] == pytest.approx(expected_calibration_error(logits.softmax(-1), labels))
    assert calibration["ece_after"] == pytest.approx(expected_calibration_error((logits / 2).softmax(-1), labels))
    assert metrics["ece"] == pytest.approx(calibration["ece_after"])  # the probabilities predictions carry
    assert f"ECE {calibration['ece_before']:.4f} before temperature scaling (T = 1)" in printed
    top = (logits / 2).softmax(-1).max(1).values
    flagged = top < 0.4
    assert metrics["uncertainty"] == {
        "uncertain_below": 0.4, "num_uncertain": int(flagged.sum()),
        "coverage": pytest.approx(1 - flagged.double().mean().item()),
        "confident_accuracy": pytest.approx(accuracy(labels[~flagged], preds[~flagged]))}
    assert f"uncertain (top probability < 0.4): {int(flagged.sum())} of 8" in printed


def test_evaluate_without_a_source_column_has_no_per_source_table(export, dataset, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(export), "--data", str(dataset), "--out", str(tmp_path)]) == 0
    assert "per source" not in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["per_source"] == {} and metrics["uncertainty"]["uncertain_below"] == 0.5
    assert metrics["calibration"]["fitted"] is False and metrics["calibration"]["temperature"] == 1.0
    assert metrics["calibration"]["ece_before"] == metrics["calibration"]["ece_after"] == pytest.approx(metrics["ece"])
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(export), "--data", str(dataset), "--uncertain-below", "2"])
    assert "--uncertain-below: expected a probability in [0, 1], got '2'" in capsys.readouterr().err
