"""Can trivial image statistics alone predict the receipt-count class? Prints Markdown tables.

    python scripts/probe_shortcut.py --train DIR_OR_MANIFEST --test DIR_OR_MANIFEST \
        [--class-names 0,1,2+] [--limit N]

Every image becomes the content-blind statistics of `data.synth.probe` (paper coverage, border
colour, brightness, saturation, greyscale, aspect ratio); a logistic regression and a k-NN trained
on them are scored on the test split. Accuracy beyond chance + margin means the data has a shortcut.
--limit keeps a seeded random subset of at most N images of each split.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synth.probe import FEATURE_NAMES, KNN_K, ProbeReport, probe_sources  # noqa: E402
from models.measure import markdown_table  # noqa: E402


def summary_table(report: ProbeReport) -> str:
    """The sizes, chance and both probes' test accuracy."""
    r = report.result
    rows = [("features used", f"{len(FEATURE_NAMES)}: " + ", ".join(FEATURE_NAMES)),
            ("train / test images", f"{r.train_size} / {r.test_size}"),
            ("chance (majority class of test)", f"{r.chance:.3f} ± {r.margin:.3f} (2 binomial SE)"),
            ("logistic regression accuracy", f"{r.logistic_accuracy:.3f}"),
            (f"k-NN (k={KNN_K}) accuracy", f"{r.knn_accuracy:.3f}"),
            ("shortcut (an accuracy > chance + margin)", "yes" if r.leaks else "no")]
    return markdown_table(["", "value"], rows)


def feature_table(report: ProbeReport, class_names: list[str]) -> str:
    """Each feature's training mean per class and how far apart the classes lie, in feature SDs."""
    rows = [(name, *(f"{m:.3f}" for m in report.class_means[:, i].tolist()), f"{report.spread[i].item():.2f}")
            for i, name in enumerate(FEATURE_NAMES)]
    return markdown_table(["feature", *(f"class {c}" for c in class_names), "spread (SD)"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, type=Path, help="manifest, folder with metadata.csv, or class folders")
    parser.add_argument("--test", required=True, type=Path, help="the same, for the split the probes are scored on")
    parser.add_argument("--class-names", default="0,1,2+", help="comma-separated, in label order")
    parser.add_argument("--limit", type=int, default=None, help="at most N images of each split (seeded subset)")
    args = parser.parse_args(argv)
    class_names = args.class_names.split(",")
    start = time.perf_counter()
    report = probe_sources(args.train, args.test, class_names, args.limit)
    print(summary_table(report), "", feature_table(report, class_names), "", sep="\n")
    print(f"probe took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
