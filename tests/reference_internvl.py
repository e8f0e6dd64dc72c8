"""OpenGVLab's InternVL math in plain torch, on a state dict with the original key names.

An independent reference for the tests, written from OpenGVLab's `modeling_intern_vit.py`,
`modeling_internvl_chat.py` (extract_feature, pixel_shuffle, mlp1) and `modeling_internlm2.py`, and
from Qwen2's published architecture. It shares nothing with the project's loader: it reads the
folder's safetensors and config.json and computes, in float32:

    pixel_values (B, 3, S, S) -> InternViT hidden states -> select_layer -> drop CLS -> (B, h, w, C)
        -> pixel_shuffle (ps_version) -> (B, h*w/4, 4C) -> mlp1 -> (B, N, D)          `extract_feature`
    input_ids (B, T) -> Qwen2 / InternLM2 decoder layers -> final RMSNorm -> (B, T, D)  `llm_hidden_states`
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

State = dict[str, torch.Tensor]


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


def load_state(folder: Path) -> State:
    """Every tensor of the folder's safetensors files (sharded or not), in float32, by its original name."""
    state: State = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state.update({name: t.float() for name, t in load_file(str(path)).items()})
    return state


def _linear(x: torch.Tensor, state: State, name: str) -> torch.Tensor:
    return F.linear(x, state[name + ".weight"], state.get(name + ".bias"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, computed in float32 (InternRMSNorm / Qwen2RMSNorm)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# --- InternViT ---------------------------------------------------------------------------------------------

def _vit_norm(x: torch.Tensor, state: State, name: str, v: dict[str, Any]) -> torch.Tensor:
    if v["norm_type"] == "rms_norm":
        return rms_norm(x, state[name + ".weight"], v["layer_norm_eps"])
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], v["layer_norm_eps"])


def _vit_attention(x: torch.Tensor, state: State, prefix: str, v: dict[str, Any]) -> torch.Tensor:
    """(B, N, C) -> (B, N, C): one fused qkv Linear whose rows are [q | k | v], each head-major."""
    b, n, c = x.shape
    heads = v["num_attention_heads"]
    hd = c // heads
    q, k, val = _linear(x, state, prefix + "qkv").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
    if v["qk_normalization"]:  # one RMSNorm across all heads (C wide), applied before the split into heads
        q = rms_norm(q.transpose(1, 2).reshape(b, n, c), state[prefix + "q_norm.weight"], v["layer_norm_eps"])
        k = rms_norm(k.transpose(1, 2).reshape(b, n, c), state[prefix + "k_norm.weight"], v["layer_norm_eps"])
        q, k = (t.reshape(b, n, heads, hd).transpose(1, 2) for t in (q, k))
    weights = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1)  # (B, H, N, N)
    out = (weights @ val).transpose(1, 2).reshape(b, n, c)
    return _linear(out, state, prefix + "proj")


