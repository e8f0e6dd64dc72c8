"""Fingerprints of the base checkpoints a run builds on, so a resume never puts its tensors on other weights.

A resume checkpoint leaves out the frozen tensors that came from the base folders (`model.language.checkpoint`,
`model.vision.checkpoint`; `InternVL2MultimodalModel.base_checkpoints`): `--resume` rebuilds the model from
those folders. So every checkpoint records what it was built on (`BASES_NAME`), per base folder:
- per weights file (`*.safetensors`): its name, its size, the SHA-256 of its safetensors header (every
  tensor's name, dtype, shape and byte offsets), and the SHA-256 of the first and last `EDGE` bytes of every
  tensor's data. Another checkpoint of the same architecture (a different fine-tune, a re-initialisation)
  has the same header and size but other bytes in every tensor it changed; the edges see that.
- the SHA-256 of every other file that shapes the model: config.json, the preprocessor's and the tokenizer's
  files (`FINGERPRINTED_SUFFIXES`); a model card or a Python file does not count.
What this costs does not grow with the weights: the headers and 2 x `EDGE` bytes per tensor (about 6 MB for
InternVL2.5-1B), read once when a run starts and once on `--resume`. File times are not used (a copied
folder has new times and the same content); a moved folder with the same content is the same base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

from models.encoders.hf_loading import looks_local
from models.internvl2 import InternVL2MultimodalModel

logger = logging.getLogger(__name__)

BASES_NAME = "base_checkpoints.json"  # in every resume checkpoint
EDGE = 4096  # bytes hashed at the start and at the end of every tensor's data
FINGERPRINTED_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")  # hashed whole: configs, tokenizer files


class BaseCheckpointChanged(RuntimeError):
    """A base folder differs from the one a checkpoint was trained on."""


def safetensors_fingerprint(path: Path) -> dict[str, Any]:
    """Size, header hash and tensor-edge hash of one safetensors file (reads the header and 2 x EDGE per tensor)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))  # the format: u64 header length, JSON header, data
        header = handle.read(length)
        edges = hashlib.sha256()
        tensors = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
        for name in sorted(tensors):
            start, end = tensors[name]["data_offsets"]  # relative to the end of the header
            for offset, size in sorted({(start, min(EDGE, end - start)), (max(start, end - EDGE), min(EDGE, end - start))}):
                handle.seek(8 + length + offset)
                edges.update(handle.read(size))
    return {"size": path.stat().st_size, "header_sha256": hashlib.sha256(header).hexdigest(),
            "tensor_edges_sha256": edges.hexdigest()}


def folder_fingerprint(folder: Path) -> dict[str, dict[str, Any]]:
    """File name -> fingerprint for the weights and the configuration files of a checkpoint folder."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix == ".safetensors":
            found[path.name] = safetensors_fingerprint(path)
        elif path.suffix in FINGERPRINTED_SUFFIXES:
            found[path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return found


def local_folder(checkpoint: str) -> Path:
    """The folder `checkpoint` names: itself, or a hub id's snapshot in the local cache (never downloaded here)."""
    if looks_local(checkpoint):
        return Path(checkpoint)
    return Path(snapshot_download(checkpoint, local_files_only=True))


def base_fingerprints(model: InternVL2MultimodalModel) -> dict[str, dict[str, Any]]:
    """Config key -> {"folder", "files"} for every base checkpoint of `model` (what `BASES_NAME` holds)."""
    return {base.key: {"folder": base.folder, "files": folder_fingerprint(local_folder(base.folder))}
            for base in model.base_checkpoints()}


def base_changes(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> list[str]:
    """One line per base that differs: which config key, which folder, and what changed in it."""
    changes = []
    for key in sorted(set(saved) | set(now)):
        if key not in now or key not in saved:
            changes.append(f"{key}: {saved.get(key, {}).get('folder')} -> {now.get(key, {}).get('folder')}")
            continue
        what = _file_changes(saved[key]["files"], now[key]["files"])
        if what:
            changes.append(f"{key} ({now[key]['folder']}): {'; '.join(what)}")
        elif saved[key]["folder"] != now[key]["folder"]:
            logger.info("%s moved from %s to %s with the same content", key, saved[key]["folder"], now[key]["folder"])
    return changes


def _file_changes(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> list[str]:
    what = [f"{name} is new" for name in sorted(set(now) - set(saved))]
    what += [f"{name} is gone" for name in sorted(set(saved) - set(now))]
    for name in sorted(set(saved) & set(now)):
        before, after = saved[name], now[name]
        if before == after:
            continue
        if "sha256" in before or "sha256" in after:
            what.append(f"{name} has other content")
        elif before["header_sha256"] != after["header_sha256"]:
            what.append(f"{name} holds other tensors (names, dtypes or shapes; header differs)")
        elif before["size"] != after["size"]:
            what.append(f"{name} size {before['size']} -> {after['size']}")
        else:
            what.append(f"{name} holds other values (same tensors, data differs)")
    return what


def check_same_bases(checkpoint: Path, model: InternVL2MultimodalModel) -> None:
    """Refuse to resume from `checkpoint` onto base folders other than those it was trained on.

    Raises:
        BaseCheckpointChanged: one line naming each changed base folder and what changed.
    """
    path = checkpoint / BASES_NAME
    if not path.is_file():  # written by every checkpoint since they became lean; older ones hold all weights
        logger.warning("%s has no %s: not checking the base checkpoints", checkpoint, BASES_NAME)
        return
    changes = base_changes(json.loads(path.read_text()), base_fingerprints(model))
    if changes:
        raise BaseCheckpointChanged(f"refusing to resume from {checkpoint.name}: the base checkpoints it builds on "
                                    f"changed: {' | '.join(changes)}")
