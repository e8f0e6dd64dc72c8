"""Datasets of a run, built from `data.*` and the model's preprocessing. Manifest problems surface here,
before any training step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from config.schema import DataConfig
from data import AugmentConfig, ReceiptDataset, load_records
from data.preprocessing import ImagePreprocessing


@dataclass
class RunDatasets:
    train: ReceiptDataset
    val: ReceiptDataset | None
    test: ReceiptDataset | None


def build_datasets(config: DataConfig, class_names: list[str], preprocessing: ImagePreprocessing,
                   seed: int) -> RunDatasets:
    """Read every manifest named by `data.train/val/test` (raising `ManifestError` with FILE:LINE)."""
    if config.train is None:
        raise ValueError("data.train is not set: give a manifest (CSV/JSONL) or a class-per-folder directory")

    augment = augment_config(config.augment_options) if config.augment else None

    def make(source: str | None, train: bool) -> ReceiptDataset | None:
        if source is None:
            return None
        return ReceiptDataset(load_records(source, class_names), preprocessing,
                              augment=augment if train else None, on_bad_image=config.on_bad_image,
                              max_image_pixels=config.max_image_pixels, seed=seed)

    return RunDatasets(train=make(config.train, True), val=make(config.val, False), test=make(config.test, False))


def augment_config(options: dict[str, Any]) -> AugmentConfig:
    """`data.augment_options` -> AugmentConfig, naming an unknown field."""
    valid = [f.name for f in dataclasses.fields(AugmentConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"data.augment_options: unknown field(s) {unknown}; valid: {', '.join(valid)}")
    if "jpeg_quality" in options:
        options = {**options, "jpeg_quality": tuple(options["jpeg_quality"])}
    return AugmentConfig(**options)
