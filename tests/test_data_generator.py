"""The synthetic generator: deterministic for a seed whatever the worker count, balanced, disjoint."""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageOps

from data.manifest import load_records
from data.synth import camera, paper
from data.synth import scene as scene_module
from data.synth.scene import FRAMINGS, receipt_count, render_scene

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_receipts.py"
CLASSES = ["0", "1", "2+"]
ARGS = ["--train", "9", "--val", "3", "--test", "3", "--seed", "11", "--size", "96"]


@functools.cache
def _script():
    """scripts/make_receipts.py as a module (registered, as dataclasses and pickling need)."""
    spec = importlib.util.spec_from_file_location("make_receipts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one_worker")
    _script().main(["--out", str(out), "--workers", "1", *ARGS])
    return out


def _digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _rows(out: Path, split: str) -> list[dict[str, str]]:
    with (out / split / "metadata.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_with_two_workers_writes_the_same_bytes(one_worker: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--workers", "2", *ARGS],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "15 images at 96px with 2 worker(s)" in result.stdout
    assert _digests(tmp_path) == _digests(one_worker)


def test_layout_and_metadata(one_worker: Path) -> None:
    assert (one_worker / "contact_sheet.png").is_file()
    with Image.open(one_worker / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG"
    for split, n in [("train", 9), ("val", 3), ("test", 3)]:
        rows = _rows(one_worker, split)
        assert list(rows[0]) == ["file_name", "receipt_count", "label", "label_name", "question", "source",
                                 "framing", "source_files"]
        assert len(rows) == n and len(list((one_worker / split).glob("*.jpg"))) == n
        for row in rows:
            count, label = int(row["receipt_count"]), int(row["label"])
            assert label == min(count, 2) and row["label_name"] == CLASSES[label]
            assert count <= 12 and row["source"] == "synthetic" and row["source_files"] == ""
            assert row["framing"] in FRAMINGS
            with Image.open(one_worker / split / row["file_name"]) as image:
                assert (image.format, max(image.size), image.mode) == ("JPEG", 96, "RGB")
        records = load_records(one_worker / split, CLASSES)
        assert len(records) == n and {r.data_source for r in records} == {"synthetic"}


def test_classes_are_balanced_in_every_split(one_worker: Path) -> None:
    for split in ("train", "val", "test"):
        labels = [int(row["label"]) for row in _rows(one_worker, split)]
        per_class = [labels.count(k) for k in range(3)]
        assert max(per_class) - min(per_class) <= 1, (split, per_class)


def test_splits_are_disjoint(one_worker: Path) -> None:
    digests = {}
    for split in ("train", "val", "test"):
        for path in (one_worker / split).glob("*.jpg"):
            digests.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), set()).add(split)
    assert all(len(splits) == 1 for splits in digests.values())
    assert len(digests) == 15


def test_plan_is_balanced_and_depends_on_the_seed() -> None:
    script = _script()
    plan = script.plan_split(0, "train", 301, 3)
    assert [plan.count(k) for k in range(3)] == [101, 100, 100]
    assert plan != script.plan_split(1, "train", 301, 3)
    assert script.image_seed(0, "train", 4) != script.image_seed(0, "val", 4)


def test_last_class_counts_span_two_to_max_receipts() -> None:
    counts = [receipt_count(random.Random(i), 2, 3, 12) for i in range(400)]
    assert set(counts) == set(range(2, 13))
    assert counts.count(2) > counts.count(12)  # weighted towards fewer
    assert {receipt_count(random.Random(i), label, 3, 12) for i in range(50) for label in (0, 1)} == {0, 1}


def test_scene_is_deterministic_for_its_rng() -> None:
    first = render_scene(random.Random(5), 128, 2)
    again = render_scene(random.Random(5), 128, 2)
    other = render_scene(random.Random(6), 128, 2)
    assert first.image.tobytes() == again.image.tobytes() and first.quality == again.quality
    assert first.image.tobytes() != other.image.tobytes()
    assert max(first.image.size) == 128 and first.image.mode == "RGB"
    assert first.receipt_count >= 2 and first.framing in FRAMINGS and first.sources == ()


@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("label", [0, 1, 2])
def test_every_framing_draws_every_class(framing: str, label: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scene_module, "FRAMINGS", {framing: 1.0})
    scene = render_scene(random.Random(label), 96, label)
    assert scene.framing == framing and min(scene.receipt_count, 2) == label
    assert max(scene.image.size) == 96 and min(scene.image.size) >= 8


