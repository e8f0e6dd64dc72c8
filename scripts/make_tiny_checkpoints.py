"""Write tiny random InternVL2, Swin and Swin V2 checkpoints in Hugging Face format.

    python scripts/make_tiny_checkpoints.py --out checkpoints/tiny [--seed 0]

They are the embedded default of the demo and the tests, loaded through the same `from_pretrained`
path as real InternVL2.5-1B / Swin-B / Swin V2-B folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.utils import logging as hf_logging  # noqa: E402

from models.tiny import write_tiny_checkpoints  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder to write internvl2/, swin/, swinv2/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    for name, path in write_tiny_checkpoints(args.out, args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
