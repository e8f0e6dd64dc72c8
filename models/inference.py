"""Receipt classification inference: a loaded model plus the preprocessing its checkpoint describes.

    counter = ReceiptCounter.from_pretrained("runs/demo/final")     # the exported folder alone
    for p in counter.predict(["a.jpg", "scans/b.png"], batch_size=16):
        print(p.image, p.label, p.probabilities, p.uncertain) if p.ok else print(p.image, p.error)

Probabilities are calibrated: softmax(logits / T) with the temperature T the export records
(`models.calibration`; T = 1 for an export without one). A prediction is `uncertain` when its top
probability is below `uncertain_below` (the export's `inference.uncertain_below` unless overridden).

Inputs may be image paths, PIL images, or already-preprocessed (3, H, W) tensors. A bad input
(missing, empty, truncated, non-image, decompression bomb, wrong tensor shape) gets its own
`Prediction` with `error` set; the other inputs of the batch are classified as usual.

Batching does not change answers: every image is preprocessed to the model's fixed
`preprocessing.size` and, unless questions are given, every image is asked the same default question,
so a batch is a plain stack of independent rows (no image or token padding differs between rows).

Streaming: `iter_predict(..., num_workers=N)` decodes and preprocesses in N DataLoader worker
processes while the model classifies the previous batch, and yields results batch by batch in input
order; at most a few batches are in flight, so memory does not grow with the number of inputs.
"""

from __future__ import annotations

import argparse

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.dataset import load_pixel_values
from data.images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, to_rgb
from data.manifest import ManifestError, Record, load_records
from data.preprocessing import ImagePreprocessing
from data.transforms import preprocess
from config.schema import InferenceConfig
from models.calibration import Calibration, check_uncertain_below, scaled_probabilities, scaling_metrics
from models.internvl2 import CONFIG_NAME, InternVL2MultimodalModel, export_settings, read_export_config
from models.metrics import ECE_BINS, classification_report, coverage_report, per_source_metrics

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Prediction:
    """The answer for one input.

    Attributes:
        image: the input's path as given, or None for an in-memory PIL image / tensor.
        label: the predicted class name (None on error).
        class_index: the predicted class index (None on error).
        probabilities: class name -> calibrated probability softmax(logits / T), in class order (None on error).
        uncertain: the top probability is below the counter's `uncertain_below` (None on error).
        logits: the model's raw class scores, in class order (None on error); not part of the row.
        error: why the input could not be classified (None on success).
    """

    image: str | None
    label: str | None = None
    class_index: int | None = None
    probabilities: dict[str, float] | None = None
    uncertain: bool | None = None
    logits: tuple[float, ...] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_row(self) -> dict:
        """The design's prediction row: image, label, class_index, probabilities, uncertain -- or image, error."""
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "label": self.label, "class_index": self.class_index,
                "probabilities": self.probabilities, "uncertain": self.uncertain}


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu"/"cuda"/torch.device pass through (checked)."""
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA GPU")
    return torch.device(device)


