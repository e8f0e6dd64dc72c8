"""The assembled receipt counter on tiny random checkpoints."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from transformers import InternVLModel

from models.build import build_model
from models.encoders import EncoderUnavailableError, encoder_names
from models.internvl2 import InternVL2MultimodalModel
from tests.conftest import make_config

NAMES = encoder_names()


def build(tiny, encoder, *overrides):
    return build_model(make_config(tiny, encoder, *overrides).model)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(224, 224), (224, 448)], ids=["square", "tall"])
def test_forward_shapes_and_loss(name, size, tiny_checkpoints):
    model = build(tiny_checkpoints, name, f"model.vision.image_size=[{size[0]}, {size[1]}]").eval()
    labels = torch.tensor([0, 2])
    out = model(torch.randn(2, 3, *size), labels=labels)
    assert out.logits.shape == (2, 3)
    assert torch.isfinite(out.logits).all() and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model.encode_images(torch.randn(1, 3, *size)).shape[1] == model.num_image_tokens(size)


def test_per_sample_questions_change_the_text_path(tiny_checkpoints):
    model = build(tiny_checkpoints, "swin").eval()
    with torch.no_grad():  # open the gates so text and image both reach the head
        for block in model.fusion.blocks:
            block.attn_gate.alpha.fill_(1.0)
    x = torch.randn(2, 3, 224, 224)
    ids, mask = model.tokenize(["How many receipts?", None])
    default_ids, _ = model.tokenize([None, None])
    assert torch.equal(ids[1, : mask[1].sum()], default_ids[1, : mask[1].sum()])
    assert not torch.allclose(model(x, ids, mask).logits[0], model(x).logits[0])
    torch.testing.assert_close(model(x, ids, mask).logits[1], model(x).logits[1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("groups", [["projector", "head"], ["vision.last_stage", "vision.final_norm"],
                                    ["fusion"]], ids=lambda g: "+".join(g))
def test_optimizer_steps_change_exactly_the_trainable_groups(name, groups, tiny_checkpoints):
    model = build(tiny_checkpoints, name).train()
    available = model.parameter_groups()
    groups = [g for g in groups if g in available]  # a mean-pooling ViT has no final norm
    model.requires_grad_(False)
    for group in groups:
        for module in available[group]:
            module.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # zero-init gates block the image path; open them as a first step would
        for block in model.fusion.blocks:
            block.attn_gate.alpha.fill_(0.5)
            block.mlp_gate.alpha.fill_(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    x, labels = torch.randn(2, 3, 224, 224), torch.tensor([0, 1])
    model(x, labels=labels).loss.backward()
    assert all(p.grad is not None for p in trainable), "a trainable parameter got no gradient"
    opt.step()
    ids = {id(p) for p in trainable}
    for n, p in model.named_parameters():
        if id(p) in ids:
            assert not torch.equal(p, before[n]), f"{n} is trainable but unchanged"
        else:
            assert p.grad is None and torch.equal(p, before[n]), f"{n} is frozen but changed"


def test_internvit_reuses_the_checkpoint_projector(tiny_checkpoints):
    model = build(tiny_checkpoints, "internvit").eval()
    internvl = InternVLModel.from_pretrained(tiny_checkpoints["internvl2"]).eval()  # transformers alone
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = internvl.get_image_features(pixel_values=x).pooler_output
        torch.testing.assert_close(model.encode_images(x), ref, rtol=1e-5, atol=1e-5)
    assert model.config.projector.pixel_shuffle == 2


def test_internvit_rejects_a_conflicting_pixel_shuffle(tiny_checkpoints):
    with pytest.raises(ValueError, match="pixel_shuffle=3 conflicts"):
        build(tiny_checkpoints, "internvit", "model.projector.pixel_shuffle=3")


def test_fallback_is_taken_logged_and_recorded(tiny_checkpoints, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="models.build"):
        model = build(tiny_checkpoints, "swin", f"model.vision.checkpoint={tmp_path / 'missing'}",
                      "model.vision.fallback=internvit")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'swin'" in warnings[0].message and "'internvit'" in warnings[0].message
    assert "does not exist" in warnings[0].message
    assert model.vision.name == "internvit"
    vision = model.config.vision
    assert (vision.encoder, vision.requested_encoder) == ("internvit", "swin")
    assert "does not exist" in vision.fallback_cause
    model.eval().save_pretrained(tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["encoder"] == "internvit" and exported["model"]["vision"]["requested_encoder"] == "swin"
    x = torch.randn(2, 3, 224, 224)
    reloaded = InternVL2MultimodalModel.from_pretrained(tmp_path / "export")
    assert reloaded.vision.name == "internvit"
    assert torch.equal(reloaded(x).logits, model(x).logits)


def test_no_fallback_is_a_clear_error(tiny_checkpoints, tmp_path):
    with pytest.raises(EncoderUnavailableError, match="fallback is null"):
        build(tiny_checkpoints, "swinv2", f"model.vision.checkpoint={tmp_path / 'missing'}", "model.vision.fallback=null")


def test_shape_mismatch_never_falls_back(tiny_checkpoints, tmp_path):
    broken = tmp_path / "swin_wrong_width"
    shutil.copytree(tiny_checkpoints["swin"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["embed_dim"] = 24  # weights were saved with 16
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception) as e:
        build(tiny_checkpoints, "swin", f"model.vision.checkpoint={broken}", "model.vision.fallback=internvit")
    assert not isinstance(e.value, EncoderUnavailableError)
    with pytest.raises(ValueError, match="feature_stages"):
        build(tiny_checkpoints, "swin", "model.vision.feature_stages=[7]", "model.vision.fallback=internvit")


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_gives_identical_logits(name, tiny_checkpoints, tmp_path):
    model = build(tiny_checkpoints, name, "model.vision.feature_stages=[-1]").eval()
    x = torch.randn(2, 3, 224, 224)
    model.save_pretrained(tmp_path / "export")
    reloaded = InternVL2MultimodalModel.from_pretrained(tmp_path / "export")
    assert torch.equal(reloaded(x).logits, model(x).logits)
    assert reloaded.preprocessing == model.preprocessing and reloaded.class_names == ["0", "1", "2+"]
    model.save_pretrained(tmp_path / "export")  # overwriting an export leaves no temp folders behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_hierarchical_features_round_trip(tiny_checkpoints, tmp_path):
    model = build(tiny_checkpoints, "swin", "model.vision.feature_stages=[-2, -1]", "model.projector.pixel_shuffle=2")
    model.eval()
    assert model.num_image_tokens((224, 224)) == 7 * 7 + 4 * 4  # 14x14 -> 7x7, 7x7 -> 4x4 (padded)
    model.save_pretrained(tmp_path / "export")
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(InternVL2MultimodalModel.from_pretrained(tmp_path / "export")(x).logits, model(x).logits)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer_config.json"])
def test_incomplete_export_names_the_missing_file(missing, tiny_checkpoints, tmp_path):
    build(tiny_checkpoints, "swin").save_pretrained(tmp_path / "export")
    (tmp_path / "export" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        InternVL2MultimodalModel.from_pretrained(tmp_path / "export")


def test_class_names_must_match_num_classes(tiny_checkpoints):
    with pytest.raises(ValueError, match="class_names has 3 names for model.num_classes=4"):
        build(tiny_checkpoints, "swin", "model.num_classes=4")
