"""Supervised pre-training of a vision encoder alone: count the receipts from its mean-pooled tokens.

Public API:
    CountingProbe(encoder, num_counts)       -- encoder -> mean pool -> LayerNorm -> Linear -> count logits
    count_targets(manifest, records, most)   -- per record: its manifest's `receipt_count`, capped at `most`
    pretrain(probe, train, val, settings, log) -> list of per-epoch metrics
    deepen(encoder, depths) -> a deeper copy of a `swin` encoder that computes the same function

Why not the whole receipt counter: its fusion gates start closed (tanh(0) = 0), so a random encoder
gets no gradient until the gates open, and on scenes where only the receipts tell the classes apart,
random features give the gates no reason to open (a 24k-image run stayed at chance loss for 500
steps). Counting from the encoder's own tokens has a direct gradient path, and the exact count
(0 .. most) asks more of the features than three classes do. The demo then fine-tunes the receipt
counter from the kept encoder, training only its last stage at a low LR (scripts/pretrain_encoder.py,
config/demo_swin.yaml, docs/data.md).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from data.dataset import ReceiptDataset, collate
from data.manifest import Record
from models.encoders.base import VisionEncoder


class CountingProbe(nn.Module):
    """An encoder with a linear count head on its mean-pooled final tokens."""

    def __init__(self, encoder: VisionEncoder, num_counts: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.norm = nn.LayerNorm(encoder.out_channels)
        self.head = nn.Linear(encoder.out_channels, num_counts)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> count logits (B, num_counts)."""
        tokens = self.encoder(pixel_values).tokens  # (B, N, C)
        return self.head(self.norm(tokens.mean(dim=1)))


def count_targets(manifest: str | os.PathLike[str], records: list[Record], most: int) -> list[int]:
    """Each record's `receipt_count` from the manifest (a folder's metadata.csv or the CSV itself), capped at `most`.

    Raises:
        ValueError: the manifest has no `receipt_count` column, or a record's file is not in it.
    """
    path = Path(manifest)
    path = path / "metadata.csv" if path.is_dir() else path
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "receipt_count" not in rows[0]:
        raise ValueError(f"{path}: no receipt_count column (pre-training counts receipts)")
    counts = {str((path.parent / row["file_name"]).resolve()): int(row["receipt_count"]) for row in rows}
    try:
        return [min(counts[str(Path(r.path).resolve())], most) for r in records]
    except KeyError as missing:
        raise ValueError(f"{path}: no row for {missing}") from None


def deepen(encoder: VisionEncoder, depths: list[int]) -> VisionEncoder:
    """A copy of a `swin` encoder (transformers' SwinModel) with more blocks per stage, computing the same function.

    Each stage keeps its blocks where they were (so their shifted / unshifted windows stay as trained) and
    gets new ones appended. A new block's two residual branches end in zeroed projections (attention
    `o_proj`, MLP `fc2`), so it starts as the identity and the deeper encoder gives the same tokens; training
    then grows the new blocks from there (the way zero-initialised residual branches start a deep net).

    Only the pre-norm `swin` blocks: a Swin V2 block normalises its branch after it, so zeroed projections
    would leave the norm's bias behind.

    Raises:
        ValueError: not a `swin` encoder; `depths` has another number of stages, or fewer blocks than the
            encoder has somewhere.
    """
    if encoder.name != "swin":
        raise ValueError(f"deepen: encoder {encoder.name!r}; only 'swin' (pre-norm blocks) can be deepened")
    old = list(encoder.backbone.config.depths)
    if len(depths) != len(old) or any(new < have for new, have in zip(depths, old)):
        raise ValueError(f"depths {list(depths)}: need {len(old)} stages with at least {old} blocks")
    config = encoder.backbone.config.to_dict() | {"depths": list(depths), "num_layers": len(depths)}
    deeper = type(encoder).from_config_dict(config, encoder.preprocessing)
    deeper.train(encoder.training)
    missing, unexpected = deeper.backbone.load_state_dict(encoder.backbone.state_dict(), strict=False)
    new_blocks = {f"encoder.layers.{stage}.blocks.{block}." for stage, (have, new) in enumerate(zip(old, depths))
                  for block in range(have, new)}
    if unexpected or any(not any(key.startswith(prefix) for prefix in new_blocks) for key in missing):
        raise ValueError(f"{type(encoder.backbone).__name__}: unexpected layout (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for stage, (have, new) in enumerate(zip(old, depths)):
            for block in deeper.backbone.encoder.layers[stage].blocks[have:new]:
                for projection in (block.attention.o_proj, block.mlp.fc2):
                    projection.weight.zero_()
                    projection.bias.zero_()
    return deeper


@dataclass(frozen=True)
class PretrainSettings:
    epochs: int = 10  # the committed encoder's first run (docs/data.md); 2e-3 learned slower than 5e-4
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 200
    seed: int = 0


class _Counted(torch.utils.data.Dataset):
    """A ReceiptDataset whose labels are replaced by receipt counts."""

    def __init__(self, dataset: ReceiptDataset, counts: list[int]) -> None:
        self.dataset, self.counts = dataset, counts

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "label": self.counts[index]}


def pretrain(probe: CountingProbe, train: tuple[ReceiptDataset, list[int]], val: tuple[ReceiptDataset, list[int]],
             settings: PretrainSettings, log: Callable[[dict], None] = print) -> list[dict]:
    """Train every parameter of `probe` with AdamW and a warm-up + cosine schedule; evaluate each epoch.

    Returns:
        per epoch: {"epoch", "train_loss", "val_loss", "val_count_accuracy", "val_class_accuracy"}, where
        the class accuracy folds counts into 0 / 1 / 2+.
    """
    torch.manual_seed(settings.seed)
    loader = DataLoader(_Counted(*train), batch_size=settings.batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(settings.seed))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * len(loader)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, steps)
    history = []
    for epoch in range(settings.epochs):
        train[0].set_epoch(epoch)
        probe.train()
        total, seen = 0.0, 0
        for batch in loader:
            loss = F.cross_entropy(probe(batch["pixel_values"]), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total, seen = total + loss.item() * len(batch["labels"]), seen + len(batch["labels"])
        history.append({"epoch": epoch + 1, "train_loss": round(total / max(1, seen), 4), **evaluate_counts(probe, val)})
        log(history[-1])
    return history


@torch.no_grad()
def evaluate_counts(probe: CountingProbe, val: tuple[ReceiptDataset, list[int]], batch_size: int = 64) -> dict:
    probe.eval()
    loader = DataLoader(_Counted(*val), batch_size=batch_size, collate_fn=collate)
    loss, exact, folded, seen = 0.0, 0, 0, 0
    for batch in loader:
        logits, counts = probe(batch["pixel_values"]), batch["labels"]
        loss += F.cross_entropy(logits, counts, reduction="sum").item()
        predicted = logits.argmax(-1)
        exact += (predicted == counts).sum().item()
        folded += (predicted.clamp(max=2) == counts.clamp(max=2)).sum().item()
        seen += len(counts)
    return {"val_loss": round(loss / max(1, seen), 4), "val_count_accuracy": round(exact / max(1, seen), 4),
            "val_class_accuracy": round(folded / max(1, seen), 4) if seen else math.nan}