def cpu_threads_beside(num_workers: int) -> int:
    """Torch threads for a CPU model with `num_workers` decoding processes beside it: the cores left, at least 1.

    Torch's threads spin while they wait for one another, so more threads than free cores slow the
    model down badly (on the project's 2-core machine, 2 threads next to busy cores ran a predict
    over 200 photos in twice the time of 1 thread).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - num_workers)


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """`--batch-size N` (an integer >= 1, default 16) and `--device`, as every inference command line takes them."""
    parser.add_argument("--batch-size", type=_batch_size, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda when available")


def _batch_size(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


class ReceiptCounter:
    """A receipt counter ready for inference: eval mode, frozen, on one device, default question tokenized once.

    The model is frozen (no parameter requires grad: inference never trains it), which is what lets it
    compute the LLM's states once per distinct question (`models.question_cache`): for the default
    question the LLM runs once, on the first batch.

    Args:
        model: the trained model; it is put in eval mode, frozen and moved to `device`.
        device: "auto", "cpu", "cuda" or a torch.device.
        max_image_pixels: image files above this many pixels are refused as decompression bombs.
        calibration: the temperature the logits are divided by (None: T = 1, not fitted).
        uncertain_below: predictions whose top probability is below this are flagged `uncertain`.
    """

    def __init__(self, model: InternVL2MultimodalModel, device: str | torch.device = "cpu",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, calibration: Calibration | None = None,
                 uncertain_below: float = InferenceConfig.uncertain_below) -> None:
        self.calibration = calibration or Calibration()
        self.uncertain_below = check_uncertain_below(uncertain_below)
        self.device = resolve_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.dtype = next(self.model.parameters()).dtype  # images are fed in the weights' dtype (bfloat16 kept)
        self.max_image_pixels = max_image_pixels
        # One tokenization of the default question, shared by every batch: identical ids for every row.
        self._default_ids, self._default_mask = model.tokenize([None], self.device)  # (1, T) each

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu",
                        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, dtype: torch.dtype | str = torch.float32,
                        uncertain_below: float | None = None) -> "ReceiptCounter":
        """Load an exported model folder (config.json, model.safetensors, tokenizer files) and nothing else.

        `dtype` is the weights' dtype in memory (`InternVL2MultimodalModel.from_pretrained`): float32 by default,
        also for a bfloat16 export; "auto" keeps the dtype the export was stored in. The temperature and
        `uncertain_below` come from config.json (`models.internvl2.export_settings`); a given
        `uncertain_below` overrides the export's.

        Raises:
            FileNotFoundError: a file of the folder is missing (named in the message).
            ValueError: config.json is not a receipt-counter export, a field of it is invalid, or the weights do
                not match it.
        """
        exported = read_export_config(Path(folder))  # read once, for the model and for the settings
        inference, calibration = export_settings(exported, str(Path(folder) / CONFIG_NAME))
        threshold = inference.uncertain_below if uncertain_below is None else uncertain_below
        model = InternVL2MultimodalModel.from_pretrained(folder, dtype, exported)
        return cls(model, device, max_image_pixels, calibration, threshold)

    @classmethod
    def from_model(cls, model: InternVL2MultimodalModel, device: str | torch.device = "cpu",
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, calibration: Calibration | None = None,
                   uncertain_below: float = InferenceConfig.uncertain_below) -> "ReceiptCounter":
        """Wrap an in-memory model (e.g. at the end of training) without a round trip through disk.

        The model itself is put in eval mode and frozen (see the class docstring), not a copy of it.
        """
        return cls(model, device, max_image_pixels, calibration, uncertain_below)

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def temperature(self) -> float:
        """T of softmax(logits / T): the export's fitted temperature, 1 when it has none."""
        return self.calibration.temperature

    @property
    def encoder(self) -> str:
        """The vision encoder actually in the model (after any fallback at build time)."""
        return self.model.config.vision.encoder

    def predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 16,
                questions: Sequence[str | None] | None = None, num_workers: int = 0) -> list[Prediction]:
        """Classify images; one `Prediction` per input, in input order.

        Args:
            images: a path, PIL image or tensor, or a sequence of them; a (B, 3, H, W) tensor is B inputs.
            batch_size: images per forward pass; it does not change the answers.
            questions: one question per image (None entries: the default question); None for all default.
            num_workers: decoding worker processes (see `iter_predict`); they do not change the answers.
        """
        return list(self.iter_predict(images, batch_size, questions, num_workers))

    def iter_predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 16,
                     questions: Sequence[str | None] | None = None, num_workers: int = 0) -> Iterator[Prediction]:
        """`predict`, yielding results batch by batch (for progress bars and streamed output).

        Args:
            num_workers: DataLoader worker processes that decode and preprocess the coming batches while
                the model runs; 0 decodes in this process, between batches.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        items = _as_list(images)
        if questions is not None and len(questions) != len(items):
            raise ValueError(f"got {len(questions)} questions for {len(items)} images")
        inputs = InputImages(items, self.model.preprocessing, self.max_image_pixels)
        loader = DataLoader(inputs, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=list)  # a batch stays a list: some of its items may be errors
        for start, batch in zip(range(0, len(items), batch_size), loader):
            chunk_questions = None if questions is None else list(questions[start:start + batch_size])
            yield from self._predict_batch(batch, chunk_questions)

    def _predict_batch(self, loaded: list[LoadedInput], questions: list[str | None] | None) -> list[Prediction]:
        """One forward pass over the decoded items of a batch; the others keep their error."""
        good = [i for i, item in enumerate(loaded) if item.pixels is not None]
        results = [Prediction(image=item.name, error=item.error) for item in loaded]
        if not good:
            return results
        pixels = torch.stack([loaded[i].pixels for i in good]).to(self.device, self.dtype)  # (B, 3, H, W)
        logits = self._logits(pixels, None if questions is None else [questions[i] for i in good])
        probs = scaled_probabilities(logits, self.temperature)
        for row, scores, i in zip(probs.tolist(), logits.tolist(), good):
            k = max(range(len(row)), key=row.__getitem__)
            results[i] = Prediction(image=loaded[i].name, label=self.class_names[k], class_index=k,
                                    probabilities=dict(zip(self.class_names, row)),
                                    uncertain=row[k] < self.uncertain_below, logits=tuple(scores))
        return results

    @torch.inference_mode()
    def _logits(self, pixels: torch.Tensor, questions: list[str | None] | None) -> torch.Tensor:
        """(B, 3, H, W) -> class logits (B, num_classes), float32 on the CPU."""
        if questions is None or all(q is None for q in questions):
            ids = self._default_ids.expand(pixels.shape[0], -1)
            mask = self._default_mask.expand(pixels.shape[0], -1)
        else:
            ids, mask = self.model.tokenize(questions, self.device)
        return self.model(pixels, ids, mask).logits.float().cpu()  # (B, num_classes)


@dataclass(frozen=True)
class LoadedInput:
    """One input after decoding: its name (path or None), pixels (3, H, W) or the reason there are none."""

    name: str | None
    pixels: torch.Tensor | None = None
    error: str | None = None


def load_input(item: ImageInput, preprocessing: ImagePreprocessing, max_image_pixels: int) -> LoadedInput:
    """Decode and preprocess one input; every failure becomes the item's error, never an exception."""
    name = _name(item)
    try:
        if isinstance(item, torch.Tensor):
            return LoadedInput(name, _check_tensor(item, preprocessing))
        if isinstance(item, Image.Image):
            # Same orientation and mode handling as files get in `open_image`.
            return LoadedInput(name, preprocess(to_rgb(ImageOps.exif_transpose(item)), preprocessing))
        if isinstance(item, (str, os.PathLike)):
            return LoadedInput(name, load_pixel_values(item, preprocessing, max_image_pixels))
        raise ValueError(f"unsupported input type {type(item).__name__} (expected a path, PIL image or tensor)")
    except BadImageError as exc:
        return LoadedInput(name, error=exc.reason)
    except (ValueError, OSError, SyntaxError, KeyError, TypeError) as exc:  # incl. a broken EXIF block
        return LoadedInput(name, error=str(exc) or type(exc).__name__)


