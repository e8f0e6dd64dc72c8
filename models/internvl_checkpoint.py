"""InternVL checkpoint folders as users download them, read leanly into transformers' own modules.

Two layouts, told apart by config.json alone (never by folder names):

* original (OpenGVLab's `InternVL2-*`, `InternVL2_5-*`, `InternVL3-*`): `model_type: internvl_chat`,
  `llm_config` / `vision_config`, weights `vision_model.*`, `mlp1.{0,1,3}.*`, `language_model.model.*`;
  the LLM is Qwen2 or InternLM2 (loaded as transformers' Llama, the way transformers' converter maps it).
* hf (transformers' `InternVLForConditionalGeneration`, e.g. `OpenGVLab/InternVL3-1B-hf`):
  `model_type: internvl`, weights `vision_tower.*`, `multi_modal_projector.*`, `language_model.*`.

Both become one `InternVLConfig`, so everything downstream sees transformers' layout. Each part is
loaded on its own (`language_model`, `vision_tower`, `projector_state`) by transformers' loader, which
reads the safetensors files tensor by tensor: a part that is not asked for (the ViT when the encoder is
Swin, the LM head always, ViT layers past `select_layer`) is never read. Nothing in the folder is
imported or unpickled and nothing is downloaded or written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import (InternVLConfig, InternVLVisionConfig, InternVLVisionModel, LlamaConfig, LlamaModel,
                          PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen2Model)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, ConversionOps, WeightConverter, WeightRenaming

from models.encoders.hf_loading import looks_local

logger = logging.getLogger(__name__)

ORIGINAL, HF = "original", "hf"
# config.json keys of a 4.x LLM config that must not reach transformers 5: remote-code pointers, flash-attn
# switches (no flash-attn here; accelerate picks the attention backend), the stored dtype (we load float32).
_DROPPED_LLM_KEYS = ("_name_or_path", "auto_map", "architectures", "attn_implementation", "_attn_implementation",
                     "_attn_implementation_autoset", "use_flash_attn", "torch_dtype", "dtype", "use_bfloat16",
                     "transformers_version", "model_type")


# What a hub snapshot needs: configs, safetensors weights, tokenizer files. Never *.py, never pickles.
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "tokenizer.model", "*.tiktoken"]


def resolve_folder(checkpoint: str | Path) -> Path:
    """A local folder as is; a hub id ("namespace/name") as its snapshot in the local cache, fetched
    where the network allows (configs, safetensors and tokenizer files only).

    Raises:
        FileNotFoundError: a local path that does not exist, or a hub id that cannot be fetched.
    """
    path = Path(checkpoint).expanduser()
    if path.exists() or looks_local(str(checkpoint)):
        if not path.is_dir():
            raise FileNotFoundError(f"{checkpoint} does not exist")
        return path
    try:
        return Path(snapshot_download(str(checkpoint), allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated: huggingface_hub's errors have no common base
        raise FileNotFoundError(f"{checkpoint} is not a local folder and cannot be fetched from the hub: {e}") from e


@dataclass(frozen=True)
class InternVLCheckpoint:
    """An InternVL folder: its layout and its architecture in transformers' terms, from config.json alone.

    Attributes:
        folder: the folder.
        layout: "original" or "hf".
        config: transformers' `InternVLConfig` (vision_config, text_config, downsample_ratio and
            vision_feature_layer, which is the original's `select_layer`).
        llm_type: the LLM as the folder names it: "qwen2", "internlm2", "llama".
    """

    folder: Path
    layout: str
    config: InternVLConfig
    llm_type: str

    @classmethod
    def read(cls, folder: str | Path) -> "InternVLCheckpoint":
        """Read `folder/config.json`.

        Raises:
            FileNotFoundError: the folder or its config.json is missing.
            ValueError: not an InternVL folder, or a feature this toolkit does not support (named).
        """
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a model folder")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        model_type = raw.get("model_type")
        if model_type == "internvl_chat":
            config, llm_type = _config_from_original(raw, path)
            return cls(folder, ORIGINAL, config, llm_type)
        if model_type == "internvl":
            config = InternVLConfig.from_dict({k: v for k, v in raw.items() if k != "transformers_version"})
            _check_feature_layer(config.vision_feature_layer, config.vision_config.num_hidden_layers, path)
            return cls(folder, HF, config, config.text_config.model_type)
        raise ValueError(f"{path}: model_type {model_type!r} is not an InternVL checkpoint (expected "
                         f"'internvl_chat', OpenGVLab's original layout, or 'internvl', transformers' layout)")

    @property
    def image_size(self) -> int:
        """The square input the ViT's position embeddings were trained at (`force_image_size`)."""
        size = self.config.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def pixel_shuffle(self) -> int:
        """The projector's token merge factor (downsample_ratio 0.5 -> 2)."""
        return round(1 / self.config.downsample_ratio)

    def used_vision_layers(self) -> int:
        """ViT layers up to `select_layer`; the final norm is the identity, so later layers change nothing."""
        layer, total = self.config.vision_feature_layer, self.config.vision_config.num_hidden_layers
        return total + 1 + layer if layer < 0 else layer

    # -- the parts --------------------------------------------------------------------------------------------------
    def language_model(self, load_weights: bool = True) -> PreTrainedModel:
        """The LLM without its LM head (Qwen2Model, or LlamaModel for InternLM2), float32.

        With `load_weights=False` only the architecture is built (call it under `torch.device("meta")`).
        """
        text = self.config.text_config
        if self.llm_type == "internlm2" and self.layout == ORIGINAL:
            model_class: type[PreTrainedModel] = _OriginalInternLM2
        else:
            model_class = Qwen2Model if text.model_type == "qwen2" else LlamaModel
        if not load_weights:
            return model_class(text)
        return self._load(model_class, text, {r"^(model\.)?language_model\.(model\.)?": ""}, "language model")

    def vision_tower(self, load_weights: bool = True) -> InternVLVisionModel:
        """The InternViT up to `select_layer` (transformers' `InternVLVisionModel`), float32."""
        vision = InternVLVisionConfig.from_dict({**self.config.vision_config.to_dict(),
                                                 "num_hidden_layers": self.used_vision_layers()})
        if self.layout == ORIGINAL:
            model_class: type[InternVLVisionModel] = _OriginalInternViT
        else:
            model_class = InternVLVisionModel
        if not load_weights:
            return model_class(vision)
        return self._load(model_class, vision, {r"^(model\.)?vision_tower\.": ""}, "vision tower")

    def projector_state(self) -> dict[str, torch.Tensor]:
        """The projector's weights in transformers' names (layer_norm, linear_1, linear_2), float32."""
        prefix, names = ("mlp1.", {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}) if self.layout == ORIGINAL \
            else ("multi_modal_projector.", {n: n for n in ("layer_norm", "linear_1", "linear_2")})
        state = {}
        for key, file in self._weight_map().items():
            bare = key.removeprefix("model.")
            if not bare.startswith(prefix):
                continue
            module, _, tensor = bare[len(prefix):].partition(".")
            if module in names:
                with safe_open(str(self.folder / file), framework="pt") as f:
                    state[f"{names[module]}.{tensor}"] = f.get_tensor(key).float()
        if not state:
            raise ValueError(f"{self.folder}: no projector weights ({prefix}*) in the checkpoint")
        return state

    def _weight_map(self) -> dict[str, str]:
        """Tensor name -> safetensors file, from the index or the single file."""
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.folder / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{self.folder} has no model.safetensors or model.safetensors.index.json "
                                    f"(only safetensors weights are read; .bin pickles never are)")
        try:
            with safe_open(str(single), framework="pt") as f:
                return {key: single.name for key in f.keys()}
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
            raise ValueError(f"{single} is not a readable safetensors file: {e}") from e

    def _load(self, model_class: type[PreTrainedModel], config: PretrainedConfig, key_mapping: dict[str, str],
              what: str) -> PreTrainedModel:
        self._weight_map()  # a clear error for a folder without safetensors weights
        model, info = model_class.from_pretrained(self.folder, config=config, key_mapping=key_mapping,
                                                  dtype=torch.float32, use_safetensors=True,
                                                  output_loading_info=True)
        missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        if missing or info["error_msgs"]:
            raise ValueError(f"{self.folder}: the {what} does not match config.json ({self.layout} layout): "
                             f"missing or mismatched {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                             f"{'; '.join(info['error_msgs'])}")
        return model


def _config_from_original(raw: dict[str, Any], path: Path) -> tuple[InternVLConfig, str]:
    """transformers' InternVLConfig for an OpenGVLab `internvl_chat` config.json."""
    for key in ("llm_config", "vision_config"):
        if not isinstance(raw.get(key), dict):
            raise ValueError(f"{path}: {key} is missing; not an InternVL chat config")
    ps_version = raw.get("ps_version", "v1")  # the original's default
    if ps_version != "v2":
        raise ValueError(f"{path}: ps_version {ps_version!r} is not supported (only 'v2', the pixel shuffle of "
                         f"InternVL2 and later; 'v1' transposes the merged grid)")
    llm = dict(raw["llm_config"])
    llm_type = llm.get("model_type")
    if llm_type == "qwen2":
        text: PretrainedConfig = Qwen2Config(**_llm_fields(llm))
    elif llm_type == "internlm2":
        text = LlamaConfig(**_internlm2_as_llama(llm, path))
    elif llm_type == "llama":
        text = LlamaConfig(**_llm_fields(llm))
    else:
        arch = (llm.get("architectures") or ["?"])[0]
        raise ValueError(f"{path}: llm_config.model_type {llm_type!r} ({arch}) is not supported; supported LLMs "
                         f"are qwen2 (InternVL2-1B, 2.5-1B/4B/38B/78B, InternVL3), internlm2 (2.5-2B/8B/26B), llama")
    vision = _vision_fields(raw["vision_config"], raw.get("force_image_size"), path)
    layer = raw.get("select_layer", -1)
    _check_feature_layer(layer, vision["num_hidden_layers"], path)
    config = InternVLConfig(vision_config=vision, text_config=text.to_dict(),
                            downsample_ratio=float(raw.get("downsample_ratio", 0.5)), vision_feature_layer=layer)
    return config, llm_type


def _llm_fields(llm: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in llm.items() if k not in _DROPPED_LLM_KEYS}


def _internlm2_as_llama(llm: dict[str, Any], path: Path) -> dict[str, Any]:
    """InternLM2's config in Llama's field names (its layers are Llama's: GQA, SwiGLU, RMSNorm)."""
    fields = _llm_fields(llm)
    bias = bool(fields.pop("bias", False))
    fields.update(attention_bias=bias, mlp_bias=False,
                  head_dim=fields["hidden_size"] // fields["num_attention_heads"])
    scaling = fields.get("rope_scaling")
    if scaling and scaling.get("type", scaling.get("rope_type")) not in ("dynamic", "linear", "default"):
        raise ValueError(f"{path}: llm_config.rope_scaling {scaling} is not supported")
    return fields


def _vision_fields(vision: dict[str, Any], force_image_size: int | None, path: Path) -> dict[str, Any]:
    """InternVisionConfig (intern_vit_6b) fields in InternVLVisionConfig's names."""
    norm = vision.get("norm_type", "rms_norm")
    if norm not in ("layer_norm", "rms_norm"):
        raise ValueError(f"{path}: vision_config.norm_type {norm!r} is not supported (layer_norm, rms_norm)")
    if vision.get("drop_path_rate"):
        logger.info("%s: vision_config.drop_path_rate=%s is a training regulariser transformers' InternViT does "
                    "not have; it is not applied", path, vision["drop_path_rate"])
    image_size = int(force_image_size or vision.get("image_size", 448))
    patch = int(vision.get("patch_size", 14))
    return dict(hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
                num_attention_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"],
                hidden_act=vision.get("hidden_act", "gelu"), layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
                norm_type=norm, attention_bias=bool(vision.get("qkv_bias", False)),
                use_qk_norm=bool(vision.get("qk_normalization", False)),
                attention_dropout=vision.get("attention_dropout", 0.0), projection_dropout=vision.get("dropout", 0.0),
                hidden_dropout_prob=0.0, image_size=[image_size, image_size], patch_size=[patch, patch],
                num_channels=vision.get("num_channels", 3), use_absolute_position_embeddings=True,
                use_mean_pooling=True, use_mask_token=False)


def _check_feature_layer(layer: Any, total: int, path: Path) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not -total <= layer < total or layer == 0:
        raise ValueError(f"{path}: select_layer / vision_feature_layer {layer!r} is not supported (one layer "
                         f"index in -{total}..{total - 1}, not 0)")


# -- the original layout's weight names, as conversions transformers' loader applies ------------------------------

class _ChunkCopies(Chunk):
    """transformers' `Chunk` whose pieces own their memory: row chunks are views of one tensor, and
    parameters sharing one storage would be dropped as "shared tensors" by safetensors when saved."""

    def convert(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in super().convert(*args, **kwargs).items()}


class _SplitGroupedQKV(ConversionOps):
    """InternLM2's fused `wqkv` -> q, k, v rows: per KV head, its query heads, then its key, then its value."""

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str],
                config: PretrainedConfig | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        tensor = next(iter(input_dict.values()))
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        text = config.get_text_config()
        group = text.num_attention_heads // text.num_key_value_heads
        grouped = tensor.view(text.num_key_value_heads, group + 2, text.head_dim, tensor.shape[-1])
        q, k, v = grouped[:, :group], grouped[:, group], grouped[:, group + 1]
        return {target: part.reshape(-1, tensor.shape[-1]).clone()  # own memory, as in `_ChunkCopies`
                for target, part in zip(target_patterns, (q, k, v))}


class _OriginalInternViT(InternVLVisionModel):
    """transformers' InternVLVisionModel, loading OpenGVLab's `vision_model.*` names (see the mapping below)."""


class _OriginalInternLM2(LlamaModel):
    """transformers' LlamaModel, loading InternLM2's `language_model.model.*` names (see the mapping below)."""


register_checkpoint_conversion_mapping(_OriginalInternViT.__name__, [
    WeightRenaming(r"^vision_model\.", ""),
    WeightRenaming(r"\.layers\.", ".layer."),
    WeightRenaming(r"embeddings\.class_embedding", "embeddings.cls_token"),
    WeightRenaming(r"embeddings\.position_embedding$", "embeddings.position_embeddings"),
    WeightRenaming(r"embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    WeightRenaming(r"\.ls(1|2)$", r".lambda_\1"),
    WeightRenaming(r"\.attn\.proj\.", ".attention.projection_layer."),
    WeightRenaming(r"\.attn\.(q_norm|k_norm)\.", r".attention.\1."),
    WeightRenaming(r"\.norm1\.", ".layernorm_before."),
    WeightRenaming(r"\.norm2\.", ".layernorm_after."),
    WeightConverter("attn.qkv", ["attention.q_proj", "attention.k_proj", "attention.v_proj"], [_ChunkCopies(dim=0)]),
], overwrite=True)

register_checkpoint_conversion_mapping(_OriginalInternLM2.__name__, [
    WeightRenaming(r"tok_embeddings\.", "embed_tokens."),
    WeightRenaming(r"\.attention\.wo\.", ".self_attn.o_proj."),
    WeightRenaming(r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    WeightRenaming(r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    WeightRenaming(r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    WeightRenaming(r"\.attention_norm\.", ".input_layernorm."),
    WeightRenaming(r"\.ffn_norm\.", ".post_attention_layernorm."),
    WeightConverter("attention.wqkv.weight",
                    ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
                    [_SplitGroupedQKV()]),
], overwrite=True)
