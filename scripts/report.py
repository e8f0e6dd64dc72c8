"""Write the report of a training run folder: RUN/curves.png, RUN/mistakes.png and RUN/report.md.

    python scripts/report.py RUN [RUN ...]

A run writes these itself when it ends; this command (re)writes them for any run folder, also one
that is still going or was stopped. Exit status 0, or 2 when a folder is not a run folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.report import write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="a run folder (output_dir of a run)")
    args = parser.parse_args(argv)
    status = 0
    for run in args.runs:
        try:
            written = write_report(run)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        print(f"{run}: " + ", ".join(str(p) for p in written.values()))
    return status


if __name__ == "__main__":
    sys.exit(main())