class InputImages(Dataset):
    """The inputs of one `iter_predict` call as a dataset: item i -> `load_input(items[i])`."""

    def __init__(self, items: list[ImageInput], preprocessing: ImagePreprocessing, max_image_pixels: int) -> None:
        self.items, self.preprocessing, self.max_image_pixels = items, preprocessing, max_image_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> LoadedInput:
        return load_input(self.items[index], self.preprocessing, self.max_image_pixels)


def _check_tensor(tensor: torch.Tensor, preprocessing: ImagePreprocessing) -> torch.Tensor:
    """A preprocessed image must already have the model's (3, H, W) shape."""
    expected = (3, *preprocessing.size)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} is not a preprocessed image of shape {expected}")
    return tensor.float()


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """A single input or a (B, 3, H, W) tensor -> a list of inputs."""
    if isinstance(images, torch.Tensor):
        return list(images.unbind(0)) if images.ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


def _name(item: ImageInput) -> str | None:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else None


def load_labelled(checkpoint: str | os.PathLike, data: str | os.PathLike, device: str | torch.device = "cpu",
                  uncertain_below: float | None = None) -> tuple["ReceiptCounter", list[Record]]:
    """An exported folder's counter and a labelled manifest's records (`data.manifest.load_records`).

    Raises:
        LoadError: one line saying which of the two cannot be used and why (the message names the file).
    """
    try:
        counter = ReceiptCounter.from_pretrained(checkpoint, device=device, uncertain_below=uncertain_below)
    except (FileNotFoundError, ValueError) as exc:
        raise LoadError(f"cannot load checkpoint: {_one_line(exc)}") from exc
    try:
        return counter, load_records(data, counter.class_names)
    except ManifestError as exc:
        raise LoadError(f"cannot load manifest {data}: {_one_line(exc)}") from exc