def test_a_close_crop_shows_a_window_of_a_sheet_taller_than_the_frame() -> None:
    scene = Image.new("RGB", (60, 100), (0, 0, 0))
    tall = Image.new("RGBA", (40, 300), (255, 255, 255, 255))
    for seed in range(5):
        frame = scene.copy()
        scene_module._paste_window(random.Random(seed), frame, tall, shadow=0.0, light=(0.0, 1.0), left=10)
        column = frame.crop((10, 0, 50, 100))
        assert column.getextrema() == ((255, 255),) * 3  # paper in every row: its edges are out of frame
    short = Image.new("RGBA", (40, 30), (255, 255, 255, 255))
    frame = scene.copy()
    scene_module._paste_window(random.Random(0), frame, short, shadow=0.0, light=(0.0, 1.0), left=10)
    assert frame.convert("L").histogram()[255] == 40 * 30  # a shorter sheet lies whole inside the frame


def test_document_mode_scans_are_grey_with_white_paper(monkeypatch: pytest.MonkeyPatch) -> None:
    page = Image.new("RGB", (64, 96), (236, 232, 225))
    page.paste((120, 110, 100), (10, 20, 50, 24))  # a line of print
    monkeypatch.setattr(camera, "DOCUMENT_MODE_SHARE", 1.0)
    scanned = camera.scan_finish(random.Random(3), page)
    r, g, b = scanned.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()  # black and white, whatever the paper's tint
    grey = scanned.convert("L")
    assert grey.histogram()[255] > 0.9 * (64 * 96 - 40 * 4)  # the paper clipped to pure white
    assert grey.getpixel((30, 22)) < 60  # the print pushed towards black
    monkeypatch.setattr(camera, "DOCUMENT_MODE_SHARE", 0.0)
    assert camera.scan_finish(random.Random(3), page).convert("L").histogram()[255] == 0  # colour scans keep the tint


@pytest.mark.parametrize("kind", paper.DOCUMENT_KINDS)
def test_every_document_kind_is_an_a4_page_and_office_papers_are_typed_down_the_page(kind: str) -> None:
    page = paper._page(random.Random(4), kind)
    assert page.size == (paper.PAPER_WIDTH_DOC, round(paper.PAPER_WIDTH_DOC * paper.A4_RATIO))
    assert page.tobytes() == paper._page(random.Random(4), kind).tobytes()  # deterministic for its rng
    ink = page.convert("L").point(lambda v: 255 if v < 128 else 0)
    rows = [ink.crop((0, y, page.width, y + 30)).getbbox() is not None for y in range(0, page.height - 30, 30)]
    if kind == "blank":
        assert ink.getbbox() is None or sum(rows) <= 2
    elif kind in ("typed_form", "memo"):  # print from the heading to the last third, as archived forms are
        assert rows[0] and sum(rows[: 2 * len(rows) // 3]) >= 0.8 * (2 * len(rows) // 3)
    else:
        assert sum(rows) >= 3


def test_handwriting_stays_in_its_box_and_leaves_ink() -> None:
    for seed in range(6):
        sheet = Image.new("L", (200, 60), 255)
        paper.handwriting(random.Random(seed), ImageDraw.Draw(sheet), (30, 20), width=120, height=16, ink=0)
        left, top, right, bottom = ImageOps.invert(sheet).getbbox()
        radius = 16 * 0.3  # the pen's loops reach a radius (and an ascender 1.6 radii) past the word's line
        assert 30 - radius - 1 <= left and right <= 30 + 120 + 2 * radius + 1
        assert 20 + 8 - 1.6 * radius - 1 <= top and bottom <= 20 + 8 + 1.6 * radius + 2
        assert right - left > 40  # more than one short word


def test_a_stamp_inks_a_patch_round_its_centre_and_the_print_shows_through() -> None:
    white = Image.new("RGB", (160, 160), (255, 255, 255))
    for seed in range(6):
        sheet = white.copy()
        sheet.paste((0, 0, 0), (0, 78, 160, 82))  # a line of print across the stamp's place
        before = sheet.copy()
        paper.stamp(random.Random(seed), sheet, centre=(80, 80), width=60)
        left, top, right, bottom = ImageChops.difference(sheet, before).getbbox()
        reach = 60 * 0.75  # half the stamp's diagonal, turned any way
        assert 80 - reach <= left and right <= 80 + reach and 80 - reach <= top and bottom <= 80 + reach
        assert ImageChops.darker(sheet, before).tobytes() == sheet.tobytes()  # ink only darkens
        assert sheet.crop((0, 78, 160, 82)).getextrema() == ((0, 0),) * 3  # the print is still black


def test_rerun_with_fewer_images_leaves_no_stale_files(tmp_path: Path) -> None:
    script = _script()
    script.main(["--out", str(tmp_path), "--train", "4", "--seed", "1", "--size", "64", "--workers", "1",
                 "--no-contact-sheet"])
    script.main(["--out", str(tmp_path), "--train", "2", "--seed", "1", "--size", "64", "--workers", "1",
                 "--no-contact-sheet", "--question", "How many receipts?"])
    assert sorted(p.name for p in (tmp_path / "train").glob("*.jpg")) == ["train_000000.jpg", "train_000001.jpg"]
    assert {row["question"] for row in _rows(tmp_path, "train")} == {"How many receipts?"}
