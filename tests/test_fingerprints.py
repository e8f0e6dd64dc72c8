"""Fingerprints of base checkpoint folders: what they notice, what they cost, what they ignore."""

from __future__ import annotations

import shutil
from pathlib import Path

import safetensors.torch
import torch

from train.fingerprints import EDGE, base_changes, folder_fingerprint


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text('{"model_type": "swin"}')
    (folder / "README.md").write_text("a model card")
    return folder


def _changes(a: Path, b: Path) -> list[str]:
    key = "model.vision.checkpoint"
    return base_changes({key: {"folder": str(a), "files": folder_fingerprint(a)}},
                        {key: {"folder": str(b), "files": folder_fingerprint(b)}})


def test_a_copy_is_the_same_base_and_a_card_does_not_count(tmp_path):
    tensors = {"w": torch.randn(64, 64), "b": torch.zeros(3)}  # one tensor above 2 x EDGE bytes, one below
    base = _write(tmp_path / "a", tensors)
    copy = tmp_path / "b"
    shutil.copytree(base, copy)  # new file times, same content
    (copy / "README.md").write_text("another card")
    assert _changes(base, copy) == []
    assert set(folder_fingerprint(base)) == {"config.json", "model.safetensors"}


def test_other_values_other_shapes_other_files_are_named(tmp_path):
    tensors = {"w": torch.randn(64, 64), "b": torch.zeros(3)}
    base = _write(tmp_path / "a", tensors)
    values = _write(tmp_path / "values", {**tensors, "w": tensors["w"] * 1.01})  # a fine-tune: same header
    assert _changes(base, values) == [f"model.vision.checkpoint ({values}): model.safetensors holds other values "
                                      f"(same tensors, data differs)"]
    last = tensors["w"].clone()
    last.view(-1)[-1] += 1.0  # only the last element: inside the tensor's last EDGE bytes
    assert "holds other values" in _changes(base, _write(tmp_path / "last", {**tensors, "w": last}))[0]
    shapes = _write(tmp_path / "shapes", {**tensors, "b": torch.zeros(4)})
    assert "model.safetensors holds other tensors (names, dtypes or shapes; header differs)" in _changes(base, shapes)[0]
    files = _write(tmp_path / "files", tensors)
    (files / "tokenizer.json").write_text("{}")
    (files / "config.json").write_text('{"model_type": "swin", "depths": [2, 2]}')
    assert _changes(base, files) == [f"model.vision.checkpoint ({files}): tokenizer.json is new; config.json has "
                                     f"other content"]


def test_the_cost_is_the_header_and_the_tensor_edges(tmp_path):
    """A 4 MiB tensor is read at its two ends only: a change in its middle is not seen (the documented limit)."""
    big = torch.randn(1024, 1024)
    base = _write(tmp_path / "a", {"w": big})
    middle = big.clone()
    middle.view(-1)[big.numel() // 2] += 1.0
    assert big.numel() * 4 > 100 * EDGE
    assert _changes(base, _write(tmp_path / "b", {"w": middle})) == []
