"""Shared fixtures: tiny random checkpoints written once per session, and model configs pointing at them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from config import load_config
from config.schema import Config
from models.encoders import encoder_names
from models.tiny import write_tiny_checkpoints

# Which tiny checkpoint folder each registered encoder loads from. A newly registered encoder must be
# added here, or every registry-wide test fails loudly.
ENCODER_CHECKPOINT = {"internvit": "internvl2", "swin": "swin", "swinv2": "swinv2", "swinv2_inhouse": "swinv2"}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(autouse=True)
def _seed_and_quiet() -> None:
    torch.manual_seed(0)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def make_config(tiny: dict[str, Path], encoder: str, *overrides: str) -> Config:
    """The base config with `encoder` loaded from its tiny checkpoint, plus overrides."""
    assert set(encoder_names()) <= set(ENCODER_CHECKPOINT), "add new encoders to ENCODER_CHECKPOINT"
    return load_config(Path(__file__).parents[1] / "config" / "base.yaml", [
        f"model.vision.encoder={encoder}",
        f"model.vision.checkpoint={tiny[ENCODER_CHECKPOINT[encoder]]}",
        f"model.language.checkpoint={tiny['internvl2']}",
        *overrides,
    ])
