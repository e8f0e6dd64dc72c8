"""scripts/predict.py: inputs expanded in order, one row per image, error rows, output formats, exit status."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.internvl2 import InternVL2MultimodalModel
from tests.conftest import load_script
from tests.test_inference import draw_image, export_tiny_model

ROOT = Path(__file__).resolve().parents[1]


predict = load_script("predict")


@pytest.fixture(scope="module")
def export(tiny_checkpoints, tmp_path_factory) -> Path:
    return export_tiny_model(tiny_checkpoints, tmp_path_factory.mktemp("predict_cli") / "export")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/a.jpg, root/scans/b.png, root/scans/deep/c.jpg, root/scans/.hidden.jpg, root/notes.txt,
    root/empty_dir/, root/bad/empty.jpg, root/bad/text.png."""
    root = tmp_path_factory.mktemp("tree")
    (root / "scans" / "deep").mkdir(parents=True)
    (root / "empty_dir").mkdir()
    (root / "bad").mkdir()
    draw_image(300, 500, seed=1).save(root / "a.jpg")
    draw_image(400, 300, seed=2).save(root / "scans" / "b.png")
    draw_image(200, 600, seed=3).save(root / "scans" / "deep" / "c.jpg")
    draw_image(50, 50, seed=4).save(root / "scans" / ".hidden.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "text.png").write_text("not an image")
    return root


def run_main(argv: list[str], capsys) -> tuple[int, list[dict], str]:
    code = predict.main(argv)
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_expansion_keeps_input_order_recurses_sorted_and_reports_non_matches(tree):
    inputs = predict.expand_inputs([str(tree / "scans"), str(tree / "missing.jpg"), str(tree / "*.jpg"),
                                    str(tree / "nothing*.png"), str(tree / "empty_dir"), str(tree / "**" / "c.jpg")])
    assert inputs == [
        (str(tree / "scans" / "b.png"), None), (str(tree / "scans" / "deep" / "c.jpg"), None),
        (str(tree / "missing.jpg"), None),  # the loader names it "file not found", in its place
        (str(tree / "a.jpg"), None),
        (str(tree / "nothing*.png"), "glob matched no files"),
        (str(tree / "empty_dir"), inputs[5][1]),
        (str(tree / "scans" / "deep" / "c.jpg"), None),
    ]
    assert inputs[5][1].startswith("no image files")


def test_jsonl_on_stdout_one_row_per_input_and_exit_1_on_any_failure(export, tree, capsys):
    code, rows, err = run_main(["--checkpoint", str(export), "--batch-size", "2", str(tree / "bad"), str(tree / "a.jpg"),
                                str(tree / "missing.jpg"), str(tree / "notes.txt"), str(tree / "zz*.jpg"),
                                str(tree / "scans")], capsys)
    assert code == 1
    assert [r["image"] for r in rows] == [str(tree / "bad" / "empty.jpg"), str(tree / "bad" / "text.png"),
                                          str(tree / "a.jpg"), str(tree / "missing.jpg"), str(tree / "notes.txt"),
                                          str(tree / "zz*.jpg"), str(tree / "scans" / "b.png"),
                                          str(tree / "scans" / "deep" / "c.jpg")]
    errors = [r.get("error") for r in rows]
    assert errors[:2] == ["empty file", "not an image (unrecognised or corrupt header)"]
    assert errors[3:6] == ["file not found", "not an image (unrecognised or corrupt header)", "glob matched no files"]
    for r in (rows[2], rows[6], rows[7]):
        assert set(r) == {"image", "label", "class_index", "probabilities", "uncertain"}
        assert r["label"] == ["0", "1", "2+"][r["class_index"]] and list(r["probabilities"]) == ["0", "1", "2+"]
    assert set(rows[0]) == {"image", "error"}
    assert "3 of 8 image(s) classified, 5 failed" in err and "classifying" in err  # progress on stderr


def test_jsonl_and_csv_files_hold_the_same_answers_and_exit_0(export, tree, tmp_path, capsys):
    inputs = [str(tree / "scans"), str(tree / "a.jpg")]
    assert predict.main(["--checkpoint", str(export), "--output", str(tmp_path / "p.jsonl"), *inputs]) == 0
    assert predict.main(["--checkpoint", str(export), "--output", str(tmp_path / "p.csv"), "--batch-size", "1",
                         *inputs]) == 0
    assert capsys.readouterr().out == ""  # rows went to the files
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    with (tmp_path / "p.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["image", "label", "class_index", "prob_0", "prob_1", "prob_2+", "uncertain", "error"]
    assert [r["image"] for r in rows] == [t["image"] for t in table] == [
        str(tree / "scans" / "b.png"), str(tree / "scans" / "deep" / "c.jpg"), str(tree / "a.jpg")]
    for r, t in zip(rows, table):
        assert t["label"] == r["label"] and int(t["class_index"]) == r["class_index"] and t["error"] == ""
        assert t["uncertain"] == str(r["uncertain"])
        for name, p in r["probabilities"].items():
            assert abs(float(t[f"prob_{name}"]) - p) < 1e-5  # batch 16 (JSONL) vs batch 1 (CSV)


def test_worker_processes_change_nothing_but_speed_and_the_bar_shows_images_per_second(export, tree, capsys):
    inputs = [str(tree / "bad"), str(tree / "scans"), str(tree / "a.jpg"), str(tree / "missing.jpg")]
    code0, rows0, _ = run_main(["--checkpoint", str(export), "--batch-size", "2", "--workers", "0", *inputs], capsys)
    code2, rows2, err = run_main(["--checkpoint", str(export), "--batch-size", "2", "--workers", "2", *inputs], capsys)
    assert code0 == code2 == 1 and rows0 == rows2 and len(rows2) == 6
    assert "img/s" in err


def test_csv_error_rows(export, tree, tmp_path):
    assert predict.main(["--checkpoint", str(export), "--output", str(tmp_path / "p.csv"),
                         str(tree / "missing.jpg")]) == 1
    with (tmp_path / "p.csv").open(newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["image"] == str(tree / "missing.jpg") and row["error"] == "file not found" and row["label"] == ""


def test_usage_and_checkpoint_errors(export, tree, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        predict.main(["--checkpoint", str(export), "--output", str(tmp_path / "p.txt"), str(tree / "a.jpg")])
    assert exc.value.code == 2 and "--output must end in .jsonl or .csv" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(tmp_path / "nowhere"), str(tree / "a.jpg")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", str(export), "--workers", "-1", str(tree / "a.jpg")])
    assert "--workers must be >= 0" in capsys.readouterr().err


def test_command_line_run(export, tree):
    """The script as a user runs it: a real process, its stdout, stderr and exit status."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--checkpoint", str(export),
                           "--device", "cpu", str(tree / "a.jpg"), str(tree / "scans" / "b.png")],
                          capture_output=True, text=True, timeout=120, cwd=tree)  # outside the repo
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(tree / "a.jpg"), str(tree / "scans" / "b.png")]
    assert "2 of 2 image(s) classified, 0 failed" in done.stderr



def test_a_bfloat16_export_predicts_kept_in_bfloat16(export, tree, tmp_path, capsys):
    half = InternVL2MultimodalModel.from_pretrained(export).save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    _, want, _ = run_main(["--checkpoint", str(export), str(tree / "a.jpg")], capsys)
    code, rows, _ = run_main(["--checkpoint", str(half), "--dtype", "auto", str(tree / "a.jpg")], capsys)
    assert code == 0
    # bfloat16 weights and arithmetic: the tolerance of tests/test_inference.py
    assert all(abs(rows[0]["probabilities"][k] - p) < 0.02 for k, p in want[0]["probabilities"].items())


def test_uncertain_below_on_the_command_line_overrides_the_export(export, tree, capsys):
    inputs = [str(tree / "a.jpg"), str(tree / "scans")]
    _, rows, _ = run_main(["--checkpoint", str(export), *inputs], capsys)
    tops = [max(r["probabilities"].values()) for r in rows]
    assert [r["uncertain"] for r in rows] == [t < 0.5 for t in tops]  # the export's inference.uncertain_below
    cut = sorted(tops)[1]  # the flag flips here: the lowest row is below it, a row at it is not
    _, rows, _ = run_main(["--checkpoint", str(export), "--uncertain-below", repr(cut), *inputs], capsys)
    assert [r["uncertain"] for r in rows] == [t < cut for t in tops] and sum(r["uncertain"] for r in rows) == 1
    for threshold, flagged in (("0", 0), ("1", 3)):
        _, rows, _ = run_main(["--checkpoint", str(export), "--uncertain-below", threshold, *inputs], capsys)
        assert sum(r["uncertain"] for r in rows) == flagged
    with pytest.raises(SystemExit) as exc:
        predict.main(["--checkpoint", str(export), "--uncertain-below", "1.5", *inputs])
    assert exc.value.code == 2
    assert "argument --uncertain-below: expected a probability in [0, 1], got '1.5'" in capsys.readouterr().err
