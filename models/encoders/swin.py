"""Adapters `swin` and `swinv2`: transformers' SwinModel and Swinv2Model behind `VisionEncoder`.

Stage convention (timm's): stage i is the patch merging that feeds it (in transformers it lives at
the end of stage i-1) followed by its blocks, so "last_stage" unfreezes the merging into the last
stage too. Tokens of every stage are taken before that stage's downsampling, at its own resolution.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, SwinConfig, SwinModel, Swinv2Config, Swinv2Model

from data.preprocessing import ImagePreprocessing
from models.encoders.base import EncoderOutput, EncoderRecipe, EncoderUnavailableError, FeatureInfo
from models.encoders.hf_loading import HFBackboneEncoder, checkpoint_preprocessing, make_config, read_config_dict


class _HFSwinFamilyEncoder(HFBackboneEncoder):
    """Shared adapter for the transformers Swin family (same module layout in v1 and v2)."""

    config_class: ClassVar[type[PretrainedConfig]]
    model_class: ClassVar[type[PreTrainedModel]]
    model_types: ClassVar[tuple[str, ...]]
    lora_targets: ClassVar[tuple[str, ...]]  # attention and MLP Linear names, as transformers names them


    @classmethod
    def build(cls, checkpoint: str | None, config_overrides: dict[str, Any], image_size: tuple[int, int],
              resize: str = "pad", load_weights: bool = True, **kwargs: Any) -> "_HFSwinFamilyEncoder":
        preprocessing = checkpoint_preprocessing(checkpoint, image_size, resize)
        if checkpoint is None:
            config = make_config(cls.config_class, config_overrides, cls.name)
            backbone = cls.model_class(config, add_pooling_layer=False)
        else:
            backbone = load_hf_swin(cls.model_class, cls.config_class, cls.model_types, checkpoint,
                                    config_overrides, cls.name, load_weights)
        encoder = cls(backbone, preprocessing)
        encoder.check_input_size(preprocessing.size)
        return encoder

    @classmethod
    def from_config_dict(cls, hf_config: dict[str, Any], preprocessing: ImagePreprocessing) -> "_HFSwinFamilyEncoder":
        return cls(cls.model_class(cls.config_class.from_dict(hf_config), add_pooling_layer=False), preprocessing)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        cfg = self.backbone.config
        patch = _pair(cfg.patch_size)[0]
        return [FeatureInfo(channels=int(cfg.embed_dim * 2**i), stride=patch * 2**i) for i in range(len(cfg.depths))]

    def grid_size(self, image_size: tuple[int, int], stage: int = -1) -> tuple[int, int]:
        ph, pw = _pair(self.backbone.config.patch_size)
        h, w = math.ceil(image_size[0] / ph), math.ceil(image_size[1] / pw)  # the stem pads to the patch
        for _ in range(stage % len(self.feature_info)):
            h, w = (h + 1) // 2, (w + 1) // 2  # patch merging pads odd sizes
        return h, w

    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        return swin_parameter_groups(self.backbone, self.backbone.embeddings, self.backbone.encoder.layers,
                                     self.backbone.layernorm)

    @property
    def depth_groups(self) -> list[str]:
        return ["embeddings"] + [f"stage.{i}" for i in range(len(self.backbone.encoder.layers))]

    @property
    def lora_target_modules(self) -> list[str]:
        return list(self.lora_targets)

    def check_input_size(self, image_size: tuple[int, int]) -> None:
        """Raise ValueError if the backbone cannot run on (height, width); every size works by default."""

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """(B, 3, H, W) -> tokens (B, h*w, C) after the final norm, plus every stage's tokens."""
        self.check_input_size((pixel_values.shape[2], pixel_values.shape[3]))
        embeddings, dims = self.backbone.embeddings(pixel_values)
        out = self.backbone.encoder(embeddings, dims, output_hidden_states=True,
                                    output_hidden_states_before_downsampling=True)
        maps = out.reshaped_hidden_states[1:]  # [(B, C_i, h_i, w_i)], the stem dropped
        tokens = self.backbone.layernorm(out.last_hidden_state)  # (B, h*w, C)
        stages = [m.flatten(2).transpose(1, 2) for m in maps[:-1]] + [tokens]
        grids = [(m.shape[2], m.shape[3]) for m in maps]
        return EncoderOutput(tokens=tokens, grid=grids[-1], stages=stages, stage_grids=grids)