def vit_hidden_states(state: State, v: dict[str, Any], pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """InternVisionModel's hidden_states: the embeddings, then each layer's output, (B, 1 + h*w, C) each.

    Position embeddings are used at the native size (image_size / patch_size per side), where the
    original's bicubic resize to the same size is the identity; other sizes are refused.
    """
    pre = "vision_model.embeddings."
    p = v["patch_size"]
    x = F.conv2d(pixel_values, state[pre + "patch_embedding.weight"], state[pre + "patch_embedding.bias"], stride=p)
    b, c, h, w = x.shape
    if (h, w) != (v["image_size"] // p,) * 2:
        raise ValueError(f"the reference runs InternViT at its native {v['image_size']} px only, got {h * p}x{w * p}")
    x = x.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major over the grid
    x = torch.cat([state[pre + "class_embedding"].expand(b, 1, c), x], dim=1) + state[pre + "position_embedding"]
    states = [x]
    for i in range(v["num_hidden_layers"]):
        layer = f"vision_model.encoder.layers.{i}."
        attn = _vit_attention(_vit_norm(x, state, layer + "norm1", v), state, layer + "attn.", v)
        x = x + attn * state[layer + "ls1"]
        mlp = _linear(F.gelu(_linear(_vit_norm(x, state, layer + "norm2", v), state, layer + "mlp.fc1")),
                      state, layer + "mlp.fc2")
        x = x + mlp * state[layer + "ls2"]
        states.append(x)
    return states


def pixel_shuffle(x: torch.Tensor, scale: float, ps_version: str) -> torch.Tensor:
    """(B, h, w, C) -> (B, h*scale, w*scale, C/scale^2), by the original's exact views and permutes.

    Pairs along the second grid axis are folded into channels, the two grid axes swapped, pairs along the
    (new) second axis folded, and for ps_version "v2" the axes swapped back; "v1" leaves the grid transposed.
    """
    n, a, b, c = x.shape  # the original calls these (n, w, h, c)
    x = x.reshape(n, a, int(b * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()  # (n, b*scale, a, c/scale)
    x = x.reshape(n, int(b * scale), int(a * scale), int(c / (scale * scale)))
    if ps_version == "v1":
        return x
    return x.permute(0, 2, 1, 3).contiguous()


def extract_feature(state: State, vision_cfg: dict[str, Any], top_cfg: dict[str, Any],
                    pixel_values: torch.Tensor) -> torch.Tensor:
    """InternVLChatModel.extract_feature: (B, 3, S, S) -> image tokens (B, (S/p)^2 * ratio^2, D).

    `top_cfg` is config.json (select_layer, downsample_ratio, ps_version); the grid is square, as the
    original assumes (h = w = sqrt(N)).
    """
    hidden = vit_hidden_states(state, vision_cfg, pixel_values)[top_cfg["select_layer"]][:, 1:]  # drop CLS
    side = int(hidden.shape[1] ** 0.5)
    x = hidden.reshape(hidden.shape[0], side, side, -1)
    x = pixel_shuffle(x, top_cfg["downsample_ratio"], top_cfg["ps_version"])
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, C / ratio^2)
    x = F.layer_norm(x, x.shape[-1:], state["mlp1.0.weight"], state["mlp1.0.bias"], eps=1e-5)  # nn.LayerNorm default
    return _linear(F.gelu(_linear(x, state, "mlp1.1")), state, "mlp1.3")


# --- the LLM: Qwen2 and InternLM2 --------------------------------------------------------------------------

def rope(head_dim: int, seq_len: int, cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, head_dim) for positions 0..T-1: the half-split rotary embedding with base rope_theta.

    rope_scaling "linear" divides positions by the factor; "dynamic" (NTK) raises the base only once
    T exceeds max_position_embeddings, as InternLM2's DynamicNTKScalingRotaryEmbedding does.
    """
    base, positions = float(cfg["rope_theta"]), torch.arange(seq_len, dtype=torch.float32)
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind, factor = scaling.get("type", scaling.get("rope_type")), scaling["factor"]
        limit = cfg["max_position_embeddings"]
        if kind == "linear":
            positions = positions / factor
        elif kind == "dynamic":
            if seq_len > limit:
                base *= (factor * seq_len / limit - (factor - 1)) ** (head_dim / (head_dim - 2))
        else:
            raise ValueError(f"the reference knows rope_scaling 'linear' and 'dynamic', not {kind!r}")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    emb = torch.cat([positions[:, None] * inv_freq[None]] * 2, dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _qkv(x: torch.Tensor, state: State, layer: str, cfg: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """(B, T, D) -> q (B, H, T, hd), k and v (B, KV, T, hd), from Qwen2's three projections or InternLM2's wqkv."""
    b, t, d = x.shape
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // heads
    if cfg["architectures"][0] == "InternLM2ForCausalLM":
        group = heads // kv  # per key-value head g the rows are [its `group` query heads, its key, its value]
        fused = _linear(x, state, layer + "attention.wqkv").reshape(b, t, kv, group + 2, hd)
        q, k, v = fused[:, :, :, :group].reshape(b, t, heads, hd), fused[:, :, :, -2], fused[:, :, :, -1]
    else:
        q = _linear(x, state, layer + "self_attn.q_proj").reshape(b, t, heads, hd)
        k = _linear(x, state, layer + "self_attn.k_proj").reshape(b, t, kv, hd)
        v = _linear(x, state, layer + "self_attn.v_proj").reshape(b, t, kv, hd)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _llm_attention(x: torch.Tensor, state: State, layer: str, cfg: dict[str, Any], rotary: tuple[torch.Tensor, ...],
                   allowed: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention; query head j reads key-value head j // (H / KV). allowed: (B, 1, T, T)."""
    q, k, v = _qkv(x, state, layer, cfg)
    q, k = _rotate(q, *rotary), _rotate(k, *rotary)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    weights = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    internlm2 = cfg["architectures"][0] == "InternLM2ForCausalLM"
    return _linear(out, state, layer + ("attention.wo" if internlm2 else "self_attn.o_proj"))


def _swiglu(x: torch.Tensor, state: State, layer: str, internlm2: bool) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); InternLM2 names them w2(silu(w1(x)) * w3(x))."""
    gate, up, down = ("feed_forward.w1", "feed_forward.w3", "feed_forward.w2") if internlm2 else \
        ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return _linear(F.silu(_linear(x, state, layer + gate)) * _linear(x, state, layer + up), state, layer + down)


def llm_hidden_states(state: State, llm_cfg: dict[str, Any], input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The LLM's last hidden state after its final norm, (B, T, D), positions 0..T-1 (right padding).

    attention_mask (B, T): 1 for real tokens; padded keys are never attended to.
    """
    internlm2 = llm_cfg["architectures"][0] == "InternLM2ForCausalLM"
    attn_norm, mlp_norm = ("attention_norm", "ffn_norm") if internlm2 else \
        ("input_layernorm", "post_attention_layernorm")
    eps = llm_cfg["rms_norm_eps"]
    x = F.embedding(input_ids, state["language_model.model." + ("tok_embeddings" if internlm2 else "embed_tokens")
                                     + ".weight"])
    b, t = input_ids.shape
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T) causal
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    rotary = rope(llm_cfg["hidden_size"] // llm_cfg["num_attention_heads"], t, llm_cfg)
    for i in range(llm_cfg["num_hidden_layers"]):
        layer = f"language_model.model.layers.{i}."
        x = x + _llm_attention(rms_norm(x, state[f"{layer}{attn_norm}.weight"], eps), state, layer, llm_cfg, rotary,
                               allowed)
        x = x + _swiglu(rms_norm(x, state[f"{layer}{mlp_norm}.weight"], eps), state, layer, internlm2)
    return rms_norm(x, state["language_model.model.norm.weight"], eps)
