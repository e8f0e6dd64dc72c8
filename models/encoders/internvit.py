"""Adapter `internvit`: InternVL2's own vision tower (transformers' native `InternVLVisionModel`).

Weights come from an InternVL checkpoint folder in either layout (OpenGVLab's original `internvl_chat`
or transformers' `internvl`; `models.internvl_checkpoint` reads both, up to the checkpoint's
`select_layer` only), from a vision-only folder (model_type "internvl_vision"), or at random from an
`InternVLVisionConfig`. The CLS token is dropped, as InternVL does ("default" feature selection).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import InternVLVisionConfig, InternVLVisionModel

from data.preprocessing import ImagePreprocessing
from models.encoders.base import EncoderOutput, EncoderRecipe, EncoderUnavailableError, FeatureInfo
from models.encoders.hf_loading import HFBackboneEncoder, checkpoint_preprocessing, make_config, read_config_dict
from models.internvl_checkpoint import InternVLCheckpoint, resolve_folder

logger = logging.getLogger(__name__)


class InternViTEncoder(HFBackboneEncoder):
    name = "internvit"
    in_language_checkpoint = True
    recipe = EncoderRecipe(
        tiny_checkpoint="internvl2",
        tiny_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         patch_size=[14, 14], use_mean_pooling=True),
        # ViT-Ti width (192, 3 heads, MLP 768), 12 layers, InternViT's patch 14: 5.6 M parameters
        benchmark_config=dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                              patch_size=[14, 14], use_mean_pooling=True),
        real_checkpoint="OpenGVLab/InternVL2_5-1B",  # InternViT-300M-448px
        real_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         patch_size=[14, 14], norm_type="layer_norm", use_qk_norm=False),
        pixel_shuffle=2)


    @classmethod
    def build(cls, checkpoint: str | None, config_overrides: dict[str, Any], image_size: tuple[int, int],
              resize: str = "pad", load_weights: bool = True, **kwargs: Any) -> "InternViTEncoder":
        preprocessing = checkpoint_preprocessing(checkpoint, image_size, resize)
        if checkpoint is None:
            config = make_config(InternVLVisionConfig, config_overrides, cls.name)
            return cls(InternVLVisionModel(config), preprocessing)
        if config_overrides:
            raise EncoderUnavailableError(f"encoder 'internvit': config overrides {sorted(config_overrides)} "
                                          f"cannot be applied to the pretrained tower in {checkpoint}")
        model_type = read_config_dict(checkpoint, ("internvl_chat", "internvl", "internvl_vision"),
                                      cls.name)["model_type"]
        if model_type == "internvl_vision":
            config = InternVLVisionConfig.from_pretrained(checkpoint)
            backbone = _load(checkpoint) if load_weights else InternVLVisionModel(config)
            return cls(backbone, preprocessing)
        try:
            source = InternVLCheckpoint.read(resolve_folder(checkpoint))
        except (OSError, ValueError) as e:
            raise EncoderUnavailableError(f"encoder 'internvit': {e}") from e
        if tuple(preprocessing.size) != (source.image_size, source.image_size):
            logger.warning("encoder 'internvit': %s was trained at %d px (force_image_size); at %s its position "
                           "embeddings are interpolated", checkpoint, source.image_size, list(preprocessing.size))
        try:
            return cls(source.vision_tower(load_weights), preprocessing)
        except FileNotFoundError as e:  # no weights file: may fall back; a mismatch (ValueError) always raises
            raise EncoderUnavailableError(f"encoder 'internvit': {e}") from e

    @classmethod
    def from_config_dict(cls, hf_config: dict[str, Any], preprocessing: ImagePreprocessing) -> "InternViTEncoder":
        return cls(InternVLVisionModel(InternVLVisionConfig.from_dict(hf_config)), preprocessing)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        cfg = self.backbone.config
        return [FeatureInfo(channels=cfg.hidden_size, stride=int(cfg.patch_size[0]))]

    def grid_size(self, image_size: tuple[int, int], stage: int = -1) -> tuple[int, int]:
        ph, pw = self.backbone.config.patch_size
        return image_size[0] // ph, image_size[1] // pw  # a stride-p conv: the remainder is cut off

    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        layers = self.backbone.encoder.layer
        groups: dict[str, list[nn.Module]] = {"embeddings": [self.backbone.embeddings]}
        groups.update({f"layer.{i}": [layer] for i, layer in enumerate(layers)})
        groups["last_stage"] = [layers[-1]]
        if not isinstance(self.backbone.layernorm, nn.Identity):  # mean-pooling towers have no final norm
            groups["final_norm"] = [self.backbone.layernorm]
        groups["all"] = [self.backbone]
        return groups

    @property
    def depth_groups(self) -> list[str]:
        return ["embeddings"] + [f"layer.{i}" for i in range(len(self.backbone.encoder.layer))]

    @property
    def lora_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "projection_layer", "mlp.fc1", "mlp.fc2"]

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """(B, 3, H, W) -> patch tokens (B, (H/p)*(W/p), C); the CLS token is dropped."""
        hidden = self.backbone(pixel_values=pixel_values).last_hidden_state  # (B, 1 + h*w, C)
        tokens = hidden[:, 1:]
        grid = self.grid_size((pixel_values.shape[2], pixel_values.shape[3]))
        return EncoderOutput(tokens=tokens, grid=grid, stages=[tokens], stage_grids=[grid])


def _load(checkpoint: str) -> nn.Module:
    try:
        return InternVLVisionModel.from_pretrained(checkpoint, dtype=torch.float32)
    except OSError as e:  # weights missing or unreadable
        raise EncoderUnavailableError(f"encoder 'internvit': cannot load weights from {checkpoint}: {e}") from e
