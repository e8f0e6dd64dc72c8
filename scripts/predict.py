"""Classify images by receipt count with an exported model folder.

    python scripts/predict.py --checkpoint runs/demo/final [--batch-size 16] [--output preds.jsonl|.csv]
                              [--device auto] [--workers 2] [--dtype float32|bfloat16|auto]
                              [--uncertain-below P] PATH ...

PATH may be an image file, a folder (searched recursively for image files, in sorted order) or a
glob ("scans/**/*.jpg"). Exactly one row is written per image, in input order:
    {"image": PATH, "label": NAME, "class_index": K, "probabilities": {NAME: P, ...}, "uncertain": BOOL}
or, for an input that could not be classified (missing, empty, corrupt, not an image, too large, a
folder without images, a glob matching nothing):
    {"image": PATH, "error": "why"}
Probabilities are calibrated with the export's temperature; "uncertain" is true when the top one is
below --uncertain-below (default: the export's inference.uncertain_below).
Rows go to --output (.jsonl, or .csv with one prob_<class> column per class) or, without it, to
stdout as JSONL, each written (and flushed) as soon as its batch is classified. Images are decoded in
--workers DataLoader processes while the model runs, a few batches ahead, so memory stays flat however
many images there are; on the CPU the model then gets the cores the workers leave (at least one
torch thread). A progress bar with images/s goes to stderr. Exit status: 0 when every input
was classified, 1 when any failed, 2 for a usage error or a checkpoint that cannot be loaded.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from pathlib import Path
from typing import IO, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.manifest import IMAGE_EXTENSIONS  # noqa: E402
from models.calibration import parse_probability  # noqa: E402
from models.measure import quiet_and_threaded  # noqa: E402
from models.inference import DEVICES, Prediction, ReceiptCounter, cpu_threads_beside  # noqa: E402

GLOB_CHARS = set("*?[")
OUTPUT_FORMATS = (".jsonl", ".csv")


def expand_inputs(paths: list[str]) -> list[tuple[str, str | None]]:
    """Command-line paths -> (image path, None) for each image, or (path, error) for an input that names none.

    Files are kept as given (a non-image file gets its error from the image loader); folders are
    searched recursively for image extensions, hidden entries skipped, sorted; globs are expanded
    (recursive "**" allowed), sorted, with matched folders searched like folders.
    """
    out: list[tuple[str, str | None]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(_folder_images(path, raw))
        elif path.exists() or not GLOB_CHARS & set(raw):
            out.append((raw, None))  # a missing file gets "file not found" from the loader, in place
        else:
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                out.append((raw, "glob matched no files"))
            for match in matches:
                out.extend(_folder_images(Path(match), match) if Path(match).is_dir() else [(match, None)])
    return out


def _folder_images(folder: Path, shown: str) -> list[tuple[str, str | None]]:
    """Image files under `folder`, recursively and sorted, or one error row for a folder without any."""
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not images:
        return [(shown, f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder")]
    return [(str(p), None) for p in images]


def classify(counter: ReceiptCounter, inputs: list[tuple[str, str | None]], batch_size: int,
             num_workers: int = 0) -> Iterator[Prediction]:
    """Predictions in input order; inputs already known to be bad are passed through as error rows."""
    todo = [path for path, error in inputs if error is None]
    predictions = counter.iter_predict(todo, batch_size=batch_size, num_workers=num_workers)
    for path, error in inputs:
        yield Prediction(image=path, error=error) if error is not None else next(predictions)


class RowWriter:
    """Writes prediction rows as JSONL or CSV (prob_<class> columns) to an open text stream."""

    def __init__(self, stream: IO[str], fmt: str, class_names: list[str]) -> None:
        self.stream, self.fmt, self.class_names = stream, fmt, class_names
        if fmt == ".csv":
            fields = ["image", "label", "class_index", *[f"prob_{n}" for n in class_names], "uncertain", "error"]
            self.csv = csv.DictWriter(stream, fieldnames=fields)
            self.csv.writeheader()

    def write(self, prediction: Prediction) -> None:
        if self.fmt == ".jsonl":
            self.stream.write(json.dumps(prediction.to_row()) + "\n")
        else:
            row = {"image": prediction.image, "label": prediction.label, "class_index": prediction.class_index,
                   "uncertain": prediction.uncertain, "error": prediction.error}
            row.update({f"prob_{n}": p for n, p in (prediction.probabilities or {}).items()})
            self.csv.writerow(row)
        self.stream.flush()  # a long run's rows are usable as they come


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursed) or globs")
    parser.add_argument("--checkpoint", required=True, type=Path, help="exported model folder")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--output", type=Path, help="rows to FILE.jsonl or FILE.csv (default: JSONL on stdout)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda when available")
    parser.add_argument("--workers", type=int, default=2,
                        help="decoding processes running ahead of the model (default 2; 0: decode in between batches)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                        help="weights in memory (default float32, also for a bfloat16 export; auto: as exported)")
    parser.add_argument("--uncertain-below", type=parse_probability, metavar="P",
                        help="flag rows whose top probability is below P (default: the export's "
                             "inference.uncertain_below)")
    args = parser.parse_args(argv)
    if args.output is not None and args.output.suffix.lower() not in OUTPUT_FORMATS:
        parser.error(f"--output must end in {' or '.join(OUTPUT_FORMATS)}, got {args.output}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_and_threaded(None)
    try:
        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        counter = ReceiptCounter.from_pretrained(args.checkpoint, device=args.device, dtype=dtype,
                                                 uncertain_below=args.uncertain_below)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: cannot load checkpoint: {exc}", file=sys.stderr)
        return 2
    if counter.device.type == "cpu" and args.workers:
        torch.set_num_threads(cpu_threads_beside(args.workers))  # the workers' cores are not the model's
    inputs = expand_inputs(args.paths)
    failed = 0
    stream = args.output.open("w", newline="", encoding="utf-8") if args.output else sys.stdout
    try:
        writer = RowWriter(stream, args.output.suffix.lower() if args.output else ".jsonl", counter.class_names)
        with tqdm(total=len(inputs), unit="img", file=sys.stderr, desc="classifying") as bar:
            for prediction in classify(counter, inputs, args.batch_size, args.workers):
                writer.write(prediction)
                failed += not prediction.ok
                bar.update(1)
    finally:
        if args.output:
            stream.close()
    print(f"{len(inputs) - failed} of {len(inputs)} image(s) classified, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
