"""Shortcut probe: can trivial image statistics alone predict the class?

A dataset where paper coverage, background colour or overall brightness predicts the receipt count
teaches a model that shortcut instead of counting. This module measures it: every image becomes a
few content-blind numbers (`FEATURE_NAMES`), and two simple classifiers trained on them report test
accuracy next to chance. Accuracy well above `ProbeResult.chance` + `ProbeResult.margin` means the
statistics leak the label.

Public API:
    FEATURE_NAMES: tuple[str, ...]           -- what each entry of a feature vector is (documented below)
    shortcut_features(image) -> Tensor (F,)  -- F = len(FEATURE_NAMES), float32
    feature_matrix(images) -> Tensor (N, F)
    probe_accuracy(train_x, train_y, test_x, test_y, num_classes) -> ProbeResult
    class_means(x, y, num_classes) -> Tensor (C, F)
    class_spread(means, x) -> Tensor (F,)    -- how far apart the class means lie, in feature SDs
    probe_sources(train, test, class_names, limit=None) -> ProbeReport
                                             -- the probe on two manifests / folders (`data.manifest.load_records`)

Features, computed on a `PROBE_SIZE` x `PROBE_SIZE` copy, RGB in [0, 1]; "luminance" is
0.299 R + 0.587 G + 0.114 B, "saturation" is (max - min) / max over the channels (HSV's S):
    paper_strict       fraction of pixels with luminance >= 0.80 and saturation <= 0.15 (white paper)
    paper_loose        the same with luminance >= 0.60 and saturation <= 0.30 (cream or shaded paper)
    paper_bbox         area of the bounding box of the `paper_loose` pixels / image area (0 when none)
    border_mean_r/g/b  mean of each channel over the border ring (the outer `BORDER_FRACTION` of each side)
    border_std_r/g/b   standard deviation of each channel over the same ring
    luminance_mean     mean luminance of the whole image
    luminance_std      standard deviation of the luminance
    saturation_mean    mean saturation
    greyscale          1 when the mean channel spread (max - min) is below `GREY_SPREAD`, else 0
    aspect_ratio       width / height of the image as given (before the square resize)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from PIL import Image

from data.images import open_image
from data.manifest import Record, load_records

FEATURE_NAMES: tuple[str, ...] = (
    "paper_strict", "paper_loose", "paper_bbox",
    "border_mean_r", "border_mean_g", "border_mean_b", "border_std_r", "border_std_g", "border_std_b",
    "luminance_mean", "luminance_std", "saturation_mean", "greyscale", "aspect_ratio",
)
PROBE_SIZE = 64  # statistics of a 64 px copy are as telling as full size, and ~100x cheaper
BORDER_FRACTION = 0.08
GREY_SPREAD = 0.02  # JPEG chroma noise in a grey image stays well below this mean channel spread
PAPER_THRESHOLDS = ((0.80, 0.15), (0.60, 0.30))  # (minimum luminance, maximum saturation): strict, loose
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
KNN_K = 15
L2_WEIGHT = 1e-3
LBFGS_STEPS = 200


# ---------------------------------------------------------------------------------------- features
def shortcut_features(image: Image.Image) -> torch.Tensor:
    """The content-blind statistics of one image, in the order of `FEATURE_NAMES`.

    Args:
        image: any PIL image (converted to RGB); its size only matters through `aspect_ratio`.

    Returns:
        (F,) float32 tensor, F = len(FEATURE_NAMES).
    """
    width, height = image.size
    small = image.convert("RGB").resize((PROBE_SIZE, PROBE_SIZE), Image.Resampling.BILINEAR)
    rgb = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
    rgb = rgb.view(PROBE_SIZE, PROBE_SIZE, 3).float() / 255  # (H, W, 3)
    luma = rgb @ torch.tensor(LUMA_WEIGHTS)  # (H, W)
    top, bottom = rgb.amax(-1), rgb.amin(-1)
    saturation = (top - bottom) / top.clamp_min(1e-6)
    masks = [(luma >= lo) & (saturation <= hi) for lo, hi in PAPER_THRESHOLDS]
    border = rgb[_border_mask(PROBE_SIZE)]  # (P, 3)
    values = [*(m.float().mean() for m in masks), _bbox_fraction(masks[1]),
              *border.mean(0), *border.std(0, correction=0),
              luma.mean(), luma.std(correction=0), saturation.mean(),
              ((top - bottom).mean() < GREY_SPREAD).float(), torch.tensor(width / height)]
    return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values])


def _border_mask(size: int) -> torch.Tensor:
    """(size, size) bool mask of the outer `BORDER_FRACTION` of every side (at least one pixel)."""
    ring = max(1, round(BORDER_FRACTION * size))
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[ring:size - ring, ring:size - ring] = False
    return mask


def _bbox_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Area of the bounding box of the True pixels of an (H, W) mask over H * W; 0 when none."""
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    if len(rows) == 0:
        return torch.tensor(0.0)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return box.float() / mask.numel()


def feature_matrix(images: Iterable[Image.Image]) -> torch.Tensor:
    """(N, F) features of `images`, one row per image, in order."""
    return torch.stack([shortcut_features(image) for image in images])


