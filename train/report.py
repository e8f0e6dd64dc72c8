"""The run report: RUN/curves.png, RUN/mistakes.png and RUN/report.md, from the files a run writes.

    python scripts/report.py RUN          (the training run writes them itself at its end)

Reads RUN/config.yaml, steps.jsonl, metrics.jsonl, results.json, timing.json,
stages/*/trainable.json and test_predictions.jsonl; a file that is missing (a run still going, an
older run) leaves its part of the report out instead of failing.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from config.loader import load_config
from models.metrics import per_source_metrics
from models.files import atomic_path, read_jsonl, write_text_atomic
from train.plots import Panel, Series, line_chart, thumbnail_grid

logger = logging.getLogger(__name__)

NUM_MISTAKES = 12


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write the report files of `run_dir`; returns name -> path of what was written.

    Raises:
        FileNotFoundError: `run_dir` holds no config.yaml (not a run folder).
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run / 'config.yaml'} is missing: {run} is not a training run folder")
    config = load_config(run / "config.yaml")
    steps, epochs = read_jsonl(run / "steps.jsonl"), read_jsonl(run / "metrics.jsonl")
    results = _read_json(run / "results.json")
    written = {"curves": run / "curves.png"}
    with atomic_path(written["curves"]) as tmp:
        draw_curves(steps, epochs).save(tmp, "PNG")
    predictions = read_jsonl(run / "test_predictions.jsonl")
    mistakes = confident_mistakes(predictions, list(config.model.class_names))
    if mistakes:
        written["mistakes"] = run / "mistakes.png"
        with atomic_path(written["mistakes"]) as tmp:
            draw_mistakes(mistakes, list(config.model.class_names)).save(tmp, "PNG")
    stages = _stage_rows(run, [s.name for s in config.train.stages], steps, epochs)
    text = render_report(run.name, config.model.class_names, stages, epochs, results, predictions, mistakes)
    written["report"] = run / "report.md"
    write_text_atomic(written["report"], text)
    return written


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def stage_boundaries(steps: list[dict], epochs: list[dict]) -> list[tuple[float, str]]:
    """(step where the stage starts, stage name), in run order: the step before its first logged row."""
    first: dict[int, tuple[int, str]] = {}
    ends: dict[int, int] = {}
    for row in sorted(steps + epochs, key=lambda r: r["global_step"]):
        first.setdefault(row["stage_index"], (row["global_step"], row["stage"]))
        ends[row["stage_index"]] = row["global_step"]
    bounds, previous_end = [], 0
    for index in sorted(first):
        bounds.append((float(previous_end), first[index][1]))
        previous_end = ends[index]
    return bounds


def draw_curves(steps: list[dict], epochs: list[dict]) -> Image.Image:
    """Training loss (per logged window) with validation loss, then validation accuracy and macro-F1,
    against the optimizer step, stage starts marked."""
    loss = Panel("Loss", "loss", [Series("training loss (mean per logged window)",
                                         [(r["global_step"], r["train_loss"]) for r in steps])])
    with_val = [r for r in epochs if "val_accuracy" in r]
    if with_val:
        loss.series.append(Series("validation loss", [(r["global_step"], r["val_loss"]) for r in with_val], True))
    title = "Validation"
    if with_val:
        best = max(with_val, key=lambda r: r["val_macro_f1"])
        title += f" (best macro-F1 {best['val_macro_f1']:.3f} at step {best['global_step']})"
    values = [r[k] for r in with_val for k in ("val_accuracy", "val_macro_f1")]
    low = max(0.0, math.floor((min(values, default=0.0) - 0.02) * 10) / 10)  # room below, up to 1.0 above
    scores = Panel(title, "score", [
        Series("accuracy", [(r["global_step"], r["val_accuracy"]) for r in with_val], markers=True),
        Series("macro-F1", [(r["global_step"], r["val_macro_f1"]) for r in with_val], markers=True, dashed=True)],
        y_range=(low, 1.0))
    return line_chart([loss, scores], stage_boundaries(steps, epochs))


def confident_mistakes(predictions: list[dict], class_names: list[str], limit: int = NUM_MISTAKES) -> list[dict]:
    """The wrong test predictions with the highest predicted-class probability, most confident first."""
    wrong = []
    for row in predictions:
        probs = row["probabilities"]
        k = max(range(len(probs)), key=probs.__getitem__)
        if k != row["label"]:
            wrong.append({**row, "predicted": k, "confidence": probs[k]})
    return sorted(wrong, key=lambda r: -r["confidence"])[:limit]


def draw_mistakes(mistakes: list[dict], class_names: list[str]) -> Image.Image:
    """A thumbnail grid of the mistakes, each captioned with file name, true and predicted class."""
    images, captions = [], []
    for m in mistakes:
        try:
            with Image.open(m["image"]) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:  # moved or deleted since the run: a grey tile
            logger.warning("report: cannot show %s: %s", m["image"], exc)
            images.append(Image.new("RGB", (64, 64), (200, 200, 200)))
        captions.append([Path(m["image"]).name, f"true {class_names[m['label']]} -> predicted "
                         f"{class_names[m['predicted']]}", f"confidence {m['confidence']:.2f}"])
    return thumbnail_grid(images, captions)


def _stage_rows(run: Path, names: list[str], steps: list[dict], epochs: list[dict]) -> list[dict]:
    timing = {t["index"]: t["seconds"] for t in (_read_json(run / "timing.json") or {"stages": []})["stages"]}
    last_step = {r["stage_index"]: r["global_step"] for r in sorted(steps + epochs, key=lambda r: r["global_step"])}
    rows, previous = [], 0
    for index, name in enumerate(names):
        manifest = _read_json(run / "stages" / f"{index}-{name}" / "trainable.json")
        end = last_step.get(index, previous)
        rows.append({"index": index, "name": name, "groups": manifest["groups"] if manifest else None,
                     "trainable": manifest["trainable_parameters"] if manifest else None,
                     "total": manifest["total_parameters"] if manifest else None,
                     "steps": end - previous, "epochs": sum(r["stage_index"] == index for r in epochs),
                     "seconds": timing.get(index)})
        previous = end
    return rows


def render_report(name: str, class_names: list[str], stages: list[dict], epochs: list[dict],
                  results: dict | None, predictions: list[dict], mistakes: list[dict]) -> str:
    """report.md's text."""
    parts = [f"# Run report: {name}", _encoder_section(results or (epochs[-1] if epochs else {})),
             _stages_section(stages), _results_section(epochs, results)]
    if results and "test" in results:
        parts.append(_confusion_section(results["test"]["confusion_matrix"], class_names))
    parts.append(_sources_section(predictions, len(class_names)))
    parts.append("## Curves\n\n![training curves](curves.png)")
    parts.append(_mistakes_section(mistakes, class_names))
    return "\n\n".join(p for p in parts if p) + "\n"