# Swin-T's layout (depths 2-2-6-2, patch 4, window 7) at half its width: 6.9 M parameters, 12 blocks
SWIN_BENCHMARK = dict(patch_size=4, embed_dim=48, depths=[2, 2, 6, 2], num_heads=[2, 4, 8, 16], window_size=7,
                      mlp_ratio=4.0, drop_path_rate=0.0)


class SwinEncoder(_HFSwinFamilyEncoder):
    name = "swin"
    recipe = EncoderRecipe(
        tiny_checkpoint="swin",
        tiny_config=dict(patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=7,
                         drop_path_rate=0.0),
        benchmark_config=SWIN_BENCHMARK,
        real_checkpoint="microsoft/swin-base-patch4-window7-224",
        real_config=dict(patch_size=4, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7,
                         drop_path_rate=0.0))
    config_class = SwinConfig
    model_class = SwinModel
    model_types = ("swin",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2")

    def check_input_size(self, image_size: tuple[int, int]) -> None:
        """transformers' SwinModel shrinks the window of a stage smaller than it, but not the window's
        position-bias table, and then fails deep inside; say so up front instead."""
        window = self.backbone.config.window_size
        for stage in range(len(self.feature_info)):
            h, w = self.grid_size(image_size, stage)
            if min(h, w) < window:
                smallest = window * self.feature_info[-1].stride
                raise ValueError(f"encoder 'swin': a {image_size[0]}x{image_size[1]} input gives a {h}x{w} map at "
                                 f"stage {stage}, smaller than window_size={window}; transformers' SwinModel "
                                 f"needs inputs of at least {smallest}x{smallest} here (swinv2 has no such limit)")


SWINV2_RECIPE = EncoderRecipe(
    tiny_checkpoint="swinv2",
    tiny_config=dict(patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=7, mlp_ratio=2.0,
                     drop_path_rate=0.0),
    benchmark_config=SWIN_BENCHMARK,
    real_checkpoint="microsoft/swinv2-base-patch4-window8-256",
    real_config=dict(patch_size=4, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=8,
                     drop_path_rate=0.0))


class Swinv2Encoder(_HFSwinFamilyEncoder):
    name = "swinv2"
    recipe = SWINV2_RECIPE
    config_class = Swinv2Config
    model_class = Swinv2Model
    model_types = ("swinv2",)
    lora_targets = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def load_hf_swin(model_class: type[PreTrainedModel], config_class: type[PretrainedConfig], model_types: tuple[str, ...],
                 checkpoint: str, config_overrides: dict[str, Any], encoder: str,
                 load_weights: bool = True) -> PreTrainedModel:
    """A transformers Swin-family backbone (no pooler) from a folder or hub id, float32.

    `load_weights=False` builds the folder's architecture from its config.json alone.

    Raises:
        EncoderUnavailableError: missing folder/weights, unreadable or foreign config, bad override.
    """
    config_dict = read_config_dict(checkpoint, model_types, encoder)
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
    config = make_config(config_class, {**fields, **config_overrides}, encoder)
    if not load_weights:
        return model_class(config, add_pooling_layer=False)
    try:
        return model_class.from_pretrained(checkpoint, config=config, add_pooling_layer=False, dtype=torch.float32)
    except OSError as e:  # config present but weights missing or unreadable
        raise EncoderUnavailableError(f"encoder {encoder!r}: cannot load weights from {checkpoint}: {e}") from e


def swin_parameter_groups(backbone: nn.Module, embeddings: nn.Module, layers: nn.ModuleList,
                          final_norm: nn.Module) -> dict[str, list[nn.Module]]:
    """The Swin family's groups; stage i = the patch merging that feeds it + its blocks (timm's convention).

    Args:
        layers: the stages, each with `.blocks` and `.downsample` (None for the last).
    """
    groups: dict[str, list[nn.Module]] = {"embeddings": [embeddings]}
    for i, layer in enumerate(layers):
        merge_in = [layers[i - 1].downsample] if i > 0 else []
        groups[f"stage.{i}"] = merge_in + [layer.blocks]
    groups["last_stage"] = groups[f"stage.{len(layers) - 1}"]
    groups["final_norm"] = [final_norm]
    groups["all"] = [backbone]
    return groups


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
