"""The dataset: good samples as tensors, bad ones skipped with a warning and counted, or fatal."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.dataset import ReceiptDataset, collate, load_pixel_values, make_dataloader
from data.images import BadImageError
from data.manifest import load_records
from data.transforms import AugmentConfig
from data.preprocessing import ImagePreprocessing

CLASSES = ["0", "1", "2+"]
PREP = ImagePreprocessing(size=(32, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Five images, one of them an empty file, listed in a metadata.csv."""
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (40 + 10 * i, 30), colour).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"")
    rows = ["ok0.png,0", "ok1.png,1", "broken.jpg,2", "ok2.png,2", "ok3.png,0"]
    (tmp_path / "metadata.csv").write_text("file_name,receipt_count,question\n" +
                                           "\n".join(f"{r},{'Count?' if i == 1 else ''}" for i, r in enumerate(rows)))
    return tmp_path


def test_item_layout(folder: Path) -> None:
    dataset = ReceiptDataset(load_records(folder, CLASSES), PREP)
    item = dataset[1]
    assert set(item) == {"pixel_values", "label", "question", "path"}
    assert item["pixel_values"].shape == (3, 32, 48) and item["pixel_values"].dtype == torch.float32
    assert (item["label"], item["question"]) == (1, "Count?")
    assert item["path"].endswith("ok1.png")


def test_bad_image_is_skipped_with_a_warning_and_counted(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = ReceiptDataset(load_records(folder, CLASSES), PREP, on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        items = [dataset[i] for i in range(len(dataset))]
    assert dataset.num_skipped == 1
    assert items[2]["skipped"] and "empty file" in items[2]["error"]
    assert any("broken.jpg" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    batch = collate(items)
    assert batch["pixel_values"].shape == (4, 3, 32, 48)
    assert batch["labels"].tolist() == [0, 1, 2, 0]
    assert batch["questions"] == [None, "Count?", None, None]
    assert batch["num_skipped"] == 1 and batch["skipped_paths"][0].endswith("broken.jpg")


def test_bad_image_fails_fast_when_asked(folder: Path) -> None:
    dataset = ReceiptDataset(load_records(folder, CLASSES), PREP, on_bad_image="fail")
    with pytest.raises(BadImageError, match="broken.jpg: empty file"):
        dataset[2]


def test_on_bad_image_must_be_known(folder: Path) -> None:
    with pytest.raises(ValueError, match="on_bad_image"):
        ReceiptDataset(load_records(folder, CLASSES), PREP, on_bad_image="ignore")


def test_batch_of_only_skipped_samples_is_empty() -> None:
    batch = collate([{"skipped": True, "path": "x.jpg", "error": "empty file"}])
    assert batch["pixel_values"].shape[0] == 0 and batch["labels"].numel() == 0 and batch["num_skipped"] == 1


def test_dataloader_with_workers_reports_skips_in_batches(folder: Path) -> None:
    dataset = ReceiptDataset(load_records(folder, CLASSES), PREP)
    loader = make_dataloader(dataset, batch_size=2, shuffle=True, num_workers=2, seed=3)
    batches = list(loader)
    assert sum(b["num_skipped"] for b in batches) == 1
    assert sum(len(b["labels"]) for b in batches) == 4
    order = [p for b in make_dataloader(dataset, 2, True, num_workers=0, seed=3) for p in b["paths"]]
    assert order == [p for b in batches for p in b["paths"]]  # same seed, same shuffle


def test_augmentation_is_deterministic_per_seed_epoch_and_index(folder: Path) -> None:
    records = load_records(folder, CLASSES)
    dataset = ReceiptDataset(records, PREP, augment=AugmentConfig(jpeg_prob=1.0), seed=5)
    first = dataset[0]["pixel_values"]
    assert torch.equal(first, dataset[0]["pixel_values"])
    fresh = ReceiptDataset(records, PREP, augment=AugmentConfig(jpeg_prob=1.0), seed=5)
    assert torch.equal(first, fresh[0]["pixel_values"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[0]["pixel_values"])


def test_load_pixel_values_for_inference(folder: Path) -> None:
    pixels = load_pixel_values(folder / "ok3.png", PREP)
    assert pixels.shape == (3, 32, 48)
    assert torch.allclose(pixels[:, 16, 24], torch.ones(3))  # white image -> (1 - 0.5) / 0.5
    with pytest.raises(BadImageError, match="broken.jpg"):
        load_pixel_values(folder / "broken.jpg", PREP)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_pixel_values(folder / "ok3.png", PREP, max_image_pixels=100)
