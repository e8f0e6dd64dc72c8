"""Weight conversion: round trips, layouts derived from the reference sources, and loud failures."""

from __future__ import annotations

import pytest
import torch
from transformers import Swinv2Config, Swinv2Model

from models.swinv2 import SwinTransformerV2, SwinV2Config, from_transformers, load_state_dict_strict
from models.swinv2 import convert

TINY = dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4,
            drop_path_rate=0.0)


@pytest.fixture(scope="module")
def hf_model() -> Swinv2Model:
    torch.manual_seed(0)
    model = Swinv2Model(Swinv2Config(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def inhouse(hf_model: Swinv2Model) -> SwinTransformerV2:
    return from_transformers(hf_model)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


# -- transformers ---------------------------------------------------------------------------------

def test_transformers_round_trip_is_identity(hf_model: Swinv2Model) -> None:
    sd = hf_model.state_dict()
    assert_same(convert.inhouse_to_transformers(convert.transformers_to_inhouse(sd)), sd)


def test_converted_keys_match_the_inhouse_model(hf_model: Swinv2Model, inhouse: SwinTransformerV2) -> None:
    converted = convert.transformers_to_inhouse(hf_model.state_dict())
    assert set(converted) == set(inhouse.state_dict())
    q = hf_model.state_dict()["encoder.layers.1.blocks.0.attention.self.query.weight"]
    assert torch.equal(converted["layers.1.blocks.0.attn.qkv.weight"][: q.shape[0]], q)


def test_task_model_prefix_and_head_are_handled(hf_model: Swinv2Model, inhouse: SwinTransformerV2) -> None:
    sd = {f"swinv2.{k}": v for k, v in hf_model.state_dict().items()}
    sd["classifier.weight"] = torch.zeros(5, 64)
    assert_same(convert.transformers_to_inhouse(sd), inhouse.state_dict())


def test_shape_mismatch_raises_naming_the_key(hf_model: Swinv2Model) -> None:
    sd = dict(hf_model.state_dict())
    sd["encoder.layers.0.blocks.1.intermediate.dense.weight"] = torch.zeros(7, 16)
    model = SwinTransformerV2(convert.config_from_transformers(hf_model.config))
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.1\.mlp\.fc1\.weight"):
        load_state_dict_strict(model, sd)


def test_mismatched_qkv_parts_raise_naming_the_key(hf_model: Swinv2Model) -> None:
    sd = dict(hf_model.state_dict())
    sd["encoder.layers.0.blocks.0.attention.self.key.weight"] = torch.zeros(16, 8)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.blocks\.0\.attention\.self"):
        convert.transformers_to_inhouse(sd)


def test_unknown_key_raises_naming_it(hf_model: Swinv2Model) -> None:
    sd = dict(hf_model.state_dict())
    sd["encoder.layers.0.blocks.0.attention.self.mystery"] = torch.zeros(1)
    with pytest.raises(KeyError, match="mystery"):
        convert.transformers_to_inhouse(sd)


def test_missing_key_raises_naming_it(hf_model: Swinv2Model) -> None:
    sd = dict(hf_model.state_dict())
    del sd["encoder.layers.2.blocks.1.layernorm_after.bias"]
    model = SwinTransformerV2(convert.config_from_transformers(hf_model.config))
    with pytest.raises(KeyError, match=r"layers\.2\.blocks\.1\.norm2\.bias"):
        load_state_dict_strict(model, sd)
    sd = dict(hf_model.state_dict())
    del sd["encoder.layers.0.blocks.0.attention.self.value.weight"]
    with pytest.raises(KeyError, match=r"attention\.self\.value\.weight"):
        convert.transformers_to_inhouse(sd)


def test_from_transformers_folder_matches_live_model(hf_model: Swinv2Model, tmp_path) -> None:
    hf_model.save_pretrained(tmp_path)
    from_folder = from_transformers(tmp_path)
    live = from_transformers(hf_model)
    assert_same(from_folder.state_dict(), live.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(from_folder(x).last_hidden_state, live(x).last_hidden_state)


def test_config_round_trip() -> None:
    cfg = convert.config_from_transformers(Swinv2Config(**TINY, pretrained_window_sizes=[2, 2, 0]))
    again = convert.config_from_transformers(Swinv2Config(**convert.config_to_transformers(cfg)))
    assert again == cfg
    assert cfg.pretrained_window_sizes == (2, 2, 0)


def test_absolute_embeddings_are_rejected() -> None:
    with pytest.raises(ValueError, match="use_absolute_embeddings"):
        convert.config_from_transformers(Swinv2Config(**TINY, use_absolute_embeddings=True))


# -- timm, Microsoft, torchvision -------------------------------------------------------------------

LAYOUTS = {
    "timm": (convert.inhouse_to_timm, convert.timm_to_inhouse),
    "microsoft": (convert.inhouse_to_microsoft, convert.microsoft_to_inhouse),
    "torchvision": (convert.inhouse_to_torchvision, convert.torchvision_to_inhouse),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_round_trip_and_detection(layout: str, inhouse: SwinTransformerV2) -> None:
    to_layout, from_layout = LAYOUTS[layout]
    sd = inhouse.state_dict()
    external = to_layout(sd)
    assert convert.detect_layout(external) == layout
    assert_same(from_layout(external), sd)
    assert_same(to_layout(from_layout(external)), external)
    model = SwinTransformerV2(inhouse.cfg)
    load_state_dict_strict(model, external)  # detection + conversion + strict load
    assert_same(model.state_dict(), sd)


def test_timm_key_map(inhouse: SwinTransformerV2) -> None:
    """timm merges patches at the start of stage i + 1; q/v biases live on `attn`."""
    timm = convert.inhouse_to_timm(inhouse.state_dict())
    assert "layers.0.downsample.reduction.weight" not in timm
    assert timm["layers.1.downsample.reduction.weight"].shape == (32, 64)
    assert timm["layers.2.downsample.norm.weight"].shape == (64,)
    assert timm["layers.0.blocks.0.attn.q_bias"].shape == (16,)
    assert timm["layers.0.blocks.1.mlp.fc2.weight"].shape == (16, 64)
    assert "norm.weight" in timm and "patch_embed.proj.weight" in timm


def test_microsoft_key_map_and_buffers(inhouse: SwinTransformerV2) -> None:
    """Microsoft merges at the end of stage i and registers its coords / index / mask persistently."""
    ms = convert.inhouse_to_microsoft(inhouse.state_dict(), inhouse.cfg)
    assert ms["layers.0.downsample.reduction.weight"].shape == (32, 64)
    assert ms["layers.1.blocks.0.attn.v_bias"].shape == (32,)
    # 64 px / patch 4 = 16x16 tokens, window 4: 16 windows of 16 tokens, shifted blocks only.
    assert ms["layers.0.blocks.1.attn_mask"].shape == (16, 16, 16)
    assert "layers.0.blocks.0.attn_mask" not in ms
    assert ms["layers.0.blocks.0.attn.relative_coords_table"].shape == (1, 7, 7, 2)
    assert ms["layers.0.blocks.0.attn.relative_position_index"].shape == (16, 16)
    # Stage 2 is 4x4 = the window: Microsoft clips and stops shifting, so no mask there.
    assert "layers.2.blocks.1.attn_mask" not in ms
    assert_same(convert.microsoft_to_inhouse({"model": ms}["model"]), inhouse.state_dict())


def test_torchvision_key_map_and_bias(inhouse: SwinTransformerV2) -> None:
    """torchvision: features.0 stem, features.(2i+1) stages, features.(2i+2) merges, one 3C qkv bias."""
    tv = convert.inhouse_to_torchvision(inhouse.state_dict(), inhouse.cfg)
    assert tv["features.0.0.weight"].shape == (16, 3, 4, 4)
    assert tv["features.0.2.weight"].shape == (16,)
    assert tv["features.2.reduction.weight"].shape == (32, 64)
    assert tv["features.4.norm.weight"].shape == (64,)
    bias = tv["features.3.1.attn.qkv.bias"]
    assert bias.shape == (96,)
    assert torch.equal(bias[32:64], torch.zeros(32))
    assert torch.equal(bias[:32], inhouse.state_dict()["layers.1.blocks.1.attn.qkv.q_bias"])
    assert tv["features.1.0.mlp.3.weight"].shape == (16, 64)
    assert tv["features.1.0.attn.relative_position_index"].shape == (256,)
    # torchvision ignores the k third of qkv.bias (zeroed in its forward), so a non-zero one is dropped.
    tv["features.1.0.attn.qkv.bias"] = tv["features.1.0.attn.qkv.bias"].clone().fill_(1.0)
    assert torch.equal(convert.torchvision_to_inhouse(tv)["layers.0.blocks.0.attn.qkv.q_bias"], torch.ones(16))


@pytest.mark.parametrize("layout,key,inhouse_key", [
    ("timm", "layers.1.downsample.reduction.weight", "layers.0.downsample.reduction.weight"),
    ("microsoft", "layers.1.blocks.1.attn.proj.weight", "layers.1.blocks.1.attn.proj.weight"),
    ("torchvision", "features.3.0.mlp.0.weight", "layers.1.blocks.0.mlp.fc1.weight"),
])
def test_misshaped_tensor_in_layout_raises_naming_the_key(layout: str, key: str, inhouse_key: str,
                                                          inhouse: SwinTransformerV2) -> None:
    external = LAYOUTS[layout][0](inhouse.state_dict())
    external[key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=rf"{inhouse_key.replace('.', '[.]')}.*{key.replace('.', '[.]')}"):
        load_state_dict_strict(SwinTransformerV2(inhouse.cfg), external)


def test_misshaped_torchvision_bias_raises_naming_the_key(inhouse: SwinTransformerV2) -> None:
    tv = convert.inhouse_to_torchvision(inhouse.state_dict())
    tv["features.5.0.attn.qkv.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"features\.5\.0\.attn\.qkv\.bias"):
        convert.torchvision_to_inhouse(tv)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_unknown_key_in_layout_raises(layout: str, inhouse: SwinTransformerV2) -> None:
    external = LAYOUTS[layout][0](inhouse.state_dict())
    external["layers.0.blocks.0.attn.surprise"] = torch.zeros(1)
    external["features.1.0.attn.surprise"] = torch.zeros(1)
    with pytest.raises(KeyError, match="surprise"):
        LAYOUTS[layout][1](external)


def test_inhouse_config_rejects_inconsistent_stages() -> None:
    with pytest.raises(ValueError, match="one entry per stage"):
        SwinV2Config(depths=(2, 2), num_heads=(2,), pretrained_window_sizes=(0, 0))
