"""Torch dataset over manifest records, with bad samples skipped (and counted) or fatal.

Public API:
    load_pixel_values(path, preprocessing, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                      augment=None, generator=None) -> FloatTensor[3, H, W]
        One image, opened and preprocessed; raises `BadImageError`. Inference uses this so each input
        gets its own result or error row.
    ReceiptDataset(records, preprocessing, augment=None, on_bad_image="skip",
                   max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, seed=0)
        `ds[i]` -> {"pixel_values": FloatTensor[3, H, W], "label": int, "question": str | None,
                    "path": str}
        or, for a bad image under on_bad_image="skip", a skip marker {"skipped": True, "path", "error"}
        (a WARNING names the file). `ds.num_skipped` counts skips made in this process;
        `ds.set_epoch(e)` changes the augmentation draws per epoch, deterministically.
    collate(items) -> {"pixel_values": FloatTensor[B, 3, H, W], "labels": LongTensor[B],
                       "questions": list[str | None], "paths": list[str],
                       "num_skipped": int, "skipped_paths": list[str]}
        Drops skip markers. With DataLoader workers the skips happen in the workers, so the training
        loop sums `batch["num_skipped"]` for the run's count. A batch whose samples were all skipped
        has B = 0 and should be passed over.
    make_dataloader(dataset, batch_size, shuffle, num_workers=0, seed=0) -> torch.utils.data.DataLoader

Config wiring: `data.augment` -> `augment=AugmentConfig() if augment else None`,
`data.on_bad_image` -> `on_bad_image`, `data.max_image_pixels` -> `max_image_pixels`,
`data.batch_size` / `data.num_workers` -> `make_dataloader`. A record's question of None means the
caller substitutes the model's default question (`model.language.question`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from data.images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, open_image
from data.manifest import Record
from data.transforms import AugmentConfig, preprocess
from data.preprocessing import ImagePreprocessing

logger = logging.getLogger(__name__)

ON_BAD_IMAGE = ("skip", "fail")


def load_pixel_values(path: str | os.PathLike[str], preprocessing: ImagePreprocessing,
                      max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, augment: AugmentConfig | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Open one image safely and preprocess it for the encoder.

    A large JPEG is decoded at the smallest DCT scale that still covers the encoder's input
    (`data.images.open_image`'s `target_size`), so preprocessing only ever shrinks it.

    Returns:
        FloatTensor (3, H, W) with (H, W) = `preprocessing.size`.

    Raises:
        BadImageError: the file is missing, empty, truncated, not an image or too large.
    """
    image = open_image(path, max_image_pixels, preprocessing.size, preprocessing.resize)
    return preprocess(image, preprocessing, augment, generator)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, independent of worker count and order."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ReceiptDataset(Dataset):
    """Samples of `Record`s, preprocessed for one encoder.

    Args:
        records: from `data.manifest.load_records`.
        preprocessing: the encoder's `ImagePreprocessing`.
        augment: train-time augmentation strengths, or None.
        on_bad_image: "skip" (log a WARNING, count, return a skip marker) or "fail" (raise).
        max_image_pixels: larger images are refused as decompression bombs.
        seed: base seed of the augmentation; each (seed, epoch, index) has its own generator.
    """

    def __init__(self, records: list[Record], preprocessing: ImagePreprocessing,
                 augment: AugmentConfig | None = None, on_bad_image: str = "skip",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, seed: int = 0) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self.records = list(records)
        self.preprocessing = preprocessing
        self.augment = augment
        self.on_bad_image = on_bad_image
        self.max_image_pixels = max_image_pixels
        self.seed = seed
        self.epoch = 0
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of `epoch` (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        generator = None
        if self.augment is not None:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        try:
            pixels = load_pixel_values(record.path, self.preprocessing, self.max_image_pixels,
                                       self.augment, generator)
        except BadImageError as exc:
            if self.on_bad_image == "fail":
                raise
            self.num_skipped += 1
            logger.warning("skipping bad image %s (declared at %s): %s", record.path, record.source, exc.reason)
            return {"skipped": True, "path": record.path, "error": exc.reason}
        return {"pixel_values": pixels, "label": record.label, "question": record.question, "path": record.path}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack good samples into a batch and report the skipped ones (see the module docstring)."""
    good = [item for item in items if not item.get("skipped")]
    skipped = [item["path"] for item in items if item.get("skipped")]
    pixels = torch.stack([item["pixel_values"] for item in good]) if good else torch.empty(0, 3, 0, 0)
    return {
        "pixel_values": pixels,                                              # (B, 3, H, W)
        "labels": torch.tensor([item["label"] for item in good], dtype=torch.long),  # (B,)
        "questions": [item["question"] for item in good],
        "paths": [item["path"] for item in good],
        "num_skipped": len(skipped),
        "skipped_paths": skipped,
    }


def make_dataloader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                    seed: int = 0) -> DataLoader:
    """A DataLoader using `collate` and a seeded shuffle.

    Workers are not persistent, so a `set_epoch` made before each epoch's iterator reaches them.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate, generator=generator, drop_last=False)
