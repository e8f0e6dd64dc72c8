"""Model cards: the README.md of an exported folder, in the Hugging Face Hub's format.

A card is YAML metadata (`library_name`, `pipeline_tag`, `base_model`, `tags`, `model-index` with the
evaluation results), written with huggingface_hub's `ModelCardData`, then what the model is, how to
use it, how it was trained, its evaluation and its limits. It is for people: `from_pretrained` never
reads it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCardData

from config.schema import Config, InferenceConfig
from models.calibration import Calibration

if TYPE_CHECKING:
    from models.internvl2 import InternVL2MultimodalModel

LIBRARY_NAME = "receipt-counter"
SYNTHETIC = "synthetic"  # the `source` value scripts/make_receipts.py writes
CALIBRATION_HEADING = "## Calibration"
LIMITS_HEADING = "## Intended use and limits"


@dataclass
class TrainingSummary:
    """How an exported model was trained.

    Attributes:
        config: the run's resolved config.
        data_sizes: split name ("train", "validation", "test") -> number of images.
        global_step: optimizer steps taken when the model was exported.
        train_sources: the training manifest's `source` column -> images (None: no such column).
    """

    config: Config
    data_sizes: dict[str, int]
    global_step: int
    train_sources: dict[str | None, int] = field(default_factory=dict)


def model_card(model: "InternVL2MultimodalModel", training: TrainingSummary | None = None,
               evaluation: dict[str, Any] | None = None, calibration: Calibration | None = None,
               inference: InferenceConfig | None = None) -> str:
    """The card's text.

    Args:
        model: the exported model (LoRA merged).
        training: how it was trained; None for a model saved outside a training run.
        evaluation: the metrics `train.loop.Trainer.evaluate` returns (its `train.loop.Evaluation` metrics), plus
            "split" ("test" or "validation") and "source" (the manifest evaluated), or None.
        calibration: the export's temperature (None: T = 1, not fitted).
        inference: the export's `inference` settings (None: the defaults).
    """
    name = f"receipt-counter-{model.config.vision.encoder}"
    metadata = _metadata(model, name, evaluation).to_yaml()
    sections = [f"# {name}", _about(model), _usage(), _training(training), _evaluation(evaluation),
                calibration_section(calibration or Calibration(), inference or InferenceConfig()),
                _limits(training, evaluation)]
    return f"---\n{metadata}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def calibration_section(calibration: Calibration, inference: InferenceConfig) -> str:
    """The card's calibration section: the temperature, what it was fitted on, ECE before and after."""
    c = calibration
    lines = [CALIBRATION_HEADING, ""]
    if c.fitted:
        text = (f"Probabilities are softmax(logits / T) with the temperature **T = {c.temperature:.4f}**, fitted on "
                f"`{c.fitted_on}` ({c.num_samples:,} images) by minimising the negative log-likelihood; the predicted "
                "class is the same at any T.")
        if c.ece_before is not None and c.nll_before is not None:
            text += (f" There, the expected calibration error (15 bins) went from {c.ece_before:.4f} (T = 1) to "
                     f"{c.ece_after:.4f} and the NLL from {c.nll_before:.4f} to {c.nll_after:.4f}.")
        lines.append(text)
    else:
        lines.append(f"**Not calibrated**: T = {c.temperature:g} was not fitted (no labelled validation data), so the "
                     "probabilities are the model's plain softmax. Fit one on your own labelled images with "
                     "`python scripts/calibrate.py --checkpoint THIS_FOLDER --data MANIFEST`.")
    lines += ["", f"A prediction whose top probability is below {inference.uncertain_below:g} is flagged `uncertain` "
                  "(`inference.uncertain_below`; `--uncertain-below P` overrides it in predict.py and evaluate.py)."]
    return "\n".join(lines)


def with_calibration_section(card: str, section: str) -> str:
    """`card` with its calibration section replaced by `section` (a card without one gets it before the limits)."""
    start = card.find(f"\n{CALIBRATION_HEADING}\n")
    if start >= 0:
        end = card.find("\n## ", start + 1)
        return card[:start + 1] + section + ("\n" + card[end:] if end >= 0 else "\n")
    limits = card.find(f"\n{LIMITS_HEADING}\n")
    if limits >= 0:
        return card[:limits + 1] + section + "\n\n" + card[limits + 1:]
    return card.rstrip("\n") + "\n\n" + section + "\n"


def base_models(model: "InternVL2MultimodalModel") -> list[str]:
    """The checkpoints the model was built from: the InternVL2 folder, then the encoder's (when it has one)."""
    vision = model.config.vision
    found = [model.config.language.checkpoint]
    encoder_checkpoint = vision.fallback_checkpoint if vision.fallback_cause else vision.checkpoint
    if encoder_checkpoint and encoder_checkpoint not in found:
        found.append(encoder_checkpoint)
    return found


