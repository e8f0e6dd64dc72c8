"""The reference of OpenGVLab's InternVL math (tests/reference_internvl.py) checked against transformers'
own Qwen2, Llama and InternVL modules at toy size, in float32.

The name mappings here are small, test-local and written from OpenGVLab's layout; they check the
reference, not the project's loader (tests/test_original_layout.py checks that against the reference).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (InternVLConfig, InternVLModel, InternVLVisionConfig, InternVLVisionModel, LlamaConfig,
                          LlamaModel, Qwen2Config, Qwen2Model)

from models.tiny import write_original_internvl
from tests.reference_internvl import (extract_feature, llm_hidden_states, load_state, pixel_shuffle, read_config,
                                      vit_hidden_states)


VISION_VARIANTS = {"layer_norm": {}, "rms_norm+qk_norm": {"norm_type": "rms_norm", "qk_normalization": True,
                                                         "qkv_bias": False}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference")
    out = {llm: write_original_internvl(root / llm, llm=llm, dtype=torch.float32, seed=3, text={"bias": True}
                                        if llm == "internlm2" else None) for llm in ("qwen2", "internlm2")}
    for name, fields in VISION_VARIANTS.items():
        out[name] = write_original_internvl(root / name, vision=fields, dtype=torch.float32, seed=4)
    return out


def _ids_and_mask(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])  # the second row right-padded
    return ids, mask


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}


def test_qwen2_reference_matches_transformers_qwen2model(folders):
    cfg = read_config(folders["qwen2"])["llm_config"]
    state = load_state(folders["qwen2"])
    hf = Qwen2Model(Qwen2Config(**{k: cfg[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings")})).eval()
    hf.load_state_dict(_strip(state, "language_model.model."), strict=True)  # the names are Qwen2's own
    ids, mask = _ids_and_mask(cfg["vocab_size"])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(llm_hidden_states(state, cfg, ids, mask), expected, atol=1e-5, rtol=1e-5)


def _internlm2_as_llama(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """InternLM2 names -> Llama names, the fused wqkv split per key-value group [queries..., key, value]."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, group = cfg["hidden_size"] // heads, heads // kv
    out = {"embed_tokens.weight": state["language_model.model.tok_embeddings.weight"],
           "norm.weight": state["language_model.model.norm.weight"]}
    rename = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
              "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"language_model.model.layers.{i}.", f"layers.{i}."
        for param in ("weight", "bias"):
            if f"{src}attention.wqkv.{param}" not in state:
                continue
            fused = state[f"{src}attention.wqkv.{param}"]
            fused = fused.reshape(kv, group + 2, hd, *fused.shape[1:])
            out[f"{dst}self_attn.q_proj.{param}"] = fused[:, :group].reshape(heads * hd, *fused.shape[3:])
            out[f"{dst}self_attn.k_proj.{param}"] = fused[:, -2].reshape(kv * hd, *fused.shape[3:])
            out[f"{dst}self_attn.v_proj.{param}"] = fused[:, -1].reshape(kv * hd, *fused.shape[3:])
        for old, new in rename.items():
            for param in ("weight", "bias"):
                if f"{src}{old}.{param}" in state:
                    out[f"{dst}{new}.{param}"] = state[f"{src}{old}.{param}"]
    return out


def test_internlm2_reference_matches_transformers_llama_with_split_wqkv(folders):
    cfg = read_config(folders["internlm2"])["llm_config"]
    assert cfg["bias"] and cfg["rope_scaling"]["type"] == "dynamic"
    state = load_state(folders["internlm2"])
    # Dynamic NTK scaling changes nothing below max_position_embeddings, so plain RoPE is the same function here.
    hf = LlamaModel(LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"], rope_theta=cfg["rope_theta"],
        max_position_embeddings=cfg["max_position_embeddings"], attention_bias=True, mlp_bias=False)).eval()
    # wo has a bias here (bias=True) but Llama's o_proj follows attention_bias too, so every bias is loaded.
    hf.load_state_dict(_internlm2_as_llama(state, cfg), strict=True)
    ids, mask = _ids_and_mask(cfg["vocab_size"])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(llm_hidden_states(state, cfg, ids, mask), expected, atol=1e-5, rtol=1e-5)