class LoadError(ValueError):
    """A checkpoint or manifest that cannot be used; the message is one line."""


def _one_line(exc: Exception) -> str:
    """The exception's message with its line breaks and indents collapsed (a manifest lists one problem a line)."""
    return " ".join(str(exc).split())


def predict_records(counter: "ReceiptCounter", records: Sequence[Record], batch_size: int) -> list[Prediction]:
    """One prediction per record, in order, asking each record's question, with a progress bar on stderr."""
    paths, questions = [r.path for r in records], [r.question for r in records]
    with tqdm(total=len(records), unit="img", file=sys.stderr, desc="predicting") as bar:
        predictions = []
        for p in counter.iter_predict(paths, batch_size=batch_size, questions=questions):
            predictions.append(p)
            bar.update(1)
    return predictions


def labelled_logits(records: Sequence[Record], predictions: Sequence[Prediction]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, num_classes) logits and (N,) true labels of the predictions that succeeded."""
    good = [(r.label, p.logits) for r, p in zip(records, predictions) if p.ok]
    num_classes = len(good[0][1]) if good else 0
    logits = torch.tensor([scores for _, scores in good], dtype=torch.float32).reshape(len(good), num_classes)
    return logits, torch.tensor([label for label, _ in good], dtype=torch.long)


def prediction_metrics(counter: "ReceiptCounter", labels: Sequence[int], predictions: Sequence[Prediction],
                       sources: Sequence[str | None] | None = None) -> dict[str, Any]:
    """The metrics bundle of labelled predictions, as scripts/evaluate.py and scripts/compare_encoders.py write it.

    Args:
        labels: the true class index of every prediction, in the same order.
        sources: the manifest's `source` of every prediction (None: no such column).

    Returns:
        The encoder record, "class_names", `models.metrics.classification_report` over the readable
        images (its "ece" of the calibrated probabilities), "calibration" (the counter's temperature with
        NLL and ECE here at T = 1 and at T: `models.calibration.scaling_metrics`), "uncertainty"
        ("uncertain_below" and `models.metrics.coverage_report`), "per_source"
        (`models.metrics.per_source_metrics`, {} without sources), "num_failed" and "failed"
        ([{"image", "error"}] of the unreadable ones).
    """
    names = counter.class_names
    sources = [None] * len(predictions) if sources is None else sources
    good = [(label, p, source) for label, p, source in zip(labels, predictions, sources) if p.ok]
    targets, preds = [label for label, _, _ in good], [p.class_index for _, p, _ in good]
    probs = torch.tensor([[p.probabilities[n] for n in names] for _, p, _ in good]).reshape(len(good), len(names))
    logits = torch.tensor([p.logits for _, p, _ in good]).reshape(len(good), len(names))
    calibration = {k: getattr(counter.calibration, k) for k in ("temperature", "fitted", "fitted_on")}
    return {**counter.model.config.vision.encoder_record(), "class_names": list(names),
            **classification_report(targets, probs, names, ECE_BINS),
            "calibration": {**calibration, **scaling_metrics(logits, torch.tensor(targets), counter.temperature)},
            "uncertainty": {"uncertain_below": counter.uncertain_below,
                            **coverage_report(targets, preds, [p.uncertain for _, p, _ in good])},
            "per_source": per_source_metrics(targets, preds, [source for _, _, source in good], len(names), probs),
            "num_failed": len(predictions) - len(good),
            "failed": [{"image": p.image, "error": p.error} for p in predictions if not p.ok]}
