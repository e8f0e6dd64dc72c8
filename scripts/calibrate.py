"""Fit an export's temperature on your own labelled images and record it in the export.

    python scripts/calibrate.py --checkpoint runs/demo/final --data my_scans/metadata.csv
                                [--batch-size 16] [--device auto]

--data is anything `data.manifest.load_records` reads. The export's model classifies every image;
one temperature T > 0 is fitted on the logits by minimising the negative log-likelihood
(`models.calibration.fit_calibration`), and config.json's "calibration" (and the model card's
calibration section) are rewritten with it: each file is written beside itself and renamed into
place, so a crash leaves the old file or the new one, never half of one. The predicted classes do
not change; the probabilities predict.py and evaluate.py report do.

Prints the ECE and NLL on these images before (T = 1) and after scaling, and the temperature the
export held before. Images that cannot be read are left out (with a warning). Exit status: 0 when
calibrated, 2 when the checkpoint or manifest cannot be used or no image could be read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from models.calibration import fit_calibration  # noqa: E402
from models.measure import quiet_and_threaded  # noqa: E402
from models.inference import LoadError, add_batch_arguments, labelled_logits, load_labelled, predict_records  # noqa: E402
from models.internvl2 import write_calibration  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="exported model folder (rewritten)")
    parser.add_argument("--data", required=True, type=Path, help="labelled manifest (.csv/.jsonl) or folder")
    add_batch_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_and_threaded(None)
    try:
        counter, records = load_labelled(args.checkpoint, args.data, args.device)
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    predictions = predict_records(counter, records, args.batch_size)
    for p in predictions:
        if not p.ok:
            print(f"warning: left out {p.image}: {p.error}", file=sys.stderr)
    logits, labels = labelled_logits(records, predictions)
    if not len(labels):
        print(f"error: none of the {len(records)} images could be read", file=sys.stderr)
        return 2
    calibration = fit_calibration(logits, labels, fitted_on=str(args.data))
    write_calibration(args.checkpoint, calibration)
    c = calibration
    print(f"temperature {counter.temperature:.4f} -> {c.temperature:.4f} (fitted on {c.num_samples} images)")
    print(f"ECE {c.ece_before:.4f} before temperature scaling (T = 1), {c.ece_after:.4f} after; "
          f"NLL {c.nll_before:.4f} -> {c.nll_after:.4f}")
    print(f"-> {args.checkpoint / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
