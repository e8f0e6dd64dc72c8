"""Classification metrics on plain integer labels: accuracy, per-class P/R/F1, macro-F1, confusion
matrix, expected calibration error, metrics per data source, and accuracy on the confident part.

Every function takes tensors or lists of ints (`targets` first, as in scikit-learn) and is correct
when a class never occurs, so the training loop can call them on any validation set.

Conventions (scikit-learn's, so numbers can be cross-checked):
    * precision of a class never predicted, recall of a class never true: 0 (never NaN);
    * macro-F1 averages the F1 of the classes that occur in `targets` or `predictions`; a class that
      occurs in neither has no defined F1 and is left out instead of dragging the mean to 0;
    * confusion matrix rows are true classes, columns predicted classes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence, Union

import torch

Labels = Union[torch.Tensor, Sequence[int]]
ECE_BINS = 15


def _as_long(x: Labels) -> torch.Tensor:
    """1-D int64 CPU tensor of labels."""
    return torch.as_tensor(x, dtype=torch.long).reshape(-1).cpu()


def _check_pair(targets: torch.Tensor, predictions: torch.Tensor) -> None:
    if targets.shape != predictions.shape:
        raise ValueError(f"{targets.numel()} targets but {predictions.numel()} predictions")


def accuracy(targets: Labels, predictions: Labels) -> float:
    """Fraction of predictions equal to the target; 0.0 for no samples."""
    t, p = _as_long(targets), _as_long(predictions)
    _check_pair(t, p)
    return (t == p).double().mean().item() if t.numel() else 0.0


def confusion_matrix(targets: Labels, predictions: Labels, num_classes: int) -> torch.Tensor:
    """Counts (num_classes, num_classes), int64: entry [i, j] = samples of true class i predicted as j."""
    t, p = _as_long(targets), _as_long(predictions)
    _check_pair(t, p)
    for name, x in (("targets", t), ("predictions", p)):
        if x.numel() and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f"{name} hold a class index outside [0, {num_classes})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass(frozen=True)
class PerClass:
    """Per-class scores, each a float64 tensor (num_classes,); `support` is int64 (true samples per class)."""

    precision: torch.Tensor
    recall: torch.Tensor
    f1: torch.Tensor
    support: torch.Tensor


def per_class_scores(confusion: torch.Tensor) -> PerClass:
    """Precision, recall and F1 of every class from a confusion matrix (0 where undefined)."""
    cm = confusion.double()
    true_pos = cm.diagonal()
    # A class never predicted (never true) has true_pos = 0, so clamping the denominator gives 0, not NaN.
    precision = true_pos / cm.sum(0).clamp(min=1)  # column sums: how often each class was predicted
    recall = true_pos / cm.sum(1).clamp(min=1)  # row sums: how often each class was the target
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return PerClass(precision, recall, f1, confusion.sum(1).long())


def macro_f1(targets: Labels, predictions: Labels, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in targets or predictions; 0.0 for no samples."""
    cm = confusion_matrix(targets, predictions, num_classes)
    present = (cm.sum(0) + cm.sum(1)) > 0
    if not present.any():
        return 0.0
    return per_class_scores(cm).f1[present].mean().item()


