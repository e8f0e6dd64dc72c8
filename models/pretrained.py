"""Writing a pre-trained encoder as a checkpoint folder that the encoder adapters load like hub weights.

Public API:
    save_encoder(encoder, base_checkpoint, out, provenance) -> Path
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from models.encoders.base import VisionEncoder


def save_encoder(encoder: VisionEncoder, base_checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                 provenance: dict[str, Any]) -> Path:
    """Write `encoder.backbone` (a transformers model) as a Hugging Face folder: config.json, model.safetensors,
    the base checkpoint's preprocessor_config.json, and pretraining.json (`provenance`: how it was made).

    The folder is written beside `out` and renamed into place, so `out` is never half written and never
    mixes two runs.
    """
    base, out = Path(base_checkpoint), Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    encoder.backbone.save_pretrained(staging)
    shutil.copy(base / "preprocessor_config.json", staging / "preprocessor_config.json")
    (staging / "pretraining.json").write_text(json.dumps(provenance, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
