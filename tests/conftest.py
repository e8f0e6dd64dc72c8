"""Shared fixtures: tiny random checkpoints written once per session, and model configs pointing at them."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from config import load_config
from config.schema import Config
from models.encoders import VisionEncoder, get_encoder_class
from models.tiny import tiny_vision_overrides, write_tiny_checkpoints

REPO = Path(__file__).parents[1]



def tiny_checkpoint(tiny: dict[str, Path], encoder: str) -> Path:
    """The tiny checkpoint folder `encoder` loads from, as its adapter's recipe declares."""
    folder = get_encoder_class(encoder).recipe.tiny_checkpoint
    assert folder is not None, f"encoder {encoder!r} has no tiny checkpoint (its recipe builds it at random)"
    return tiny[folder]


def build_tiny_encoder(tiny: dict[str, Path], encoder: str, size: tuple[int, int] = (224, 224)) -> VisionEncoder:
    """`encoder` on its tiny checkpoint, or at random from its recipe's tiny config when it has none."""
    cls = get_encoder_class(encoder)
    if cls.recipe.tiny_checkpoint is None:
        return cls.build(None, dict(cls.recipe.tiny_config), size)
    return cls.build(str(tiny[cls.recipe.tiny_checkpoint]), {}, size)


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module (scripts are not a package: they are command-line wrappers)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(autouse=True)
def _seed_and_quiet() -> None:
    torch.manual_seed(0)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def make_config(tiny: dict[str, Path], encoder: str, *overrides: str) -> Config:
    """The base config with `encoder` loaded from its tiny checkpoint, plus overrides."""
    return load_config(Path(__file__).parents[1] / "config" / "base.yaml", [
        *tiny_vision_overrides(encoder, tiny["internvl2"].parent),
        f"model.language.checkpoint={tiny['internvl2']}",
        *overrides,
    ])


@pytest.fixture(scope="session")
def receipts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated dataset: 12 training, 6 validation and 6 test images of 64 px."""
    out = tmp_path_factory.mktemp("receipts")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_receipts.py"), "--out", str(out), "--train", "12",
                    "--val", "6", "--test", "6", "--seed", "0", "--size", "64", "--no-contact-sheet"],
                   check=True, capture_output=True)
    return out


def run_args(tiny: dict[str, Path], receipts: Path, out: Path, *extra: str) -> list[str]:
    """`python -m train` arguments for the tiny Swin V2 run on `receipts`, one epoch per stage, plus overrides."""
    sets = ["model.vision.encoder=swinv2", f"model.vision.checkpoint={tiny_checkpoint(tiny, 'swinv2')}",
            f"model.language.checkpoint={tiny['internvl2']}", "model.vision.image_size=[64, 64]",
            f"data.train={receipts / 'train'}", f"data.val={receipts / 'val'}", f"data.test={receipts / 'test'}",
            "data.batch_size=4", "data.eval_batch_size=4", f"output_dir={out}",
            "train.stages.0.epochs=1", "train.stages.1.epochs=1", "train.stages.2.epochs=1", *extra]
    return ["--config", str(REPO / "config" / "base.yaml")] + [a for s in sets for a in ("--set", s)]


class RunsCode:
    """Unpickling this writes a file: what a tampered checkpoint would do on a plain torch.load or pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


# Two gloo processes on this CPU machine, as `accelerate launch --multi_gpu` starts them.
TWO_PROCESSES = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def train_subprocess(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    """`python -m train ARGS` (or under `launcher`) from the repository, one thread per process."""
    command = (launcher or [sys.executable]) + ["-m", "train"] + args
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
