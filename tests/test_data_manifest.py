"""Manifests (CSV, JSONL, class folders): labels by index/name/count, problems reported by file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data.manifest import ManifestError, label_for_count, load_records, read_class_folders, read_manifest

CLASSES = ["0", "1", "2+"]


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "white").save(path)
    return path


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for name in ("a.jpg", "b.jpg", "sub/c.png"):
        _image(tmp_path / name)
    return tmp_path


def test_label_for_count_folds_into_the_last_class() -> None:
    assert [label_for_count(n, 3) for n in range(6)] == [0, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError):
        label_for_count(-1, 3)


def test_csv_labels_by_index_name_and_count(images: Path) -> None:
    manifest = _csv(images / "m.csv", "file_name,label,label_name,receipt_count,question\n"
                                      "a.jpg,1,,,\n"
                                      "b.jpg,,2+,,How many?\n"
                                      "sub/c.png,,,4,\n"
                                      "a.jpg,0,0,0,\n")
    records = read_manifest(manifest, CLASSES)
    assert [r.label for r in records] == [1, 2, 2, 0]
    assert [r.question for r in records] == [None, "How many?", None, None]
    assert records[2].path == str((images / "sub" / "c.png").resolve())
    assert records[1].source == f"{manifest}:3"


def test_source_column_is_kept_per_record(images: Path) -> None:
    manifest = _csv(images / "m.csv", "file_name,label,source\na.jpg,1,scans\nb.jpg,0,\n")
    assert [r.data_source for r in read_manifest(manifest, CLASSES)] == ["scans", None]
    rows = [{"image": "a.jpg", "label": 2, "source": "photos"}, {"image": "b.jpg", "label": 0}]
    jsonl = images / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert [r.data_source for r in read_manifest(jsonl, CLASSES)] == ["photos", None]


def test_label_names_are_matched_before_indices(images: Path) -> None:
    manifest = _csv(images / "m.csv", "image,label\na.jpg,one\nb.jpg,2\n")
    assert [r.label for r in read_manifest(manifest, ["none", "one", "many"])] == [1, 2]


def test_jsonl_manifest(images: Path) -> None:
    rows = [{"image": "a.jpg", "label": 2}, {"path": "sub/c.png", "receipt_count": 1, "question": "Count?"},
            {"file_name": "b.jpg", "label_name": "0"}]
    manifest = images / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    records = read_manifest(manifest, CLASSES)
    assert [(Path(r.path).name, r.label, r.question) for r in records] == [
        ("a.jpg", 2, None), ("c.png", 1, "Count?"), ("b.jpg", 0, None)]


def _problem(manifest: Path, classes: list[str] = CLASSES) -> str:
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, classes)
    return str(info.value)


def test_unknown_label_names_the_file_and_line(images: Path) -> None:
    manifest = _csv(images / "m.csv", "file_name,label\na.jpg,1\nb.jpg,seven\n")
    message = _problem(manifest)
    assert f"{manifest}:3" in message and "unknown label 'seven'" in message


def test_out_of_range_index_and_bad_count(images: Path) -> None:
    manifest = _csv(images / "m.csv", "file_name,label,receipt_count\na.jpg,3,\nb.jpg,,-2\n")
    message = _problem(manifest)
    assert f"{manifest}:2: label index 3 out of range" in message
    assert f"{manifest}:3: receipt_count must be a whole number" in message


def test_unknown_label_in_jsonl_names_the_line(images: Path) -> None:
    manifest = images / "m.jsonl"
    manifest.write_text('{"image": "a.jpg", "label": 0}\n\n{"image": "b.jpg", "label_name": "3+"}\n')
    assert f"{manifest}:3: unknown label name '3+'" in _problem(manifest)


def test_invalid_json_line(images: Path) -> None:
    manifest = images / "m.jsonl"
    manifest.write_text('{"image": "a.jpg", "label": 0}\n{"image": \n[1, 2]\n')
    message = _problem(manifest)
    assert f"{manifest}:2: invalid JSON" in message and f"{manifest}:3: not a JSON object" in message


def test_missing_file_names_the_file_and_line(images: Path) -> None:
    manifest = _csv(images / "m.csv", "file_name,label\na.jpg,0\nb.jpg,1\ngone.jpg,2\n")
    assert f"{manifest}:4: image file not found: 'gone.jpg'" in _problem(manifest)


@pytest.mark.parametrize("bad_path", ["../outside.jpg", "sub/../../outside.jpg", "ABSOLUTE"])
def test_path_escaping_the_folder_is_refused(tmp_path: Path, bad_path: str) -> None:
    outside = _image(tmp_path / "outside.jpg")
    root = tmp_path / "data"
    _image(root / "a.jpg")
    bad_path = str(outside) if bad_path == "ABSOLUTE" else bad_path
    manifest = _csv(root / "m.csv", f"file_name,label\na.jpg,0\n{bad_path},1\n")
    reason = "is absolute" if Path(bad_path).is_absolute() else "escapes the manifest's folder"
    assert f"{manifest}:3: image path {bad_path!r} {reason}" in _problem(manifest)


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    outside = _image(tmp_path / "outside.jpg")
    root = tmp_path / "data"
    root.mkdir()
    (root / "link.jpg").symlink_to(outside)
    manifest = _csv(root / "m.csv", "file_name,label\nlink.jpg,1\n")
    assert "escapes the manifest's folder" in _problem(manifest)


def test_disagreeing_label_columns_are_refused(images: Path) -> None:
    manifest = _csv(images / "m.csv", "file_name,label,receipt_count\na.jpg,1,3\n")
    assert f"{manifest}:2: label columns disagree" in _problem(manifest)


def test_all_problems_are_reported_together_with_line_numbers_after_multiline_fields(images: Path) -> None:
    manifest = _csv(images / "m.csv", 'file_name,label,question\na.jpg,0,"two\nlines"\nnope.jpg,9,\nb.jpg,x,\n')
    message = _problem(manifest)
    assert "2 problem(s)" in message  # one per bad row: its first problem
    assert f"{manifest}:4: image file not found" in message
    assert f"{manifest}:5: unknown label 'x'" in message


def test_row_without_label_or_path(images: Path) -> None:
    manifest = _csv(images / "m.csv", "file_name,label\n,1\na.jpg,\n")
    message = _problem(manifest)
    assert f"{manifest}:2: no image path" in message and f"{manifest}:3: no label" in message


def test_class_folder_layout(tmp_path: Path) -> None:
    _image(tmp_path / "0" / "letter.png")
    _image(tmp_path / "1" / "r.jpg")
    _image(tmp_path / "2+" / "deep" / "rr.jpeg")
    (tmp_path / "2+" / "notes.txt").write_text("not an image")
    (tmp_path / "README.md").write_text("ignored")
    records = load_records(tmp_path, CLASSES)
    assert [(Path(r.path).name, r.label, r.question) for r in records] == [
        ("letter.png", 0, None), ("r.jpg", 1, None), ("rr.jpeg", 2, None)]


def test_class_folder_with_unknown_name_is_refused(tmp_path: Path) -> None:
    _image(tmp_path / "1" / "r.jpg")
    _image(tmp_path / "2plus" / "r.jpg")
    with pytest.raises(ManifestError, match="2plus: folder is not a class name"):
        read_class_folders(tmp_path, CLASSES)


def test_load_records_prefers_metadata_in_a_folder(images: Path) -> None:
    _csv(images / "metadata.csv", "file_name,receipt_count\na.jpg,0\nb.jpg,5\n")
    assert [r.label for r in load_records(images, CLASSES)] == [0, 2]
    assert [r.label for r in load_records(images / "metadata.csv", CLASSES)] == [0, 2]


def test_load_records_of_a_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such manifest"):
        load_records(tmp_path / "nothing.csv", CLASSES)


def test_unsupported_manifest_suffix(images: Path) -> None:
    with pytest.raises(ManifestError, match=".csv or .jsonl"):
        read_manifest(_csv(images / "m.txt", "file_name,label\na.jpg,0\n"), CLASSES)
