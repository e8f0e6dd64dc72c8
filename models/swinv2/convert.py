"""Weight conversion between the in-house Swin V2 and other Swin V2 state-dict layouts.

Every converter is a pure `state_dict -> state_dict` function. Unknown keys raise `KeyError` naming
the key; incomplete q/k/v groups raise `KeyError` naming the missing key; tensors whose shapes
cannot belong together raise `ValueError` naming the key. `load_state_dict_strict` then checks the
result against a model (missing, unexpected and mis-shaped keys, all named) before a strict load.

Layouts (derived from each project's source; see docs/swinv2.md for how each was checked):

in-house          transformers Swinv2Model                      Microsoft / timm                 torchvision swin_v2_*
patch_embed.proj  embeddings.patch_embeddings.projection       patch_embed.proj                 features.0.0
patch_embed.norm  embeddings.norm                              patch_embed.norm                 features.0.2
layers.i.blocks.j encoder.layers.i.blocks.j                    layers.i.blocks.j                features.(2i+1).j
  attn.logit_scale  attention.self.logit_scale                   attn.logit_scale                 attn.logit_scale
  attn.cpb_mlp.*    attention.self.continuous_position_bias_mlp.* attn.cpb_mlp.*                attn.cpb_mlp.*
  attn.qkv.weight   attention.self.{query,key,value}.weight      attn.qkv.weight                  attn.qkv.weight
  attn.qkv.q_bias   attention.self.query.bias                    attn.q_bias                      attn.qkv.bias[:C]
  attn.qkv.v_bias   attention.self.value.bias                    attn.v_bias                      attn.qkv.bias[2C:]
  attn.proj         attention.output.dense                       attn.proj                        attn.proj
  norm1             layernorm_before                             norm1                            norm1
  mlp.fc1 / fc2     intermediate.dense / output.dense            mlp.fc1 / mlp.fc2                mlp.0 / mlp.3
  norm2             layernorm_after                              norm2                            norm2
layers.i.downsample encoder.layers.i.downsample                 MS: layers.i.downsample          features.(2i+2)
                                                               timm: layers.(i+1).downsample
norm              layernorm                                    norm                             norm

Dropped on import because they are recomputed or are not part of the backbone: classification heads
(`head.*`, `head.fc.*`, `classifier.*`), Microsoft / torchvision / old-timm persistent buffers
(`relative_coords_table`, `relative_position_index`, `attn_mask`) and timm's `k_bias` buffer.
transformers checkpoints saved from a task model carry a `swinv2.` prefix, which is stripped.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .model import (SwinTransformerV2, SwinV2Config, relative_coords_table, relative_position_index,
                    shift_region_mask)

StateDict = dict[str, Tensor]

__all__ = [
    "config_from_transformers", "config_to_transformers", "from_transformers",
    "transformers_to_inhouse", "inhouse_to_transformers",
    "timm_to_inhouse", "inhouse_to_timm",
    "microsoft_to_inhouse", "inhouse_to_microsoft",
    "torchvision_to_inhouse", "inhouse_to_torchvision",
    "detect_layout", "checkpoint_filter_fn", "load_state_dict_strict",
]

# Per-block parameters renamed one to one: in-house suffix -> layout suffix.
_BLOCK_COMMON = {
    "attn.logit_scale": "attn.logit_scale",
    "attn.cpb_mlp.0.weight": "attn.cpb_mlp.0.weight",
    "attn.cpb_mlp.0.bias": "attn.cpb_mlp.0.bias",
    "attn.cpb_mlp.2.weight": "attn.cpb_mlp.2.weight",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
}
_BLOCK_MICROSOFT = {**_BLOCK_COMMON, "attn.qkv.q_bias": "attn.q_bias", "attn.qkv.v_bias": "attn.v_bias",
                    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
                    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias"}
_BLOCK_TORCHVISION = {**{k: v for k, v in _BLOCK_COMMON.items()},
                      "mlp.fc1.weight": "mlp.0.weight", "mlp.fc1.bias": "mlp.0.bias",
                      "mlp.fc2.weight": "mlp.3.weight", "mlp.fc2.bias": "mlp.3.bias"}
_BLOCK_TRANSFORMERS = {
    "attn.logit_scale": "attention.self.logit_scale",
    "attn.cpb_mlp.0.weight": "attention.self.continuous_position_bias_mlp.0.weight",
    "attn.cpb_mlp.0.bias": "attention.self.continuous_position_bias_mlp.0.bias",
    "attn.cpb_mlp.2.weight": "attention.self.continuous_position_bias_mlp.2.weight",
    "attn.qkv.q_bias": "attention.self.query.bias",
    "attn.qkv.v_bias": "attention.self.value.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
}
_TRANSFORMERS_QKV = ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight")
_DOWNSAMPLE = ("reduction.weight", "norm.weight", "norm.bias")
_STEM_NORM = {"patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
              "patch_embed.norm.bias", "norm.weight", "norm.bias"}
_BUFFERS = re.compile(r"(relative_coords_table|relative_position_index|attn_mask|k_bias)$")

_INHOUSE_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_INHOUSE_DOWN = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def config_from_transformers(hf_config: Any) -> SwinV2Config:
    """In-house config from a transformers `Swinv2Config` (or its `to_dict()`).

    Raises:
        ValueError: settings the in-house model does not implement (absolute position embeddings,
            which transformers itself cannot add without interpolation; non-square patches; a
            non-string activation).
    """
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if d.get("use_absolute_embeddings", False):
        raise ValueError("use_absolute_embeddings=True is not supported by the in-house Swin V2")
    patch = _pair(d.get("patch_size", 4))
    if patch[0] != patch[1]:
        raise ValueError(f"non-square patch_size {patch} is not supported")
    if not isinstance(d.get("hidden_act", "gelu"), str):
        raise ValueError("hidden_act must be a name, got a callable")
    depths = tuple(d["depths"])
    # transformers indexes this per stage and ignores extra entries (its default has four).
    pretrained = tuple(d.get("pretrained_window_sizes") or (0,) * len(depths))[:len(depths)]
    return SwinV2Config(
        img_size=_pair(d.get("image_size", 224)), patch_size=patch[0], in_chans=int(d.get("num_channels", 3)),
        embed_dim=int(d["embed_dim"]), depths=depths, num_heads=tuple(d["num_heads"]),
        window_size=int(d["window_size"]), pretrained_window_sizes=tuple(int(p) for p in pretrained),
        mlp_ratio=float(d.get("mlp_ratio", 4.0)), qkv_bias=bool(d.get("qkv_bias", True)),
        hidden_act=d.get("hidden_act", "gelu"), drop_rate=float(d.get("hidden_dropout_prob", 0.0)),
        attn_drop_rate=float(d.get("attention_probs_dropout_prob", 0.0)),
        drop_path_rate=float(d.get("drop_path_rate", 0.1)), layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)))


def config_to_transformers(cfg: SwinV2Config) -> dict[str, Any]:
    """The transformers `Swinv2Config` keyword arguments describing `cfg`."""
    return dict(image_size=list(cfg.img_size), patch_size=cfg.patch_size, num_channels=cfg.in_chans,
                embed_dim=cfg.embed_dim, depths=list(cfg.depths), num_heads=list(cfg.num_heads),
                window_size=cfg.window_size, pretrained_window_sizes=list(cfg.pretrained_window_sizes),
                mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, hidden_act=cfg.hidden_act,
                hidden_dropout_prob=cfg.drop_rate, attention_probs_dropout_prob=cfg.attn_drop_rate,
                drop_path_rate=cfg.drop_path_rate, use_absolute_embeddings=False,
                layer_norm_eps=cfg.layer_norm_eps)


# ----------------------------------------------------------------------------------------------
# Generic renaming
# ----------------------------------------------------------------------------------------------

def _invert(mapping: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in mapping.items()}


def _take(sd: StateDict, key: str, layout: str) -> Tensor:
    if key not in sd:
        raise KeyError(f"{layout} state dict is missing {key!r}")
    return sd[key]


def _rename_block(rest: str, table: dict[str, str], key: str, layout: str) -> str:
    if rest not in table:
        raise KeyError(f"unknown key {key!r} for the {layout} layout")
    return table[rest]


def _external_to_inhouse(sd: StateDict, layout: str, stem: dict[str, str],
                         parse: Callable[[str], tuple[str, int, int, str] | None],
                         block_table: dict[str, str], special: set[str]) -> tuple[StateDict, dict]:
    """Rename the one-to-one keys of an external layout; collect per-block `special` tensors.

    `parse(key)` returns ("block", i, j, rest), ("down", i, -1, rest) or None. Returns the renamed
    dict and {(i, j): {rest: tensor}} for the special (multi-tensor) entries.
    """
    out: StateDict = {}
    pending: dict[tuple[int, int], dict[str, Tensor]] = {}
    inv_block = _invert(block_table)
    for key, value in sd.items():
        if key in stem:
            out[stem[key]] = value
            continue
        parsed = parse(key)
        if parsed is None:
            raise KeyError(f"unknown key {key!r} for the {layout} layout")
        kind, i, j, rest = parsed
        if kind == "down":
            if rest not in _DOWNSAMPLE:
                raise KeyError(f"unknown key {key!r} for the {layout} layout")
            out[f"layers.{i}.downsample.{rest}"] = value
        elif rest in special:
            pending.setdefault((i, j), {})[rest] = value
        else:
            out[f"layers.{i}.blocks.{j}.{_rename_block(rest, inv_block, key, layout)}"] = value
    return out, pending


def _inhouse_items(sd: StateDict) -> list[tuple[str, int, int, str, Tensor]]:
    """Parse in-house keys into (kind, i, j, rest, tensor); kind is "stem", "block" or "down"."""
    items = []
    for key, value in sd.items():
        if key in _STEM_NORM:
            items.append(("stem", -1, -1, key, value))
        elif m := _INHOUSE_BLOCK.match(key):
            items.append(("block", int(m[1]), int(m[2]), m[3], value))
        elif (m := _INHOUSE_DOWN.match(key)) and m[2] in _DOWNSAMPLE:
            items.append(("down", int(m[1]), -1, m[2], value))
        else:
            raise KeyError(f"unknown key {key!r} for the in-house layout")
    return items


def _strip_and_drop(sd: StateDict, prefix: str | None = None, drop: re.Pattern | None = None) -> StateDict:
    """Strip an optional task-model prefix; drop heads and recomputed buffers."""
    out = {}
    for key, value in sd.items():
        if prefix and key.startswith(prefix):
            key = key[len(prefix):]
        if drop is not None and drop.search(key):
            continue
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------

_TRANSFORMERS_STEM = {
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.norm.weight": "patch_embed.norm.weight",
    "embeddings.norm.bias": "patch_embed.norm.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_TRANSFORMERS_DROP = re.compile(r"^(classifier\.|decoder\.|embeddings\.mask_token$)")


def _parse_transformers(key: str) -> tuple[str, int, int, str] | None:
    if m := re.match(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", key):
        return "block", int(m[1]), int(m[2]), m[3]
    if m := re.match(r"^encoder\.layers\.(\d+)\.downsample\.(.+)$", key):
        return "down", int(m[1]), -1, m[2]
    return None


def _fuse(parts: list[Tensor], key: str) -> Tensor:
    """Concatenate q, k, v projections along the output dim after checking they agree."""
    if any(p.shape != parts[0].shape for p in parts):
        raise ValueError(f"{key}: query/key/value shapes differ: {[tuple(p.shape) for p in parts]}")
    return torch.cat(parts, dim=0)


def transformers_to_inhouse(sd: StateDict) -> StateDict:
    """transformers `Swinv2Model` (or task model) state dict -> in-house state dict."""
    sd = _strip_and_drop(sd, prefix="swinv2.", drop=_TRANSFORMERS_DROP)
    out, pending = _external_to_inhouse(sd, "transformers", _TRANSFORMERS_STEM, _parse_transformers,
                                        _BLOCK_TRANSFORMERS, set(_TRANSFORMERS_QKV))
    for (i, j), parts in pending.items():
        prefix = f"encoder.layers.{i}.blocks.{j}."
        tensors = [_take({prefix + k: v for k, v in parts.items()}, prefix + name, "transformers")
                   for name in _TRANSFORMERS_QKV]
        out[f"layers.{i}.blocks.{j}.attn.qkv.weight"] = _fuse(tensors, prefix + "attention.self.query.weight")
    return out


def inhouse_to_transformers(sd: StateDict) -> StateDict:
    """In-house state dict -> transformers `Swinv2Model` state dict (exact inverse)."""
    stem = _invert(_TRANSFORMERS_STEM)
    out: StateDict = {}
    for kind, i, j, rest, value in _inhouse_items(sd):
        if kind == "stem":
            out[stem[rest]] = value
        elif kind == "down":
            out[f"encoder.layers.{i}.downsample.{rest}"] = value
        elif rest == "attn.qkv.weight":
            if value.shape[0] % 3:
                raise ValueError(f"layers.{i}.blocks.{j}.attn.qkv.weight: {tuple(value.shape)} is not 3C x C")
            for name, part in zip(_TRANSFORMERS_QKV, value.chunk(3, dim=0)):
                out[f"encoder.layers.{i}.blocks.{j}.{name}"] = part.clone()
        else:
            key = f"layers.{i}.blocks.{j}.{rest}"
            out[f"encoder.layers.{i}.blocks.{j}.{_rename_block(rest, _BLOCK_TRANSFORMERS, key, 'in-house')}"] = value
    return out


# ----------------------------------------------------------------------------------------------
# Microsoft and timm
# ----------------------------------------------------------------------------------------------

_MS_STEM = {k: k for k in _STEM_NORM}
_HEAD_DROP = re.compile(r"^head\.")


def _parse_layers(down_offset: int) -> Callable[[str], tuple[str, int, int, str] | None]:
    """Parser for `layers.i.blocks.j.*` / `layers.k.downsample.*` keys (timm: k = i + 1)."""
    def parse(key: str) -> tuple[str, int, int, str] | None:
        if m := _INHOUSE_BLOCK.match(key):
            return "block", int(m[1]), int(m[2]), m[3]
        if (m := _INHOUSE_DOWN.match(key)) and int(m[1]) - down_offset >= 0:
            return "down", int(m[1]) - down_offset, -1, m[2]
        return None
    return parse


def microsoft_to_inhouse(sd: StateDict) -> StateDict:
    """Original Microsoft `SwinTransformerV2` state dict (its `model` entry) -> in-house."""
    sd = _strip_and_drop(sd, drop=re.compile(f"{_HEAD_DROP.pattern}|{_BUFFERS.pattern}"))
    return _external_to_inhouse(sd, "Microsoft", _MS_STEM, _parse_layers(0), _BLOCK_MICROSOFT, set())[0]


def timm_to_inhouse(sd: StateDict) -> StateDict:
    """timm `SwinTransformerV2` state dict -> in-house (timm merges patches at the start of a stage)."""
    sd = _strip_and_drop(sd, drop=re.compile(f"{_HEAD_DROP.pattern}|{_BUFFERS.pattern}"))
    return _external_to_inhouse(sd, "timm", _MS_STEM, _parse_layers(1), _BLOCK_MICROSOFT, set())[0]


def _inhouse_to_layers(sd: StateDict, down_offset: int) -> StateDict:
    out: StateDict = {}
    for kind, i, j, rest, value in _inhouse_items(sd):
        if kind == "stem":
            out[rest] = value
        elif kind == "down":
            out[f"layers.{i + down_offset}.downsample.{rest}"] = value
        else:
            out[f"layers.{i}.blocks.{j}.{_rename_block(rest, _BLOCK_MICROSOFT, f'layers.{i}.blocks.{j}.{rest}', 'in-house')}"] = value
    return out


def inhouse_to_microsoft(sd: StateDict, cfg: SwinV2Config | None = None) -> StateDict:
    """In-house -> Microsoft layout. With `cfg`, also emits the persistent buffers the Microsoft
    module registers (coords table, index and shift mask per block), so that a strict load works."""
    out = _inhouse_to_layers(sd, 0)
    if cfg is not None:
        out.update(microsoft_buffers(cfg))
    return out


def inhouse_to_timm(sd: StateDict) -> StateDict:
    """In-house -> timm layout (current timm keeps its coords/index/mask buffers non-persistent)."""
    return _inhouse_to_layers(sd, 1)


def microsoft_buffers(cfg: SwinV2Config) -> StateDict:
    """Persistent buffers of Microsoft's model for `cfg` (its window rule uses min(h, w))."""
    out: StateDict = {}
    grid = (cfg.img_size[0] // cfg.patch_size, cfg.img_size[1] // cfg.patch_size)
    for i, depth in enumerate(cfg.depths):
        res = (grid[0] // 2**i, grid[1] // 2**i)
        window, shift = (min(res), 0) if min(res) <= cfg.window_size else (cfg.window_size, cfg.window_size // 2)
        for j in range(depth):
            prefix = f"layers.{i}.blocks.{j}."
            out[prefix + "attn.relative_coords_table"] = relative_coords_table(
                window, cfg.pretrained_window_sizes[i]).unsqueeze(0)
            out[prefix + "attn.relative_position_index"] = relative_position_index(window)
            if j % 2 == 1 and shift:
                out[prefix + "attn_mask"] = shift_region_mask(res[0], res[1], window, shift, -100.0)
    return out


# ----------------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------------

_TV_STEM = {"features.0.0.weight": "patch_embed.proj.weight", "features.0.0.bias": "patch_embed.proj.bias",
            "features.0.2.weight": "patch_embed.norm.weight", "features.0.2.bias": "patch_embed.norm.bias",
            "norm.weight": "norm.weight", "norm.bias": "norm.bias"}


def _parse_torchvision(key: str) -> tuple[str, int, int, str] | None:
    if (m := re.match(r"^features\.(\d+)\.(reduction\.weight|norm\.weight|norm\.bias)$", key)) and \
            int(m[1]) >= 2 and int(m[1]) % 2 == 0:
        return "down", int(m[1]) // 2 - 1, -1, m[2]
    if (m := re.match(r"^features\.(\d+)\.(\d+)\.(.+)$", key)) and int(m[1]) % 2 == 1:
        return "block", (int(m[1]) - 1) // 2, int(m[2]), m[3]
    return None


def torchvision_to_inhouse(sd: StateDict) -> StateDict:
    """torchvision `swin_v2_t/s/b` state dict -> in-house.

    torchvision keeps one 3C `qkv.bias` and zeroes its k third in every forward; that third is
    therefore ignored here (it never influences torchvision's outputs).
    """
    sd = _strip_and_drop(sd, drop=re.compile(f"{_HEAD_DROP.pattern}|{_BUFFERS.pattern}"))
    out, pending = _external_to_inhouse(sd, "torchvision", _TV_STEM, _parse_torchvision, _BLOCK_TORCHVISION,
                                        {"attn.qkv.bias"})
    for (i, j), parts in pending.items():
        bias = parts["attn.qkv.bias"]
        key = f"features.{2 * i + 1}.{j}.attn.qkv.bias"
        if bias.ndim != 1 or bias.shape[0] % 3:
            raise ValueError(f"{key}: expected a (3C,) bias, got {tuple(bias.shape)}")
        q, _, v = bias.chunk(3)
        out[f"layers.{i}.blocks.{j}.attn.qkv.q_bias"] = q.clone()
        out[f"layers.{i}.blocks.{j}.attn.qkv.v_bias"] = v.clone()
    return out


def inhouse_to_torchvision(sd: StateDict, cfg: SwinV2Config | None = None) -> StateDict:
    """In-house -> torchvision layout; with `cfg`, also its persistent coords/index buffers.

    torchvision has no pretrained window sizes and never clips the window, so the buffers use
    `cfg.window_size` everywhere.
    """
    stem = _invert(_TV_STEM)
    out: StateDict = {}
    biases: dict[tuple[int, int], dict[str, Tensor]] = {}
    for kind, i, j, rest, value in _inhouse_items(sd):
        if kind == "stem":
            out[stem[rest]] = value
        elif kind == "down":
            out[f"features.{2 * i + 2}.{rest}"] = value
        elif rest in ("attn.qkv.q_bias", "attn.qkv.v_bias"):
            biases.setdefault((i, j), {})[rest] = value
        else:
            key = f"layers.{i}.blocks.{j}.{rest}"
            out[f"features.{2 * i + 1}.{j}.{_rename_block(rest, _BLOCK_TORCHVISION, key, 'in-house')}"] = value
    for (i, j), parts in biases.items():
        prefix = f"layers.{i}.blocks.{j}."
        q, v = (_take({prefix + k: t for k, t in parts.items()}, prefix + name, "in-house")
                for name in ("attn.qkv.q_bias", "attn.qkv.v_bias"))
        if q.shape != v.shape:
            raise ValueError(f"{prefix}attn.qkv.v_bias: shape {tuple(v.shape)} differs from q_bias {tuple(q.shape)}")
        out[f"features.{2 * i + 1}.{j}.attn.qkv.bias"] = torch.cat((q, torch.zeros_like(q), v))
    if cfg is not None:
        out.update(torchvision_buffers(cfg))
    return out


def torchvision_buffers(cfg: SwinV2Config) -> StateDict:
    """Persistent buffers of torchvision's ShiftedWindowAttentionV2 for `cfg`."""
    w = cfg.window_size
    out: StateDict = {}
    for i, depth in enumerate(cfg.depths):
        for j in range(depth):
            prefix = f"features.{2 * i + 1}.{j}.attn."
            out[prefix + "relative_coords_table"] = relative_coords_table(w).unsqueeze(0)
            out[prefix + "relative_position_index"] = relative_position_index(w).flatten()
    return out


# ----------------------------------------------------------------------------------------------
# Detection, checked loading, construction
# ----------------------------------------------------------------------------------------------

def detect_layout(sd: StateDict) -> str:
    """One of "inhouse", "transformers", "microsoft", "timm", "torchvision"."""
    keys = list(sd)
    if any(k.startswith(("embeddings.", "encoder.", "swinv2.")) for k in keys):
        return "transformers"
    if "features.0.0.weight" in sd:
        return "torchvision"
    if any(k.endswith("attn.qkv.q_bias") or k.endswith("attn.qkv.v_bias") for k in keys):
        return "inhouse"
    if "layers.0.downsample.reduction.weight" in sd:
        return "microsoft"
    if any(k.startswith("layers.") for k in keys):
        return "timm"
    raise KeyError(f"cannot tell the Swin V2 layout of a state dict with keys {keys[:5]}...")


_TO_INHOUSE: dict[str, Callable[[StateDict], StateDict]] = {
    "inhouse": lambda sd: dict(sd), "transformers": transformers_to_inhouse, "microsoft": microsoft_to_inhouse,
    "timm": timm_to_inhouse, "torchvision": torchvision_to_inhouse,
}


_FROM_INHOUSE: dict[str, Callable[[StateDict], StateDict]] = {
    "inhouse": lambda sd: dict(sd), "transformers": inhouse_to_transformers, "microsoft": inhouse_to_microsoft,
    "timm": inhouse_to_timm, "torchvision": inhouse_to_torchvision,
}


def _source_keys(layout: str, key: str, value: Tensor) -> list[str]:
    """Best-effort name(s) of in-house `key` in the checkpoint's own layout, for error messages."""
    try:
        return sorted(_FROM_INHOUSE[layout]({key: value}))
    except (KeyError, ValueError):  # a multi-tensor entry (torchvision's qkv.bias) has no lone name
        return []


def check_against(sd: StateDict, expected: StateDict, layout: str = "inhouse") -> None:
    """Raise naming every missing or unexpected key, or the first mis-shaped one (with its source name)."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}")
    for key, value in sd.items():
        if value.shape != expected[key].shape:
            source = _source_keys(layout, key, value) if layout != "inhouse" else []
            origin = f" (from {layout} key(s) {source})" if source else ""
            raise ValueError(f"{key}{origin}: checkpoint shape {tuple(value.shape)} != model shape "
                             f"{tuple(expected[key].shape)}")


def checkpoint_filter_fn(state_dict: StateDict, model: SwinTransformerV2) -> StateDict:
    """Any supported layout -> in-house, checked against `model` (timm's filter-fn convention)."""
    state_dict = state_dict.get("model", state_dict)  # Microsoft checkpoints wrap weights in "model"
    layout = detect_layout(state_dict)
    out = _TO_INHOUSE[layout](state_dict)
    check_against(out, model.state_dict(), layout)
    return out


def load_state_dict_strict(model: SwinTransformerV2, state_dict: StateDict) -> SwinTransformerV2:
    """Convert (any layout), check names and shapes, then strict-load into `model`."""
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    return model


def from_transformers(model_or_folder: nn.Module | str | os.PathLike,
                      chunk_mib: float | str | None = "auto") -> SwinTransformerV2:
    """Build the in-house model from a transformers Swin V2 model or a local folder holding one.

    Args:
        model_or_folder: a `Swinv2Model` (or a task model with a `.swinv2` backbone), or a local
            folder in Hugging Face format (config.json + weights).
        chunk_mib: `SwinV2Config.chunk_mib` (a run-time setting, not part of the checkpoint).

    Returns:
        The in-house model with the same config and weights, in eval mode.
    """
    if isinstance(model_or_folder, nn.Module):
        hf_model = getattr(model_or_folder, "swinv2", model_or_folder)
    else:
        from transformers import Swinv2Model  # imported here: the model module depends on torch only

        hf_model = Swinv2Model.from_pretrained(os.fspath(model_or_folder))
    model = SwinTransformerV2(dataclasses.replace(config_from_transformers(hf_model.config), chunk_mib=chunk_mib))
    load_state_dict_strict(model, hf_model.state_dict())
    return model.eval()