def _metadata(model: "InternVL2MultimodalModel", name: str, evaluation: dict[str, Any] | None) -> ModelCardData:
    results = None
    if evaluation is not None:
        split, source = evaluation["split"], str(evaluation["source"])
        results = [EvalResult(task_type="image-classification", task_name="Receipt counting",
                              dataset_type="receipt-count", dataset_name=source, dataset_split=split,
                              metric_type=kind, metric_name=label, metric_value=round(evaluation[key], 4))
                   for key, kind, label in (("accuracy", "accuracy", "Accuracy"), ("macro_f1", "f1", "Macro F1"))]
    return ModelCardData(library_name=LIBRARY_NAME, pipeline_tag="image-classification",
                         base_model=base_models(model), model_name=name, eval_results=results,
                         tags=["receipt-counter", "internvl2", model.config.vision.encoder, "document-classification",
                               "receipts"])


def _about(model: "InternVL2MultimodalModel") -> str:
    vision, pre = model.config.vision, model.preprocessing
    encoder = f"`{vision.encoder}`"
    if vision.fallback_cause:
        encoder += f" (the fallback: `{vision.requested_encoder}` could not be built: {vision.fallback_cause})"
    params = sum(p.numel() for p in model.parameters())
    return "\n".join([
        "Classifies photos and scans of paperwork by how many receipts they hold: "
        + ", ".join(f"`{n}`" for n in model.class_names) + ".",
        "",
        "| | |", "|---|---|",
        f"| vision encoder | {encoder} |",
        f"| language model | InternVL2 LLM from `{model.config.language.checkpoint}` "
        f"(hidden size {model.language.config.hidden_size}) |",
        f"| question | {model.config.language.question} |",
        f"| image tokens | {model.num_image_tokens()} per image |",
        f"| parameters | {params:,} |",
        f"| input | {pre.size[0]}x{pre.size[1]} px ({pre.resize}), mean {list(pre.mean)}, std {list(pre.std)} |",
    ])


def _usage() -> str:
    return "\n".join([
        "## How to use", "",
        "```python",
        "from models.inference import ReceiptCounter",
        "counter = ReceiptCounter.from_pretrained(\"THIS_FOLDER\")",
        "for p in counter.predict([\"scan.jpg\"]):",
        "    print(p.label, p.probabilities)",
        "```", "",
        "or `python scripts/predict.py --checkpoint THIS_FOLDER IMAGE ...` from the receipt-counter repository.",
    ])


def _training(training: TrainingSummary | None) -> str:
    if training is None:
        return "## Training\n\nNot recorded: this folder was saved outside a training run."
    c = training.config
    sizes = ", ".join(f"{split} {n:,}" for split, n in training.data_sizes.items())
    lines = ["## Training", "",
             f"Trained with `accelerate launch -m train` for {training.global_step:,} optimizer steps, seed {c.seed}, "
             f"mixed precision `{c.train.mixed_precision}`, batch size {c.data.batch_size}.", "",
             f"Data: `{c.data.train}` ({sizes} images; sources: {_sources(training.train_sources)}).", "",
             "| stage | trainable groups | LR | LR multipliers | epochs | max steps |", "|---|---|---|---|---|---|"]
    for s in c.train.stages:
        multipliers = ", ".join(f"{g} x{m:g}" for g, m in s.lr_multipliers.items()) or "-"
        lines.append(f"| {s.name} | {', '.join(s.trainable)} | {s.lr:g} | {multipliers} | {s.epochs} | "
                     f"{s.max_steps or '-'} |")
    return "\n".join(lines)


def _sources(sources: dict[str | None, int]) -> str:
    if not sources or set(sources) == {None}:
        return "not recorded (the manifest has no `source` column)"
    return ", ".join(f"{name or 'unknown'} {n:,}" for name, n in Counter(sources).most_common())


def _evaluation(evaluation: dict[str, Any] | None) -> str:
    if evaluation is None:
        return "## Evaluation\n\nNot evaluated."
    names = list(evaluation["per_class_f1"])
    lines = ["## Evaluation", "",
             f"On the {evaluation['split']} split `{evaluation['source']}` ({evaluation['samples']:,} images):", "",
             "| metric | value |", "|---|---|",
             f"| accuracy | {evaluation['accuracy']:.4f} |", f"| macro-F1 | {evaluation['macro_f1']:.4f} |",
             *[f"| F1 `{n}` | {f1:.4f} |" for n, f1 in evaluation["per_class_f1"].items()]]
    if "confusion_matrix" in evaluation:
        lines += ["", "Confusion matrix (rows true, columns predicted):", "",
                  "| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  *[f"| {n} | " + " | ".join(str(v) for v in row) + " |"
                    for n, row in zip(names, evaluation["confusion_matrix"])]]
    return "\n".join(lines)


def _limits(training: TrainingSummary | None, evaluation: dict[str, Any] | None) -> str:
    lines = [LIMITS_HEADING, "",
             "Intended for sorting photos and scans of paperwork by receipt count (none, one, several), "
             "for example before receipt extraction. It answers one fixed question and is not a general "
             "vision-language model; it does not read the receipts."]
    if training is not None and set(training.train_sources) == {SYNTHETIC}:
        lines += ["", "**Trained on generated data only** (`scripts/make_receipts.py`). Models trained this way "
                      "have scored far below their synthetic test accuracy on real photos and scans; measure it "
                      "on your own images before relying on it."]
    if evaluation is None:
        lines += ["", "No evaluation is recorded in this card."]
    else:
        lines += ["", f"The figures above hold for images like `{evaluation['source']}`. This card records no other "
                      "measurement, in particular none on real images unless that split holds them."]
    return "\n".join(lines)