def expected_calibration_error(probabilities: torch.Tensor, targets: Labels, num_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence, equal-width bins.

    The confidence of a sample is its largest class probability; sample n falls in bin b when
    b / num_bins < confidence <= (b + 1) / num_bins. Then
        ECE = sum over bins of (|bin| / N) * |accuracy(bin) - mean confidence(bin)|,
    i.e. the gap between how sure the model is and how often it is right, weighted by bin size
    (Guo et al. 2017, 15 bins by default). 0.0 for no samples.

    Args:
        probabilities: (N, num_classes) rows summing to 1.
        targets: (N,) true class indices.
    """
    probs = torch.as_tensor(probabilities, dtype=torch.float64).cpu()
    t = _as_long(targets)
    if probs.ndim != 2 or probs.shape[0] != t.numel():
        raise ValueError(f"probabilities must be (N, num_classes) for {t.numel()} targets, got {tuple(probs.shape)}")
    if t.numel() == 0:
        return 0.0
    confidence, predicted = probs.max(1)
    correct = (predicted == t).double()
    bins = (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)  # (lo, hi] bins
    count = torch.bincount(bins, minlength=num_bins).double()
    conf_sum = torch.bincount(bins, weights=confidence, minlength=num_bins)
    correct_sum = torch.bincount(bins, weights=correct, minlength=num_bins)
    # |sum correct - sum confidence| / N per bin == |bin|/N * |acc(bin) - conf(bin)|
    return ((correct_sum - conf_sum).abs().sum() / t.numel()).item()


def classification_report(targets: Labels, probabilities: torch.Tensor, class_names: Sequence[str],
                          num_bins: int = ECE_BINS) -> dict:
    """Every metric of an evaluation as a JSON-ready dict (predictions are the argmax of `probabilities`).

    Returns:
        {"num_samples", "accuracy", "macro_f1", "ece", "ece_bins",
         "per_class": {name: {"precision", "recall", "f1", "support"}},
         "confusion_matrix": {"rows": "true", "columns": "predicted", "class_names", "counts"}}
    """
    probs = torch.as_tensor(probabilities, dtype=torch.float32)
    predictions = probs.argmax(1) if probs.numel() else torch.zeros(0, dtype=torch.long)
    cm = confusion_matrix(targets, predictions, len(class_names))
    scores = per_class_scores(cm)
    per_class = {name: {"precision": scores.precision[k].item(), "recall": scores.recall[k].item(),
                        "f1": scores.f1[k].item(), "support": int(scores.support[k])}
                 for k, name in enumerate(class_names)}
    return {"num_samples": int(cm.sum()), "accuracy": accuracy(targets, predictions),
            "macro_f1": macro_f1(targets, predictions, len(class_names)),
            "ece": expected_calibration_error(probs, targets, num_bins), "ece_bins": num_bins,
            "per_class": per_class,
            "confusion_matrix": {"rows": "true", "columns": "predicted", "class_names": list(class_names),
                                 "counts": cm.tolist()}}


def per_source_metrics(targets: Labels, predictions: Labels, sources: Sequence[str | None], num_classes: int,
                       probabilities: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """source -> {"images", "accuracy", "macro_f1"[, "ece"]} over the samples that carry a source (None: left out).

    Args:
        targets, predictions: (N,) class indices.
        sources: (N,) the manifest's `source` value of every sample, None where it has none.
        probabilities: (N, C) when given, each source also gets its "ece" (`expected_calibration_error`).

    Returns:
        One entry per distinct source, sorted by name; {} when no sample has a source.
    """
    t, p = _as_long(targets), _as_long(predictions)
    _check_pair(t, p)
    if len(sources) != t.numel():
        raise ValueError(f"{len(sources)} sources for {t.numel()} targets")
    rows: dict[str, list[int]] = defaultdict(list)
    for i, source in enumerate(sources):
        if source is not None:
            rows[source].append(i)
    out = {source: {"images": len(idx), "accuracy": accuracy(t[idx], p[idx]),
                    "macro_f1": macro_f1(t[idx], p[idx], num_classes)}
           for source, idx in sorted(rows.items())}
    if probabilities is not None:
        for source, idx in rows.items():
            out[source]["ece"] = expected_calibration_error(probabilities[idx], t[idx])
    return out


def coverage_report(targets: Labels, predictions: Labels, uncertain: Sequence[bool]) -> dict[str, float | int]:
    """How many samples were flagged uncertain, and the accuracy on the others (the ones a user would trust).

    Returns:
        {"num_uncertain", "coverage": share of samples not flagged, "confident_accuracy": accuracy on
        them (0.0 when every sample is flagged)}.
    """
    t, p = _as_long(targets), _as_long(predictions)
    _check_pair(t, p)
    flagged = torch.as_tensor(list(uncertain), dtype=torch.bool).reshape(-1)
    if flagged.numel() != t.numel():
        raise ValueError(f"{flagged.numel()} uncertain flags for {t.numel()} targets")
    kept = ~flagged
    return {"num_uncertain": int(flagged.sum()), "coverage": kept.double().mean().item() if t.numel() else 0.0,
            "confident_accuracy": accuracy(t[kept], p[kept])}
