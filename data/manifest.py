"""Dataset manifests: which image files, which label, which question.

Public API:
    Record(path, label, question, source, data_source)
                                              -- one sample; `path` absolute, `label` a class index,
                                                 `source` is "MANIFEST:LINE" for error messages,
                                                 `data_source` the optional `source` column.
    ManifestError                             -- raised with every problem found, each as FILE:LINE.
    IMAGE_EXTENSIONS: frozenset[str]
    label_for_count(receipt_count, num_classes) -> int
    load_records(source, class_names) -> list[Record]       -- config keys data.train/val/test
    read_manifest(path, class_names) -> list[Record]        -- a .csv or .jsonl file
    read_class_folders(root, class_names) -> list[Record]   -- ROOT/<class name>/<image>

Accepted layouts (`load_records` picks one):
    * a `.csv` file with a header row, or a `.jsonl` file with one JSON object per line;
    * a folder holding `metadata.csv` or `metadata.jsonl` (what `scripts/make_receipts.py` writes);
    * a folder with one sub-folder per class name, holding images.

Manifest columns / keys:
    image path: `file_name` (the Hugging Face imagefolder name), `image` or `path`; relative to the
        manifest's folder, and it may not leave that folder (absolute paths, `..`, symlinks out).
    label, one or more of:
        `label`          -- a class name (matched first) or a class index;
        `label_name`     -- a class name;
        `receipt_count`  -- a receipt count n >= 0, mapped to class min(n, num_classes - 1).
      When several are given they must agree.
    `question` (optional): the prompt text; empty means "use the default question".
    `source` (optional): where the image comes from (a collection, a scanner, "synthetic"); metrics
        are also reported per source (`models.metrics.per_source_metrics`).

Every problem (unknown label, missing file, path escaping the folder, bad JSON, no label) is
collected and raised together in one `ManifestError` before any training starts.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
PATH_KEYS = ("file_name", "image", "path")
MANIFEST_NAMES = ("metadata.csv", "metadata.jsonl")
MAX_REPORTED_PROBLEMS = 20


class ManifestError(ValueError):
    """A manifest or folder layout that cannot be used; the message lists FILE:LINE: problem."""


@dataclass(frozen=True)
class Record:
    """One sample of a dataset.

    Attributes:
        path: absolute path of the image file.
        label: class index in [0, num_classes).
        question: prompt text, or None for the configured default.
        source: where it was declared, "MANIFEST:LINE" or the image path for folder layouts.
        data_source: the manifest's `source` column (where the image comes from), or None.
    """

    path: str
    label: int
    question: str | None
    source: str
    data_source: str | None = None


def label_for_count(receipt_count: int, num_classes: int) -> int:
    """Class index of a receipt count: counts at or above the last class fold into it ("2+")."""
    if receipt_count < 0:
        raise ValueError(f"receipt count must be >= 0, got {receipt_count}")
    return min(receipt_count, num_classes - 1)


def load_records(source: str | os.PathLike[str], class_names: list[str]) -> list[Record]:
    """Records of a manifest file, a folder holding `metadata.csv`/`.jsonl`, or class folders.

    Raises:
        ManifestError: the source does not exist or any record is invalid.
    """
    source = Path(source)
    if source.is_file():
        return read_manifest(source, class_names)
    if source.is_dir():
        for name in MANIFEST_NAMES:
            if (source / name).is_file():
                return read_manifest(source / name, class_names)
        return read_class_folders(source, class_names)
    raise ManifestError(f"{source}: no such manifest file or folder")


def read_manifest(path: str | os.PathLike[str], class_names: list[str]) -> list[Record]:
    """Read and validate a `.csv` or `.jsonl` manifest (see the module docstring for columns)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ManifestError(f"{path}: a manifest must be a .csv or .jsonl file")
    rows = _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path)
    records, problems = [], []
    for line, row in rows:
        try:
            records.append(_record(row, path, line, class_names))
        except ValueError as exc:
            problems.append(f"{path}:{line}: {exc}")
    if not records and not problems:
        problems.append(f"{path}: no records")
    _raise_if(problems)
    return records


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs; the line is where the row starts, the header being line 1."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        start = 2
        for row in reader:
            yield start, row
            start = reader.line_num + 1


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, object) pairs; a line that is not a JSON object yields an error string."""
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                obj = f"invalid JSON ({exc.msg})"
            yield line_no, obj if isinstance(obj, (dict, str)) else "not a JSON object"


def _record(row: dict[str, Any] | str, manifest: Path, line: int, class_names: list[str]) -> Record:
    """Validate one row; raises ValueError with a message that needs no further context."""
    if isinstance(row, str):
        raise ValueError(row)
    image_path = _resolve_image(row, manifest.parent)
    label = _row_label(row, class_names)
    question = row.get("question")
    question = str(question) if question not in (None, "") else None
    data_source = row.get("source")
    return Record(path=str(image_path), label=label, question=question, source=f"{manifest}:{line}",
                  data_source=str(data_source) if data_source not in (None, "") else None)


def _resolve_image(row: dict[str, Any], root: Path) -> Path:
    """The row's image as an absolute path inside `root`; refuses escapes and missing files."""
    key = next((k for k in PATH_KEYS if row.get(k) not in (None, "")), None)
    if key is None:
        raise ValueError(f"no image path (expected one of the columns {', '.join(PATH_KEYS)})")
    relative = str(row[key])
    root = root.resolve()
    target = (root / relative).resolve()
    if Path(relative).is_absolute():
        raise ValueError(f"image path {relative!r} is absolute; it must be relative to the manifest's folder {root}")
    if not target.is_relative_to(root):
        raise ValueError(f"image path {relative!r} escapes the manifest's folder {root}")
    if not target.is_file():
        raise ValueError(f"image file not found: {relative!r}")
    return target


