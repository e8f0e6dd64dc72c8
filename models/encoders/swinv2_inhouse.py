"""Adapter `swinv2_inhouse`: the project's Swin V2 (`models.swinv2`, fused SDPA attention).

Same contract as the `swinv2` adapter, so a config switches between the two with no other change:
the same transformers Swin V2 checkpoint folders or random-init config dicts, the same
preprocessing, token grids, stage features and parameter groups (timm's stage convention: stage i
is the patch merging that feeds it followed by its blocks), and LoRA targets naming the same Linear
layers in this model's module names. `hf_config_dict()` is the transformers `Swinv2Config` dict, so
exported models stay loadable by either adapter.

One key of `model.vision.config` is this model's own, not a `Swinv2Config` field: `chunk_mib`, the
sub-batch size (`SwinV2Config.chunk_mib`: "auto" = 16 MiB on CPU and whole batches on accelerators,
a number of MiB on every device, or null for never). It is a run-time setting: not saved in
`hf_config_dict()`, so an export runs with "auto" unless its config sets it again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import Swinv2Config, Swinv2Model

from data.preprocessing import ImagePreprocessing
from models.encoders.base import EncoderOutput, EncoderUnavailableError, FeatureInfo, VisionEncoder
from models.encoders.hf_loading import checkpoint_preprocessing, make_config
from models.encoders.swin import SWINV2_RECIPE, load_hf_swin, swin_parameter_groups
from models.swinv2 import SwinTransformerV2, config_from_transformers, from_transformers

# The swinv2 adapter's targets (query/key/value, attention.output.dense, intermediate.dense,
# output.dense) under this model's names: q/k/v are one fused Linear here.
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class Swinv2InhouseEncoder(VisionEncoder):
    """`VisionEncoder` over `models.swinv2.SwinTransformerV2`, held as `self.backbone`."""

    name = "swinv2_inhouse"
    recipe = SWINV2_RECIPE  # weight-compatible with Swinv2Model: the same checkpoints and shapes

    def __init__(self, backbone: SwinTransformerV2, hf_config: dict[str, Any], preprocessing: ImagePreprocessing) -> None:
        super().__init__()
        self.backbone = backbone
        self._hf_config = hf_config
        self._preprocessing = preprocessing

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def build(cls, checkpoint: str | None, config_overrides: dict[str, Any], image_size: tuple[int, int],
              resize: str = "pad", load_weights: bool = True, **kwargs: Any) -> "Swinv2InhouseEncoder":
        """From a transformers Swin V2 folder / hub id, or at random from Swinv2Config fields."""
        preprocessing = checkpoint_preprocessing(checkpoint, image_size, resize)
        overrides = dict(config_overrides)
        chunk_mib = overrides.pop("chunk_mib", "auto")
        if checkpoint is None:
            config = make_config(Swinv2Config, overrides, cls.name)
            return cls(_backbone_from_config(config, chunk_mib), config.to_dict(), preprocessing)
        hf_model = load_hf_swin(Swinv2Model, Swinv2Config, ("swinv2",), checkpoint, overrides, cls.name,
                                load_weights)
        try:
            backbone = from_transformers(hf_model, chunk_mib).train()
        except ValueError as e:  # a bad chunk_mib
            raise EncoderUnavailableError(f"encoder 'swinv2_inhouse': {e}") from e  # trainability and mode are the caller's policy
        return cls(backbone, hf_model.config.to_dict(), preprocessing)

    @classmethod
    def from_config_dict(cls, hf_config: dict[str, Any], preprocessing: ImagePreprocessing) -> "Swinv2InhouseEncoder":
        config = Swinv2Config.from_dict(hf_config)
        return cls(_backbone_from_config(config), config.to_dict(), preprocessing)

    def hf_config_dict(self) -> dict[str, Any]:
        return dict(self._hf_config)

    # -- declared shapes ---------------------------------------------------------------------------
    @property
    def preprocessing(self) -> ImagePreprocessing:
        return self._preprocessing

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return [FeatureInfo(channels=f["num_chs"], stride=f["reduction"]) for f in self.backbone.feature_info]

    def grid_size(self, image_size: tuple[int, int], stage: int = -1) -> tuple[int, int]:
        return self.backbone.grid_size(image_size, stage)

    # -- training policy hooks -----------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        return swin_parameter_groups(self.backbone, self.backbone.patch_embed, self.backbone.layers,
                                     self.backbone.norm)

    @property
    def depth_groups(self) -> list[str]:
        return ["embeddings"] + [f"stage.{i}" for i in range(len(self.backbone.layers))]

    @property
    def lora_target_modules(self) -> list[str]:
        return list(LORA_TARGETS)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """(B, 3, H, W) -> tokens (B, h*w, C) after the final norm, plus every stage's tokens."""
        out = self.backbone(pixel_values)
        stages = out.stage_outputs[:-1] + [out.last_hidden_state]
        return EncoderOutput(tokens=out.last_hidden_state, grid=out.stage_grids[-1], stages=stages,
                             stage_grids=out.stage_grids)


def _backbone_from_config(config: Swinv2Config, chunk_mib: float | str | None = "auto") -> SwinTransformerV2:
    """A randomly initialised in-house backbone; unsupported settings are `EncoderUnavailableError`."""
    try:
        return SwinTransformerV2(dataclasses.replace(config_from_transformers(config), chunk_mib=chunk_mib))
    except ValueError as e:
        raise EncoderUnavailableError(f"encoder 'swinv2_inhouse': {e}") from e


