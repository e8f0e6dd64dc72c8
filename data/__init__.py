"""Receipt-count data: safe image loading, manifests, encoder-aware preprocessing, the dataset.

One concept per module (see each module's docstring for its full API):
    data.images      -- `open_image`, `fitted_size`, `to_rgb`, `BadImageError`, `DEFAULT_MAX_IMAGE_PIXELS`
    data.manifest    -- `load_records`, `read_manifest`, `read_class_folders`, `Record`,
                        `ManifestError`, `label_for_count`
    data.transforms  -- `preprocess`, `resize_image`, `to_tensor`, `augment_image`, `AugmentConfig`
    data.dataset     -- `ReceiptDataset`, `collate`, `load_pixel_values`, `make_dataloader`

The synthetic dataset itself is written by `scripts/make_receipts.py`; docs/data.md describes both.
"""

from data.dataset import ReceiptDataset, collate, load_pixel_values, make_dataloader
from data.images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, fitted_size, open_image, to_rgb
from data.manifest import ManifestError, Record, label_for_count, load_records, read_class_folders, read_manifest
from data.transforms import AugmentConfig, augment_image, preprocess, resize_image, to_tensor

__all__ = [
    "AugmentConfig", "BadImageError", "DEFAULT_MAX_IMAGE_PIXELS", "ManifestError", "ReceiptDataset", "Record",
    "augment_image", "collate", "fitted_size", "label_for_count", "load_pixel_values", "load_records", "make_dataloader",
    "open_image", "preprocess", "read_class_folders", "read_manifest", "resize_image", "to_rgb", "to_tensor",
]