def test_llm_reference_is_causal(folders):
    cfg = read_config(folders["internlm2"])["llm_config"]
    state = load_state(folders["internlm2"])
    ids = torch.randint(0, cfg["vocab_size"], (1, 6))
    changed = ids.clone()
    changed[0, 4] = (ids[0, 4] + 1) % cfg["vocab_size"]
    a, b = llm_hidden_states(state, cfg, ids), llm_hidden_states(state, cfg, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def _hf_vision_config(v: dict) -> InternVLVisionConfig:
    return InternVLVisionConfig(
        hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"], image_size=[v["image_size"]] * 2, patch_size=[v["patch_size"]] * 2,
        attention_bias=v["qkv_bias"], use_qk_norm=v["qk_normalization"], norm_type=v["norm_type"],
        layer_norm_eps=v["layer_norm_eps"], use_mean_pooling=True)


def _vision_as_hf(state: dict[str, torch.Tensor], v: dict) -> dict[str, torch.Tensor]:
    """vision_model.* -> InternVLVisionModel names, the fused qkv split into thirds [q | k | v]."""
    c = v["hidden_size"]
    out = {"embeddings.cls_token": state["vision_model.embeddings.class_embedding"],
           "embeddings.position_embeddings": state["vision_model.embeddings.position_embedding"],
           "embeddings.patch_embeddings.projection.weight": state["vision_model.embeddings.patch_embedding.weight"],
           "embeddings.patch_embeddings.projection.bias": state["vision_model.embeddings.patch_embedding.bias"]}
    rename = {"attn.proj": "attention.projection_layer", "attn.q_norm": "attention.q_norm",
              "attn.k_norm": "attention.k_norm", "norm1": "layernorm_before", "norm2": "layernorm_after",
              "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(v["num_hidden_layers"]):
        src, dst = f"vision_model.encoder.layers.{i}.", f"encoder.layer.{i}."
        for param in ("weight", "bias"):
            if f"{src}attn.qkv.{param}" in state:
                for j, part in enumerate("qkv"):
                    out[f"{dst}attention.{part}_proj.{param}"] = state[f"{src}attn.qkv.{param}"][j * c:(j + 1) * c]
            for old, new in rename.items():
                if f"{src}{old}.{param}" in state:
                    out[f"{dst}{new}.{param}"] = state[f"{src}{old}.{param}"]
        out[f"{dst}lambda_1"], out[f"{dst}lambda_2"] = state[f"{src}ls1"], state[f"{src}ls2"]
    return out


@pytest.mark.parametrize("variant", list(VISION_VARIANTS))
def test_vit_reference_matches_transformers_internvl_vision(variant, folders):
    v = read_config(folders[variant])["vision_config"]
    state = load_state(folders[variant])
    hf = InternVLVisionModel(_hf_vision_config(v)).eval()
    hf.load_state_dict(_vision_as_hf(state, v), strict=True)
    pixels = torch.randn(2, 3, v["image_size"], v["image_size"])
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    ours = vit_hidden_states(state, v, pixels)
    assert len(ours) == len(expected) == v["num_hidden_layers"] + 1
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("select_layer", [-1, -2])
def test_extract_feature_matches_transformers_internvl_image_features(select_layer, folders):
    top = read_config(folders["qwen2"])
    v, t = top["vision_config"], top["llm_config"]
    state = load_state(folders["qwen2"])
    config = InternVLConfig(vision_config=_hf_vision_config(v).to_dict(), downsample_ratio=top["downsample_ratio"],
                            text_config=Qwen2Config(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                                                    num_hidden_layers=1, num_attention_heads=t["num_attention_heads"],
                                                    num_key_value_heads=t["num_key_value_heads"]).to_dict())
    hf = InternVLModel(config).eval()
    hf.vision_tower.load_state_dict(_vision_as_hf(state, v), strict=True)
    hf.multi_modal_projector.load_state_dict({
        "layer_norm.weight": state["mlp1.0.weight"], "layer_norm.bias": state["mlp1.0.bias"],
        "linear_1.weight": state["mlp1.1.weight"], "linear_1.bias": state["mlp1.1.bias"],
        "linear_2.weight": state["mlp1.3.weight"], "linear_2.bias": state["mlp1.3.bias"]}, strict=True)
    pixels = torch.randn(2, 3, v["image_size"], v["image_size"])
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=pixels, vision_feature_layer=select_layer,
                                         vision_feature_select_strategy="default")
    expected = expected.pooler_output if hasattr(expected, "pooler_output") else expected
    ours = extract_feature(state, v, {**top, "select_layer": select_layer}, pixels)
    assert ours.shape == (2, (v["image_size"] // v["patch_size"]) ** 2 // 4, t["hidden_size"])
    torch.testing.assert_close(ours, expected.reshape(ours.shape), atol=1e-5, rtol=1e-5)


def test_pixel_shuffle_v2_folds_2x2_neighbourhoods_and_v1_is_its_transpose():
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)  # (B, h, w, C)
    v2 = pixel_shuffle(x, 0.5, "v2")
    assert v2.shape == (2, 2, 2, 12)
    # output cell (i, j) holds input cells (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), channels kept together
    i, j = 1, 0
    expected = torch.cat([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1], x[:, 2 * i + 1, 2 * j],
                          x[:, 2 * i + 1, 2 * j + 1]], dim=-1)
    torch.testing.assert_close(v2[:, i, j], expected)
    torch.testing.assert_close(pixel_shuffle(x, 0.5, "v1"), v2.transpose(1, 2))