# ------------------------------------------------------------------------------------- classifiers
def _standardize(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the training mean and SD; constant features become 0 (float64)."""
    mean, std = train_x.double().mean(0), train_x.double().std(0, correction=0)
    std = torch.where(std > 1e-9, std, torch.ones_like(std))
    return (train_x.double() - mean) / std, (test_x.double() - mean) / std


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS from zeros (deterministic), L2 `L2_WEIGHT`.

    Args:
        x: (N, F) standardized float64 features.
        y: (N,) class indices.

    Returns:
        weight (F, C) and bias (C,).
    """
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + L2_WEIGHT * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
                k: int = KNN_K) -> torch.Tensor:
    """(M,) majority class among the k nearest (Euclidean) training rows; ties go to the lower class."""
    k = min(k, len(train_x))
    nearest = torch.cdist(test_x, train_x).topk(k, largest=False).indices  # (M, k)
    votes = torch.zeros(len(test_x), num_classes, dtype=torch.long)
    votes.scatter_add_(1, train_y[nearest], torch.ones_like(nearest))
    return votes.argmax(1)  # argmax returns the first of equal maxima


@dataclass(frozen=True)
class ProbeResult:
    """Test accuracy of the two probes next to what chance gives.

    Attributes:
        train_size, test_size: number of images in each split.
        chance: share of the test split's most common class (accuracy of always guessing it).
        margin: two binomial standard errors of an accuracy at `chance` on `test_size` images
            (2 sqrt(p (1 - p) / n)): a probe beyond chance + margin is very unlikely to be luck.
        logistic_accuracy: multinomial logistic regression on the standardized features.
        knn_accuracy: k-nearest neighbours (k = `KNN_K`) on the standardized features.
    """

    train_size: int
    test_size: int
    chance: float
    margin: float
    logistic_accuracy: float
    knn_accuracy: float

    @property
    def leaks(self) -> bool:
        """Whether either probe beats chance by more than the margin."""
        return max(self.logistic_accuracy, self.knn_accuracy) > self.chance + self.margin


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int) -> ProbeResult:
    """Fit both probes on (N, F) training features and (N,) labels; score them on the test split."""
    train_s, test_s = _standardize(train_x, test_x)
    weight, bias = fit_logistic(train_s, train_y, num_classes)
    logistic = (test_s @ weight + bias).argmax(1)
    knn = knn_predict(train_s, train_y, test_s, num_classes)
    chance = torch.bincount(test_y, minlength=num_classes).max().item() / len(test_y)
    return ProbeResult(train_size=len(train_y), test_size=len(test_y), chance=chance,
                       margin=2 * math.sqrt(chance * (1 - chance) / len(test_y)),
                       logistic_accuracy=(logistic == test_y).double().mean().item(),
                       knn_accuracy=(knn == test_y).double().mean().item())


def class_means(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, F) mean of every feature over the rows of each class (NaN for a class with no rows)."""
    return torch.stack([x[y == c].double().mean(0) for c in range(num_classes)])


# ------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class ProbeReport:
    """The probe on two splits read from disk.

    Attributes:
        result: the accuracies (`ProbeResult`).
        class_means: (C, F) training-split mean of each feature per class, in `FEATURE_NAMES` order.
        spread: (F,) max minus min of those class means in units of the training SD: how far apart
            the classes lie on each statistic alone (the leaking ones stand out).
    """

    result: ProbeResult
    class_means: torch.Tensor
    spread: torch.Tensor


def subsample(records: Sequence[Record], limit: int | None, seed: int = 0) -> list[Record]:
    """At most `limit` records, drawn at random (seeded) so sorted class folders stay mixed; in order."""
    if limit is None or limit >= len(records):
        return list(records)
    keep = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:limit]
    return [records[i] for i in sorted(keep.tolist())]


def record_features(records: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, F) features and (N,) labels of records, each image decoded at reduced size (JPEG draft)."""
    box = (PROBE_SIZE, PROBE_SIZE)
    x = feature_matrix(open_image(r.path, target_size=box, resize="resize") for r in records)
    return x, torch.tensor([r.label for r in records])


def probe_sources(train: str | os.PathLike[str], test: str | os.PathLike[str], class_names: list[str],
                  limit: int | None = None) -> ProbeReport:
    """Run the probe on two datasets in any layout `data.manifest.load_records` reads.

    Args:
        train, test: a manifest file, a folder with metadata.csv/.jsonl, or class folders.
        class_names: the classes, in label order.
        limit: use at most this many images of each split (a seeded random subset).
    """
    train_x, train_y = record_features(subsample(load_records(train, class_names), limit))
    test_x, test_y = record_features(subsample(load_records(test, class_names), limit))
    num_classes = len(class_names)
    means = class_means(train_x, train_y, num_classes)
    return ProbeReport(result=probe_accuracy(train_x, train_y, test_x, test_y, num_classes),
                       class_means=means, spread=class_spread(means, train_x))


def class_spread(means: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(F,) max minus min over the classes present of (C, F) `means`, in units of the SD of (N, F) `x`."""
    present = means[~means.isnan().any(1)]
    return (present.amax(0) - present.amin(0)) / x.double().std(0, correction=0).clamp_min(1e-9)
