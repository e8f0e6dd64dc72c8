"""Pre-train the demo's tiny Swin encoder on rendered scenes and keep it as an encoder checkpoint.

    python scripts/pretrain_encoder.py [--out models/pretrained/receipt-swin-tiny] [--data datasets/pretrain]
        [--train 24000] [--val 600] [--seed 7] [--epochs 10] [--batch-size 32] [--lr 5e-4] [--init DIR]
        [--depths N N N N]

Makes what is missing the way a user would (scripts/make_tiny_checkpoints.py: the random start;
scripts/make_receipts.py: rendered scenes only, with a data seed the demo does not use), trains the
encoder alone to count receipts (`train.pretrain`), and writes it with `models.pretrained.save_encoder`,
recording the commands (the data folder keeps its own in DATA/command.txt, so a later run on it
records the command that made it, not this run's flags), the hours they took and the per-epoch
validation figures in OUT/pretraining.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data.dataset import ReceiptDataset  # noqa: E402
from data.manifest import load_records  # noqa: E402
from data.transforms import AugmentConfig  # noqa: E402
from models.encoders.registry import get_encoder_class  # noqa: E402
from models.files import write_text_atomic  # noqa: E402
from models.pretrained import save_encoder  # noqa: E402
from train.pretrain import CountingProbe, PretrainSettings, count_targets, deepen, pretrain  # noqa: E402

BASE = ROOT / "checkpoints" / "tiny" / "swin"
CLASSES = ["0", "1", "2+"]
MOST = 12  # counts 0 .. 12: the generator's default --max-receipts
DATA_COMMAND_FILE = "command.txt"
# The demo's augmentation (config/demo_swin.yaml): count-exact geometry only.
AUGMENT = AugmentConfig(max_rotation=0, min_crop=1.0, rot90_prob=0.5, brightness=0, contrast=0, saturation=0,
                        blur_prob=0, jpeg_prob=0)


def run(command: list[str]) -> float:
    """Run a project command from the repository root; returns the hours it took."""
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return (time.perf_counter() - started) / 3600


def datasets(data: Path, encoder) -> tuple[tuple[ReceiptDataset, list[int]], tuple[ReceiptDataset, list[int]]]:
    out = []
    for split, augment in (("train", AUGMENT), ("val", None)):
        records = load_records(data / split, CLASSES)
        out.append((ReceiptDataset(records, encoder.preprocessing, augment=augment, seed=0),
                    count_targets(data / split, records, MOST)))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "pretrained" / "receipt-swin-tiny")
    parser.add_argument("--data", type=Path, default=ROOT / "datasets" / "pretrain")
    parser.add_argument("--train", type=int, default=24000)
    parser.add_argument("--val", type=int, default=600)
    parser.add_argument("--seed", type=int, default=7, help="data seed (the demo's data uses 0)")
    parser.add_argument("--epochs", type=int, default=PretrainSettings.epochs)
    parser.add_argument("--batch-size", type=int, default=PretrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=PretrainSettings.lr)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from an encoder this script wrote (its pretraining.json is carried over)")
    parser.add_argument("--depths", type=int, nargs="+", default=None,
                        help="first deepen the starting encoder to this many blocks per stage (new blocks start as "
                             "the identity, so it keeps what it learned; train.pretrain.deepen)")
    args = parser.parse_args(argv)
    python, hours = sys.executable, {}
    data_command = [python, "scripts/make_receipts.py", "--out", str(args.data), "--train", str(args.train),
                    "--val", str(args.val), "--seed", str(args.seed), "--size", "224", "--no-contact-sheet"]
    recorded = args.data / DATA_COMMAND_FILE  # how the folder was made, kept beside it for later runs
    have_data = (args.data / "val" / "metadata.csv").is_file()
    if have_data and not recorded.is_file():
        raise SystemExit(f"{recorded}: missing; this data folder was not written by this script, so its command "
                         "is unknown (write the make_receipts.py command that made it there)")
    if not (BASE / "config.json").is_file():
        hours["checkpoints"] = run([python, "scripts/make_tiny_checkpoints.py", "--out", str(BASE.parent),
                                    "--seed", "0"])
    if not have_data:
        hours["data"] = run(data_command)
        write_text_atomic(recorded, shlex.join(["python", *data_command[1:]]) + "\n")
    start = args.init or BASE
    encoder = get_encoder_class("swin").build(str(start), {}, (224, 224))
    depths = list(encoder.backbone.config.depths)
    if args.depths:
        encoder = deepen(encoder, args.depths)
    probe = CountingProbe(encoder, MOST + 1)
    settings = PretrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    started = time.perf_counter()
    history = pretrain(probe, *datasets(args.data, encoder), settings, log=lambda row: print(row, flush=True))
    hours["training"] = (time.perf_counter() - started) / 3600
    provenance = {"command": shlex.join(["python", "scripts/pretrain_encoder.py", *(argv or sys.argv[1:])]),
                  "data_command": recorded.read_text().strip(),
                  "start": str(args.init) if args.init else "checkpoints/tiny/swin (random, seed 0)",
                  "depths": {"start": depths, "trained": list(encoder.backbone.config.depths)},
                  "settings": vars(settings), "torch_threads": torch.get_num_threads(),
                  "hours": {k: round(v, 3) for k, v in hours.items()}, "epochs": history}
    if args.init:  # the runs before this one, oldest first
        earlier = json.loads((args.init / "pretraining.json").read_text())
        provenance["earlier_runs"] = earlier.pop("earlier_runs", []) + [earlier]
    out = save_encoder(encoder, BASE, args.out, provenance)
    size = (out / "model.safetensors").stat().st_size
    print(f"encoder -> {out} ({size / 2**20:.2f} MiB); hours {provenance['hours']}")


if __name__ == "__main__":
    main()
