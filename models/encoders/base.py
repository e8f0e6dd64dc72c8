"""The one interface every vision encoder adapter implements.

An adapter wraps a vision backbone (InternViT, transformers' Swin / Swin V2, the in-house Swin V2)
and declares, before any forward pass, everything the rest of the project needs: output width,
token grid for an input size, preprocessing, per-stage features, parameter groups for unfreezing
(exact module sets) and LoRA target names.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from data.preprocessing import ImagePreprocessing


class EncoderUnavailableError(RuntimeError):
    """The encoder could not be built (missing or unreadable weights, bad config, import error).

    This is the only error that may trigger `model.vision.fallback`. Shape and dimension
    mismatches raise other errors and never fall back.
    """


@dataclass(frozen=True)
class EncoderRecipe:
    """What an adapter declares so that tests, demos and benchmarks need no per-encoder table.

    Attributes:
        tiny_checkpoint: the `models.tiny.write_tiny_checkpoints` folder (by name) it loads in tests,
            the demo and the encoder A/B comparison; None: those build it at random from `tiny_config`.
        tiny_config: a random-init backbone config small enough for a unit test (a few thousand
            parameters, inputs of 56-224 px).
        benchmark_config: a random-init config matched in depth, width and cost to the other encoders'
            (12 blocks, about 6 M parameters), for scripts/benchmark.py's scaling table.
        real_checkpoint: the hub id of the real weights it pairs with.
        real_config: that checkpoint's backbone config, for random-weight runs at real shapes.
        pixel_shuffle: the token merge the whole-model benchmarks put before the LLM (InternVL merges
            2 x 2 ViT tokens; a Swin's last stage is coarse already).
    """

    tiny_checkpoint: str | None
    tiny_config: dict[str, Any]
    benchmark_config: dict[str, Any]
    real_checkpoint: str
    real_config: dict[str, Any]
    pixel_shuffle: int = 1


@dataclass(frozen=True)
class FeatureInfo:
    """One stage of an encoder: output channels and stride (input pixels per token side)."""

    channels: int
    stride: int


@dataclass
class EncoderOutput:
    """Output of `VisionEncoder.forward`.

    Attributes:
        tokens: final tokens, (B, N, C) with N = h * w, row-major over the grid.
        grid: (h, w) of `tokens`.
        stages: per-stage tokens [(B, N_i, C_i)] and grids [(h_i, w_i)] for hierarchical features,
            indexed like `feature_info`; the last entry is `tokens` (after the final norm).
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    stages: list[torch.Tensor] = field(default_factory=list)
    stage_grids: list[tuple[int, int]] = field(default_factory=list)


class VisionEncoder(nn.Module, abc.ABC):
    """Abstract adapter. Each adapter is listed once, in `models.encoders.registry.ENCODERS`.

    Modules never freeze themselves and never run under `torch.no_grad()`: trainability is decided
    once, outside, by the training policy through `parameter_groups()`.
    """

    name: ClassVar[str]
    recipe: ClassVar[EncoderRecipe]
    # True for InternVL2's own tower: its weights (and a matching projector) live in the language
    # checkpoint, so the builder reuses the checkpoint's projector when both point at the same folder.
    in_language_checkpoint: ClassVar[bool] = False

    @classmethod
    @abc.abstractmethod
    def build(cls, checkpoint: str | None, config_overrides: dict[str, Any], image_size: tuple[int, int],
              resize: str = "pad", load_weights: bool = True, **kwargs: Any) -> "VisionEncoder":
        """Build from a local folder / hub id (`checkpoint`) or at random from a config.

        Args:
            checkpoint: local folder in Hugging Face format or hub id; None for random init.
            config_overrides: backbone config fields (the whole config for random init).
            image_size: (height, width) the encoder will be fed.
            resize: "pad" or "resize", recorded in `preprocessing`.
            load_weights: False builds the checkpoint's architecture from its config alone, reading no
                tensor (the dry-run plan builds this way under `torch.device("meta")`).

        Raises:
            EncoderUnavailableError: weights missing or unreadable, bad config, import error.
        """

    @classmethod
    @abc.abstractmethod
    def from_config_dict(cls, hf_config: dict[str, Any], preprocessing: ImagePreprocessing) -> "VisionEncoder":
        """Rebuild the architecture (random weights) from `hf_config_dict()`, for whole-model loading."""

    @abc.abstractmethod
    def hf_config_dict(self) -> dict[str, Any]:
        """The backbone's full config as a JSON-serialisable dict."""

    @property
    @abc.abstractmethod
    def feature_info(self) -> list[FeatureInfo]:
        """Channels and stride of every stage, known before any forward."""

    @property
    def out_channels(self) -> int:
        """Width C of `EncoderOutput.tokens`."""
        return self.feature_info[-1].channels

    @abc.abstractmethod
    def grid_size(self, image_size: tuple[int, int], stage: int = -1) -> tuple[int, int]:
        """Token grid (h, w) of `stage` for an input of (height, width) pixels."""

    def num_tokens(self, image_size: tuple[int, int], stage: int = -1) -> int:
        h, w = self.grid_size(image_size, stage)
        return h * w

    @property
    @abc.abstractmethod
    def preprocessing(self) -> ImagePreprocessing:
        """Size, mean and std this encoder expects."""

    @abc.abstractmethod
    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        """Named groups of modules for unfreezing: exact module sets, never substring matches.

        Always contains "all"; hierarchical encoders give "embeddings", "stage.<i>", "last_stage" and
        "final_norm" (when the backbone has one).
        """

    @property
    @abc.abstractmethod
    def depth_groups(self) -> list[str]:
        """Group names ordered from input to output (for layer-wise LR decay), e.g. embeddings, stage.0..3."""

    @property
    @abc.abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Names of the Linear modules LoRA may adapt (peft `target_modules` names)."""

    @abc.abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """Encode (B, 3, H, W) images into tokens; see `EncoderOutput`."""

    @abc.abstractmethod
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in the backbone's blocks."""
