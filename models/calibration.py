"""Temperature scaling: one temperature T > 0 that turns a model's logits into calibrated probabilities.

    probabilities = softmax(logits / T)

T is fitted on labelled logits (an export's validation split, or a user's own images with
scripts/calibrate.py) by minimising the mean negative log-likelihood over log T, so T stays
positive (Guo et al. 2017). Dividing every logit by the same T never changes the argmax: accuracy
and the confusion matrix are the same before and after, only the confidence moves. T > 1 softens an
over-confident model, T < 1 sharpens an under-confident one.

An export records the result as config.json's "calibration" (`Calibration.to_dict`); an export
without it (made before calibration existed) reads as T = 1, not fitted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from config.loader import from_dict
from models.metrics import ECE_BINS, expected_calibration_error

CALIBRATION_KEY = "calibration"  # the field of an export's config.json
# Where the fitted T is clamped. On data the model gets all right the likelihood keeps rising as T -> 0
# (every probability -> 1): the optimum is T = 0 and the fit stops where the NLL stops changing. The NLL is
# unimodal in log T (convex in 1 / T), so clamping the optimum gives the optimum within the bounds.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


@dataclass(frozen=True)
class Calibration:
    """The temperature an export divides its logits by, and how it was found.

    Attributes:
        temperature: T > 0; 1 leaves the softmax as it is.
        fitted: False when T was not fitted (no labelled data): T is then 1.
        fitted_on: the manifest T was fitted on, None when not fitted.
        num_samples: images it was fitted on.
        nll_before, nll_after: mean negative log-likelihood there with T = 1 and with T.
        ece_before, ece_after: expected calibration error there (`models.metrics`, 15 bins) with T = 1 and with T.
    """

    temperature: float = 1.0
    fitted: bool = False
    fitted_on: str | None = None
    num_samples: int = 0
    nll_before: float | None = None
    nll_after: float | None = None
    ece_before: float | None = None
    ece_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_export(cls, exported: dict[str, Any], where: str) -> "Calibration":
        """The calibration of an export's config.json (`where` names the file in errors); absent: T = 1, not fitted.

        Raises:
            ValueError: an unknown key, a wrong type or a temperature that is not a finite number > 0.
        """
        if CALIBRATION_KEY not in exported:
            return cls()
        try:
            calibration = from_dict(cls, exported[CALIBRATION_KEY], prefix=CALIBRATION_KEY)
            check_temperature(calibration.temperature, f"{CALIBRATION_KEY}.temperature")
        except ValueError as e:  # ConfigError too
            raise ValueError(f"{where}: {e}") from None
        return calibration


def check_temperature(value: float, name: str) -> float:
    """`value` when it is a finite number > 0; otherwise a ValueError naming `name` and the value."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_uncertain_below(value: float, name: str = "uncertain_below") -> float:
    """`value` when it is a probability in [0, 1]; otherwise a ValueError naming `name` and the value."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def parse_probability(text: str) -> float:
    """A command-line probability in [0, 1] (`--uncertain-below P`); argparse reports a bad one with the value."""
    try:
        return check_uncertain_below(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}") from None


def scaled_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the last dimension, in the logits' dtype: (N, C) -> (N, C)."""
    return (logits / temperature).softmax(-1)


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / T)[target] over (N, C) logits and (N,) targets, in float64."""
    return F.cross_entropy(logits.double() / temperature, targets.long()).item()


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The T minimising the mean NLL of softmax(logits / T), clamped to [MIN_TEMPERATURE, MAX_TEMPERATURE].

    L-BFGS with a strong-Wolfe line search over log T from log T = 0 (T = 1), in float64 on the CPU:
    deterministic, the same T for the same logits on every machine and process.

    Args:
        logits: (N, C) raw class scores.
        targets: (N,) true class indices.

    Raises:
        ValueError: no samples, or shapes that do not match.
    """
    z, t = _checked(logits, targets)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z * torch.exp(-log_t), t)  # z / T with T = exp(log T) > 0
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    return math.exp(min(max(log_t.item(), low), high))


def fit_calibration(logits: torch.Tensor, targets: torch.Tensor, fitted_on: str) -> Calibration:
    """`fit_temperature` on labelled logits, with NLL and ECE there before (T = 1) and after (T).

    Args:
        logits: (N, C) raw class scores; targets: (N,) true class indices.
        fitted_on: what the logits come from (a manifest path), recorded in the result.
    """
    z, t = _checked(logits, targets)
    temperature = fit_temperature(z, t)
    return Calibration(temperature=temperature, fitted=True, fitted_on=fitted_on, num_samples=t.numel(),
                       **scaling_metrics(z, t, temperature))


def scaling_metrics(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, float | None]:
    """NLL and ECE of labelled logits without temperature scaling (T = 1) and with `temperature`.

    Returns:
        {"nll_before", "nll_after", "ece_before", "ece_after"}; None values for no samples.
    """
    if len(targets) == 0:
        return dict.fromkeys(("nll_before", "nll_after", "ece_before", "ece_after"))
    z, t = _checked(logits, targets)
    return {"nll_before": negative_log_likelihood(z, t), "nll_after": negative_log_likelihood(z, t, temperature),
            "ece_before": expected_calibration_error(scaled_probabilities(z, 1.0), t, ECE_BINS),
            "ece_after": expected_calibration_error(scaled_probabilities(z, temperature), t, ECE_BINS)}


def _checked(logits: torch.Tensor | Sequence[Sequence[float]], targets: torch.Tensor | Sequence[int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float64 logits and (N,) int64 targets on the CPU, detached; N >= 1."""
    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    t = torch.as_tensor(targets).detach().to("cpu", torch.long).reshape(-1)
    if z.ndim != 2 or z.shape[0] != t.numel():
        raise ValueError(f"logits must be (N, num_classes) for {t.numel()} targets, got {tuple(z.shape)}")
    if t.numel() == 0:
        raise ValueError("cannot fit a temperature on no samples")
    return z, t