def _row_label(row: dict[str, Any], class_names: list[str]) -> int:
    """The class index from `label`, `label_name` and/or `receipt_count`, which must agree."""
    found: dict[str, int] = {}
    if row.get("label") not in (None, ""):
        found["label"] = _parse_label(row["label"], class_names)
    if row.get("label_name") not in (None, ""):
        found["label_name"] = _parse_name(row["label_name"], class_names)
    if row.get("receipt_count") not in (None, ""):
        found["receipt_count"] = label_for_count(_parse_count(row["receipt_count"]), len(class_names))
    if not found:
        raise ValueError("no label (expected a label, label_name or receipt_count column)")
    if len(set(found.values())) > 1:
        shown = ", ".join(f"{k}={row[k]!r} -> {class_names[v]!r}" for k, v in found.items())
        raise ValueError(f"label columns disagree: {shown}")
    return next(iter(found.values()))


def _parse_label(value: Any, class_names: list[str]) -> int:
    """A class name (checked first, names like "2+" are not indices) or a class index."""
    text = str(value).strip()
    if text in class_names:
        return class_names.index(text)
    if isinstance(value, bool) or not text.lstrip("-").isdigit():
        raise ValueError(f"unknown label {text!r}; class names are {class_names}")
    index = int(text)
    if not 0 <= index < len(class_names):
        raise ValueError(f"label index {index} out of range for {len(class_names)} classes {class_names}")
    return index


def _parse_name(value: Any, class_names: list[str]) -> int:
    text = str(value).strip()
    if text not in class_names:
        raise ValueError(f"unknown label name {text!r}; class names are {class_names}")
    return class_names.index(text)


def _parse_count(value: Any) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise ValueError(f"receipt_count must be a whole number >= 0, got {text!r}")
    return int(text)


def read_class_folders(root: str | os.PathLike[str], class_names: list[str]) -> list[Record]:
    """Records of a ROOT/<class name>/<image> layout, in sorted order.

    Files with non-image extensions and hidden entries are ignored; a sub-folder that is not a class
    name is an error (a typo like "2plus" would otherwise silently drop a class).
    """
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f"{p}: folder is not a class name; class names are {class_names}"
               for p in folders if p.name not in class_names]
    _raise_if(unknown)
    records = [Record(path=str(image.resolve()), label=class_names.index(folder.name), question=None,
                      source=str(image))
               for folder in folders for image in sorted(folder.rglob("*")) if _is_image_file(image)]
    if not records:
        raise ManifestError(f"{root}: no images in class folders {class_names} (and no metadata.csv/.jsonl)")
    return records


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _raise_if(problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:MAX_REPORTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = f"\n  ... and {more} more" if more else ""
    raise ManifestError(f"{len(problems)} problem(s) in the data manifest:\n  " + "\n  ".join(shown) + tail)
