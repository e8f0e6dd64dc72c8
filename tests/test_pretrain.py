"""Encoder pre-training (train/pretrain.py, models/pretrained.py): count targets from the manifest, every
parameter trained, the saved folder loads back as the same encoder through the adapter."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from data.dataset import ReceiptDataset
from data.manifest import load_records
from models.encoders.registry import get_encoder_class
from models.pretrained import save_encoder
from tests.conftest import load_script
from train.pretrain import CountingProbe, PretrainSettings, count_targets, deepen, pretrain

CLASSES = ["0", "1", "2+"]


def _write_set(folder: Path, counts: list[int]) -> Path:
    """Images with `count` white strips on grey, and a metadata.csv with receipt_count."""
    folder.mkdir(parents=True)
    with (folder / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "receipt_count", "label"])
        for i, count in enumerate(counts):
            image = Image.new("RGB", (64, 64), (90, 90, 90))
            for k in range(count):
                ImageDraw.Draw(image).rectangle((4 + 14 * k, 8, 12 + 14 * k, 56), fill=(250, 250, 250))
            image.save(folder / f"{i}.png")
            writer.writerow([f"{i}.png", count, min(count, 2)])
    return folder


def test_count_targets_read_the_manifest_and_cap(tmp_path: Path) -> None:
    folder = _write_set(tmp_path / "s", [0, 1, 3, 4])
    records = load_records(folder, CLASSES)
    assert count_targets(folder, records, most=3) == [0, 1, 3, 3]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metadata.csv").write_text("file_name,label\n0.png,0\n")
    with pytest.raises(ValueError, match="no receipt_count column"):
        count_targets(tmp_path / "plain", records, most=3)


def test_pretraining_trains_every_parameter_and_saves_a_loadable_encoder(tiny_checkpoints, tmp_path: Path) -> None:
    swin = get_encoder_class("swin")
    encoder = swin.build(str(tiny_checkpoints["swin"]), {}, (224, 224))
    probe = CountingProbe(encoder, num_counts=4)
    folder = _write_set(tmp_path / "train", [0, 1, 2, 3] * 4)
    records = load_records(folder, CLASSES)
    data = (ReceiptDataset(records, encoder.preprocessing), count_targets(folder, records, most=3))
    before = {name: p.detach().clone() for name, p in probe.named_parameters()}
    history = pretrain(probe, data, data, PretrainSettings(epochs=3, batch_size=8, lr=3e-3, warmup_steps=0),
                       log=lambda row: None)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    unchanged = [name for name, p in probe.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []  # the encoder too: nothing is frozen in pre-training
    out = save_encoder(encoder, tiny_checkpoints["swin"], tmp_path / "kept", {"command": "test"})
    assert json.loads((out / "pretraining.json").read_text()) == {"command": "test"}
    assert not (tmp_path / "kept.partial").exists()
    reloaded = swin.build(str(out), {}, (224, 224))
    pixels = torch.stack([data[0][i]["pixel_values"] for i in range(4)])
    encoder.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(pixels).tokens, encoder(pixels).tokens, atol=1e-6)


def test_deepen_appends_identity_blocks_that_then_learn(tiny_checkpoints) -> None:
    """A deepened encoder gives the same tokens as the one it came from, with more blocks per stage; its new
    blocks get gradient (through their zeroed output projections first) and the old weights are kept."""
    encoder = get_encoder_class("swin").build(str(tiny_checkpoints["swin"]), {}, (224, 224)).eval()
    old = list(encoder.backbone.config.depths)
    depths = [d + extra for d, extra in zip(old, [1, 2] + [0] * (len(old) - 2))]
    deeper = deepen(encoder, depths)
    assert [len(stage.blocks) for stage in deeper.backbone.encoder.layers] == depths
    assert not deeper.training
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(deeper(pixels).tokens, encoder(pixels).tokens, atol=1e-5)
    kept = encoder.backbone.state_dict()
    assert all(torch.equal(value, kept[name]) for name, value in deeper.backbone.state_dict().items() if name in kept)
    new = deeper.backbone.encoder.layers[1].blocks[old[1]]
    deeper(pixels).tokens.square().mean().backward()
    assert new.attention.o_proj.weight.grad.abs().sum() > 0 and new.mlp.fc2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"depths \[1\]: need 4 stages"):
        deepen(encoder, [1])
    with pytest.raises(ValueError, match=r"at least \[1, 1, 2, 1\] blocks"):
        deepen(encoder, [0, 3, 2, 1])
    swinv2 = get_encoder_class("swinv2").build(str(tiny_checkpoints["swinv2"]), {}, (224, 224))
    with pytest.raises(ValueError, match=r"encoder 'swinv2'; only 'swin' \(pre-norm blocks\) can be deepened"):
        deepen(swinv2, [2, 2])


def test_the_committed_encoder_is_small_records_how_it_was_made_and_loads() -> None:
    """models/pretrained/receipt-swin-tiny, the demo's starting point: at most 5 MB, its provenance kept,
    loadable by the swin adapter like any hub folder, and the tiny architecture the demo was sized for."""
    folder = Path(__file__).resolve().parents[1] / "models" / "pretrained" / "receipt-swin-tiny"
    assert (folder / "model.safetensors").stat().st_size <= 5 * 2**20
    provenance = json.loads((folder / "pretraining.json").read_text())
    assert provenance["command"].startswith("python scripts/pretrain_encoder.py")
    assert provenance["hours"]["training"] > 0 and provenance["epochs"]
    encoder = get_encoder_class("swin").build(str(folder), {}, (224, 224))
    # the tiny width, deepened from 1-1-2-1 in its eighth run (train.pretrain.deepen)
    assert encoder.backbone.config.embed_dim == 16 and list(encoder.backbone.config.depths) == [1, 1, 4, 2]
    runs = provenance.get("earlier_runs", []) + [provenance]
    assert {"start": [1, 1, 2, 1], "trained": [1, 1, 4, 2]} in [run.get("depths") for run in runs]


def test_the_script_refuses_a_data_folder_whose_command_it_cannot_record(tmp_path: Path) -> None:
    """A run on a folder it did not write would record its own flags as the data's command: a false
    provenance for the committed encoder. It stops first, naming the file it needs."""
    script = load_script("pretrain_encoder")
    _write_set(tmp_path / "data" / "val", [0, 1])
    with pytest.raises(SystemExit, match=r"data/command\.txt: missing; this data folder was not written"):
        script.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
