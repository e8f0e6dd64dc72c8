"""Composing scenes from a user's real images (make_receipts.py --receipts/--documents/--backgrounds):
crops, disjoint splits, bad files skipped and counted, the sources recorded per image."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from data.synth.real import RealSources, paper_box
from tests.conftest import load_script


def _script():
    return load_script("make_receipts")


def _photo(path: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (120, 160)) -> None:
    """A dark table with a white sheet at `box`."""
    image = Image.new("RGB", size, (60, 40, 30))
    ImageDraw.Draw(image).rectangle(box, fill=(245, 245, 240))
    image.save(path)


@pytest.fixture()
def folders(tmp_path: Path) -> dict[str, Path]:
    receipts, documents = tmp_path / "receipts", tmp_path / "documents"
    receipts.mkdir()
    documents.mkdir()
    for i in range(12):
        _photo(receipts / f"r{i:02d}.jpg", (30, 20, 80, 150))
    (receipts / "r00.yolo.txt").write_text("0 0.5 0.5 0.5 0.25\n")
    (receipts / "broken.jpg").write_bytes(b"not a jpeg")
    (receipts / "notes.txt").write_text("not an image")
    for i in range(6):
        Image.new("RGB", (80, 110), (250, 250, 250)).save(documents / f"d{i}.png")
    return {"receipts": receipts, "documents": documents}


def test_paper_box_uses_the_yolo_box_else_the_bright_region() -> None:
    image = Image.new("RGB", (200, 100), (50, 50, 50))
    ImageDraw.Draw(image).rectangle((50, 10, 99, 89), fill=(250, 250, 250))
    assert paper_box(image, "0 0.25 0.5 0.1 0.2") == (40, 40, 60, 60)
    left, top, right, bottom = paper_box(image)
    assert abs(left - 50) <= 4 and abs(right - 100) <= 4 and abs(top - 10) <= 3 and abs(bottom - 90) <= 3
    assert paper_box(Image.new("RGB", (80, 60), (240, 240, 240))) == (0, 0, 80, 60)  # a tight white scan


def test_sources_split_disjointly_and_skip_bad_files(folders: dict[str, Path]) -> None:
    sizes = {"train": 60, "val": 10, "test": 10}
    sources = RealSources.scan([folders["receipts"]], [folders["documents"]], [], sizes, seed=0)
    assert len(sources.skipped) == 1 and "broken.jpg" in sources.skipped[0]
    names = {split: {s.name for kind in kinds.values() for s in kind} for split, kinds in sources.by_split.items()}
    assert sum(len(n) for n in names.values()) == 12 + 6  # 13 receipt files, one unreadable
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert all(sources.counts()[split]["receipts"] >= 1 for split in sizes)
    again = RealSources.scan([folders["receipts"]], [folders["documents"]], [], sizes, seed=0)
    assert {s: {x.name for x in k["receipts"]} for s, k in again.by_split.items()} == \
        {s: {x.name for x in k["receipts"]} for s, k in sources.by_split.items()}
    cropped = next(s for s in sources.by_split["train"]["receipts"] + sources.by_split["val"]["receipts"]
                   + sources.by_split["test"]["receipts"] if s.name.endswith("r00.jpg"))
    assert cropped.image.size == (60, 40)  # the YOLO box of r00.jpg, not the detected sheet


def test_real_paper_draws_copies_from_its_split_only(folders: dict[str, Path]) -> None:
    sources = RealSources.scan([folders["receipts"]], [folders["documents"]], [], {"train": 8, "test": 2}, seed=3)
    paper = sources.for_split("test", real_fraction=1.0)
    allowed = {s.name for s in sources.by_split["test"]["receipts"]}
    rng = random.Random(0)
    for _ in range(10):
        sheet, name = paper.receipt(rng, 40)
        assert name in allowed and sheet.mode == "RGBA" and sheet.width == 40
    rendered, name = sources.for_split("test", real_fraction=0.0).receipt(rng, 40)
    assert name == "" and rendered.width == 40


def test_cli_composes_records_sources_and_keeps_splits_apart(folders: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _script().main(["--out", str(out), "--train", "12", "--val", "3", "--test", "3", "--size", "64", "--seed", "2",
                    "--workers", "1", "--receipts", str(folders["receipts"]), "--documents", str(folders["documents"]),
                    "--real-fraction", "1.0"])
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable" in printed and "broken.jpg" in printed
    used = {}
    for split in ("train", "val", "test"):
        with (out / split / "metadata.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert all(row["source"] in {"composed", "synthetic"} for row in rows)
        assert any(row["source"] == "composed" for row in rows)
        for row in rows:
            assert (row["source"] == "composed") == bool(row["source_files"])
            for name in filter(None, row["source_files"].split(";")):
                assert name.split("/")[0] in {"receipts", "documents"}
                used.setdefault(name, set()).add(split)
    assert used and all(len(splits) == 1 for splits in used.values())


def test_cli_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _script().main(["--out", str(tmp_path), "--train", "3", "--receipts", str(tmp_path / "nope")])
