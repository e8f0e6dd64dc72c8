"""Evaluate an exported model folder on a labelled manifest.

    python scripts/evaluate.py --checkpoint runs/demo/final --data datasets/receipts/test/metadata.csv
                               [--out outputs/evaluate] [--batch-size 16] [--device auto] [--uncertain-below P]

--data is anything `data.manifest.load_records` reads (a .csv/.jsonl manifest, a folder holding
metadata.csv/.jsonl, or class folders). Writes into --out:
    metrics.json          accuracy, macro-F1, per-class precision/recall/F1/support, the confusion
                          matrix (rows true, columns predicted), expected calibration error (top-1
                          confidence, 15 equal-width bins, see `models.metrics`) of the calibrated
                          probabilities, "calibration" (the export's temperature T with ECE and NLL
                          here at T = 1 and at T), "uncertainty" (the threshold, how many predictions
                          were uncertain, coverage and the accuracy on the others), "per_source" (when
                          the manifest has a `source` column), the encoder actually used (from the
                          checkpoint's resolved config), and the images that failed;
    confusion_matrix.png  the matrix as a picture: counts and row shares, colour scale, accuracy;
    misclassified.csv     image, true, predicted, then prob_<class> for every class.
Every file is written beside its target and renamed into place, so a crash leaves no half-written one.
Images that cannot be read are left out of the metrics and listed under "failed" in metrics.json
(with a warning). Exit status: 0 when evaluated, 2 when the checkpoint or manifest cannot be used or
no image could be read.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from data.manifest import Record  # noqa: E402
from models.calibration import parse_probability  # noqa: E402
from models.files import atomic_path, write_text_atomic  # noqa: E402
from models.inference import (LoadError, add_batch_arguments, Prediction, load_labelled, predict_records,  # noqa: E402
                              prediction_metrics)
from models.measure import markdown_table, quiet_and_threaded  # noqa: E402

# Confusion-matrix picture layout, in pixels.
CELL, LEFT, TOP, BOTTOM, BAR_AREA = 110, 150, 110, 70, 130
BLUES = ((247, 251, 255), (107, 174, 214), (8, 48, 107))  # colour scale: share 0 -> 0.5 -> 1


def summary_lines(metrics: dict) -> list[str]:
    """What the script prints: the headline metrics, calibration before/after, uncertainty, the per-source table."""
    cal, unc = metrics["calibration"], metrics["uncertainty"]
    fitted = f"fitted on {cal['fitted_on']}" if cal["fitted"] else "not fitted"
    lines = [f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
             f"({metrics['num_samples']} images, {metrics['num_failed']} failed)",
             f"ECE {cal['ece_before']:.4f} before temperature scaling (T = 1), {cal['ece_after']:.4f} after "
             f"(T = {cal['temperature']:.4f}, {fitted}); NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}",
             f"uncertain (top probability < {unc['uncertain_below']:g}): {unc['num_uncertain']} of "
             f"{metrics['num_samples']}; accuracy on the other {metrics['num_samples'] - unc['num_uncertain']} "
             f"(coverage {unc['coverage']:.1%}): {unc['confident_accuracy']:.4f}"]
    if metrics["per_source"]:
        rows = [(source, m["images"], f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['ece']:.4f}")
                for source, m in metrics["per_source"].items()]
        lines += ["", "per source:", markdown_table(("source", "images", "accuracy", "macro-F1", "ECE"), rows)]
    return lines


def write_misclassified(path: Path, class_names: list[str], records: list[Record],
                        predictions: list[Prediction]) -> int:
    """CSV of the readable images whose prediction is wrong; returns how many."""
    rows = [(r, p) for r, p in zip(records, predictions) if p.ok and p.class_index != r.label]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "true", "predicted", *[f"prob_{n}" for n in class_names]])
        for r, p in rows:
            writer.writerow([r.path, class_names[r.label], p.label, *[f"{p.probabilities[n]:.6f}" for n in class_names]])
    return len(rows)


def confusion_image_size(num_classes: int) -> tuple[int, int]:
    """(width, height) of the confusion-matrix picture for `num_classes` classes."""
    return LEFT + num_classes * CELL + BAR_AREA, TOP + num_classes * CELL + BOTTOM


def _colour(share: float) -> tuple[int, int, int]:
    """Piecewise-linear white -> blue scale for a share in [0, 1]."""
    low, high, t = (BLUES[0], BLUES[1], share * 2) if share <= 0.5 else (BLUES[1], BLUES[2], share * 2 - 1)
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high))


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """`text`, shortened with "..." until it fits in `width` pixels (long class names)."""
    while draw.textlength(text, font=font) > width and len(text) > 4:
        text = text[:-4] + "..."
    return text


def draw_confusion_matrix(counts: list[list[int]], class_names: list[str], title: str) -> Image.Image:
    """Confusion matrix picture: rows true, columns predicted; each cell shows its count and its share
    of the true class, coloured by that share (the colour bar on the right gives the scale)."""
    n = len(class_names)
    image = Image.new("RGB", confusion_image_size(n), "white")
    draw = ImageDraw.Draw(image)
    font, small, big = (ImageFont.load_default(size=s) for s in (18, 14, 20))
    draw.text((image.width // 2, 24), title, fill="black", font=big, anchor="mm")
    draw.text((LEFT + n * CELL // 2, TOP - 50), "predicted", fill="black", font=font, anchor="mm")
    draw.text((LEFT + n * CELL // 2, TOP + n * CELL + BOTTOM // 2), "rows: true class, columns: predicted class",
              fill="dimgray", font=small, anchor="mm")
    _draw_vertical(image, "true", (20, TOP + n * CELL // 2), font)
    for k, name in enumerate(class_names):
        centre = k * CELL + CELL // 2
        draw.text((LEFT + centre, TOP - 18), _fit(draw, name, font, CELL - 8), fill="black", font=font, anchor="mm")
        draw.text((LEFT - 10, TOP + centre), _fit(draw, name, font, LEFT - 50), fill="black", font=font, anchor="rm")
    for i, row in enumerate(counts):
        total = max(sum(row), 1)
        for j, count in enumerate(row):
            _draw_cell(draw, (LEFT + j * CELL, TOP + i * CELL), count, count / total, font, small)
    _draw_colour_bar(image, draw, n, small)
    return image


def _draw_cell(draw: ImageDraw.ImageDraw, corner: tuple[int, int], count: int, share: float,
               font: ImageFont.FreeTypeFont, small: ImageFont.FreeTypeFont) -> None:
    x, y = corner
    draw.rectangle((x, y, x + CELL, y + CELL), fill=_colour(share), outline="gray")
    ink = "white" if share > 0.5 else "black"  # keep the numbers readable on dark cells
    draw.text((x + CELL // 2, y + CELL // 2 - 10), str(count), fill=ink, font=font, anchor="mm")
    draw.text((x + CELL // 2, y + CELL // 2 + 14), f"{share:.0%}", fill=ink, font=small, anchor="mm")


def _draw_colour_bar(image: Image.Image, draw: ImageDraw.ImageDraw, n: int, small: ImageFont.FreeTypeFont) -> None:
    """A vertical scale from 0% (bottom) to 100% (top) of the true class."""
    x0, y0, height = LEFT + n * CELL + 30, TOP, n * CELL
    for dy in range(height):
        draw.line((x0, y0 + dy, x0 + 20, y0 + dy), fill=_colour(1 - dy / max(height - 1, 1)))
    draw.rectangle((x0, y0, x0 + 20, y0 + height), outline="gray")
    for share in (0.0, 0.5, 1.0):
        y = y0 + round((1 - share) * height)
        draw.text((x0 + 26, y), f"{share:.0%}", fill="black", font=small, anchor="lm")
    _draw_vertical(image, "share of true class", (x0 + 85, y0 + height // 2), small)


def _draw_vertical(image: Image.Image, text: str, centre: tuple[int, int], font: ImageFont.FreeTypeFont) -> None:
    """Text rotated 90 degrees (reading bottom to top), centred at `centre`."""
    left, top, right, bottom = font.getbbox(text)
    label = Image.new("RGB", (right - left + 4, bottom - top + 4), "white")
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill="black", font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (centre[0] - label.width // 2, centre[1] - label.height // 2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="exported model folder")
    parser.add_argument("--data", required=True, type=Path, help="labelled manifest (.csv/.jsonl) or folder")
    parser.add_argument("--out", type=Path, default=Path("outputs/evaluate"), help="default: outputs/evaluate")
    add_batch_arguments(parser)
    parser.add_argument("--uncertain-below", type=parse_probability, metavar="P",
                        help="flag predictions whose top probability is below P (default: the export's "
                             "inference.uncertain_below)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_and_threaded(None)
    try:
        counter, records = load_labelled(args.checkpoint, args.data, args.device, args.uncertain_below)
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    predictions = predict_records(counter, records, args.batch_size)
    metrics = {"checkpoint": str(args.checkpoint), "data": str(args.data),
               **prediction_metrics(counter, [r.label for r in records], predictions,
                                    [r.data_source for r in records])}
    if metrics["num_failed"] == len(records):
        print(f"error: none of the {len(records)} images could be read", file=sys.stderr)
        return 2
    for failure in metrics["failed"]:
        print(f"warning: left out {failure['image']}: {failure['error']}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics["num_misclassified"] = write_misclassified(args.out / "misclassified.csv", counter.class_names,
                                                       records, predictions)
    write_text_atomic(args.out / "metrics.json", json.dumps(metrics, indent=2))
    title = f"Confusion matrix, accuracy {metrics['accuracy']:.1%} (n={metrics['num_samples']}, {counter.encoder})"
    with atomic_path(args.out / "confusion_matrix.png") as tmp:
        draw_confusion_matrix(metrics["confusion_matrix"]["counts"], counter.class_names, title).save(tmp, "PNG")
    print("\n".join(summary_lines(metrics)))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