def _encoder_section(record: dict) -> str:
    if "encoder" not in record:
        return ""
    line = f"Vision encoder actually used: **{record['encoder']}**"
    if record.get("fallback_cause"):
        return line + (f" (fallback: the requested `{record['requested_encoder']}` could not be built: "
                       f"{record['fallback_cause']})")
    return line + " (as requested; no fallback)."


def _stages_section(stages: list[dict]) -> str:
    lines = ["## Stages", "", "| # | stage | trainable groups (parameters) | trainable | steps | epochs | time |",
             "|---|---|---|---|---|---|---|"]
    for s in stages:
        groups = ", ".join(f"{g} ({e['parameters']:,})" for g, e in s["groups"].items()) if s["groups"] else "-"
        share = f"{s['trainable']:,} of {s['total']:,}" if s["trainable"] is not None else "-"
        seconds = f"{s['seconds']:.1f} s" if s["seconds"] is not None else "-"
        lines.append(f"| {s['index']} | {s['name']} | {groups} | {share} | {s['steps']} | {s['epochs']} | {seconds} |")
    return "\n".join(lines)


def _results_section(epochs: list[dict], results: dict | None) -> str:
    lines = ["## Results", ""]
    with_val = [r for r in epochs if "val_macro_f1" in r]
    if with_val:
        best, last = max(with_val, key=lambda r: r["val_macro_f1"]), with_val[-1]
        lines += ["| | step | stage | accuracy | macro-F1 | loss |", "|---|---|---|---|---|---|",
                  _metric_row("best validation", best), _metric_row("final validation", last)]
    if results and "test" in results:
        t = results["test"]
        lines.append(f"| test ({t['samples']} images, final model) | {results['global_step']} | - | "
                     f"{t['accuracy']:.4f} | {t['macro_f1']:.4f} | {t['loss']:.4f} |")
    if len(lines) == 2:
        lines.append("No validation or test metrics yet.")
    return "\n".join(lines)


def _metric_row(label: str, r: dict) -> str:
    return (f"| {label} | {r['global_step']} | {r['stage']} | {r['val_accuracy']:.4f} | {r['val_macro_f1']:.4f} | "
            f"{r['val_loss']:.4f} |")


def _confusion_section(counts: list[list[int]], class_names: list[str]) -> str:
    header = "| true \\ predicted | " + " | ".join(class_names) + " |"
    rows = [f"| {n} | " + " | ".join(str(v) for v in row) + " |" for n, row in zip(class_names, counts)]
    return "\n".join(["## Test confusion matrix", "", header, "|---" * (len(class_names) + 1) + "|", *rows])


def _sources_section(predictions: list[dict], num_classes: int) -> str:
    labels = [r["label"] for r in predictions]
    preds = [max(range(num_classes), key=r["probabilities"].__getitem__) for r in predictions]
    metrics = per_source_metrics(labels, preds, [r.get("source") for r in predictions], num_classes)
    if not metrics:
        return ""
    lines = ["## Test metrics per source", "", "| source | images | accuracy | macro-F1 |", "|---|---|---|---|"]
    lines += [f"| {s} | {m['images']} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |" for s, m in metrics.items()]
    return "\n".join(lines)


def _mistakes_section(mistakes: list[dict], class_names: list[str]) -> str:
    if not mistakes:
        return "## Most confident mistakes\n\nNone: every test image was classified right (or no test split)."
    lines = [f"## Most confident mistakes ({len(mistakes)})", "", "![most confident mistakes](mistakes.png)", "",
             "| image | true | predicted | confidence |", "|---|---|---|---|"]
    lines += [f"| {m['image']} | {class_names[m['label']]} | {class_names[m['predicted']]} | {m['confidence']:.3f} |"
              for m in mistakes]
    return "\n".join(lines)
