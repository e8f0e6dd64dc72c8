"""Build the receipt counter from a `ModelConfig`: pretrained pieces, the encoder fallback, and the
record of what was actually built."""

from __future__ import annotations

import dataclasses
import logging

from transformers import InternVLModel, PretrainedConfig

from config.schema import ModelConfig, VisionConfig
from models.encoders import EncoderUnavailableError, VisionEncoder, get_encoder_class
from models.encoders.hf_loading import checkpoint_preprocessing
from models.internvl2 import InternVL2MultimodalModel
from models.language import load_internvl, load_tokenizer

logger = logging.getLogger(__name__)


def build_model(config: ModelConfig, load_weights: bool = True) -> InternVL2MultimodalModel:
    """Load the InternVL2 checkpoint, build the chosen encoder (or its fallback) and assemble the model.

    With `load_weights=False` the same architecture is built from the folders' config.json files alone
    (no tensor is read; the tokenizer still is): call it under `torch.device("meta")` for a model
    without storage, as `python -m train --dry-run` does.

    The returned model's `config` is the resolved one: `vision.encoder` is the encoder actually
    built, `vision.requested_encoder` / `vision.fallback_cause` record a fallback, and
    `projector.pixel_shuffle` holds the value in force.

    Raises:
        EncoderUnavailableError: the encoder cannot be built and no fallback is set (or it failed too).
        ValueError: an unknown encoder name, or shapes/dimensions that do not fit (never a fallback).
    """
    language_ckpt = config.language.checkpoint
    internvl = load_internvl(language_ckpt, config.language.trust_remote_code, load_weights)
    vision, vision_config = build_vision(config.vision, internvl, language_ckpt, load_weights)
    reuse_projector = vision.in_language_checkpoint and vision_config.checkpoint == language_ckpt
    pixel_shuffle = _resolve_pixel_shuffle(config.projector.pixel_shuffle, internvl if reuse_projector else None)
    resolved = dataclasses.replace(config, vision=vision_config,
                                   projector=dataclasses.replace(config.projector, pixel_shuffle=pixel_shuffle))
    model = InternVL2MultimodalModel(resolved, vision, internvl.language_model, load_tokenizer(language_ckpt))
    if reuse_projector and load_weights:
        _load_internvl_projector(model, internvl)
    return model


def build_vision(config: VisionConfig, internvl: InternVLModel, language_ckpt: str, load_weights: bool = True
                 ) -> tuple[VisionEncoder, VisionConfig]:
    """Build `config.encoder`; on `EncoderUnavailableError` build `config.fallback`, loudly.

    Returns:
        The encoder and the vision config resolved to what was built.
    """
    try:
        encoder = _build_encoder(config.encoder, config.checkpoint, config.config, config, internvl, language_ckpt,
                                 load_weights)
        return encoder, dataclasses.replace(config, requested_encoder=config.encoder, fallback_cause=None)
    except EncoderUnavailableError as e:
        if config.fallback is None:
            raise EncoderUnavailableError(f"{e} (model.vision.fallback is null, so nothing else is tried)") from e
        cause = str(e)
    in_language = get_encoder_class(config.fallback).in_language_checkpoint
    checkpoint = config.fallback_checkpoint or (language_ckpt if in_language else None)
    logger.warning("vision encoder %r could not be built, falling back to %r (checkpoint %s). Cause: %s",
                   config.encoder, config.fallback, checkpoint, cause)
    encoder = _build_encoder(config.fallback, checkpoint, {}, config, internvl, language_ckpt, load_weights)
    return encoder, dataclasses.replace(config, encoder=config.fallback, checkpoint=checkpoint, config={},
                                        requested_encoder=config.encoder, fallback_cause=cause)


def _build_encoder(name: str, checkpoint: str | None, overrides: dict, config: VisionConfig,
                   internvl: InternVLModel, language_ckpt: str, load_weights: bool = True) -> VisionEncoder:
    cls = get_encoder_class(name)
    # The InternVL2 checkpoint is already in memory: hand its tower over instead of loading it twice.
    extra = {"source_model": internvl} if cls.in_language_checkpoint and checkpoint == language_ckpt else {}
    size = (int(config.image_size[0]), int(config.image_size[1]))
    if not load_weights and checkpoint is not None and not extra:
        return _encoder_from_config(cls, checkpoint, dict(overrides), size, config.resize)
    return cls.build(checkpoint, dict(overrides), size, resize=config.resize, **extra)


def _encoder_from_config(cls: type[VisionEncoder], checkpoint: str, overrides: dict, size: tuple[int, int],
                         resize: str) -> VisionEncoder:
    """`cls`'s architecture from `checkpoint`'s config.json (and its preprocessing), no weights read."""
    try:
        fields, _ = PretrainedConfig.get_config_dict(checkpoint)
    except (OSError, ValueError) as e:  # missing folder or file, malformed JSON
        raise EncoderUnavailableError(f"encoder {cls.name!r}: cannot read {checkpoint}: {e}") from e
    if cls.in_language_checkpoint and "vision_config" in fields:  # a whole InternVL folder: its tower's config
        fields = fields["vision_config"]
    return cls.from_config_dict({**fields, **overrides}, checkpoint_preprocessing(checkpoint, size, resize))


def _resolve_pixel_shuffle(requested: int | None, internvl: InternVLModel | None) -> int:
    """Checkpoint projectors fix the shuffle factor (InternVL's downsample_ratio 0.5 -> 2)."""
    if internvl is None:
        return requested or 1
    native = round(1 / internvl.config.downsample_ratio)
    if requested not in (None, native):
        raise ValueError(f"model.projector.pixel_shuffle={requested} conflicts with the InternVL2 checkpoint's "
                         f"projector (downsample_ratio {internvl.config.downsample_ratio} -> pixel_shuffle {native})")
    return native


def _load_internvl_projector(model: InternVL2MultimodalModel, internvl: InternVLModel) -> None:
    """Copy the checkpoint's `multi_modal_projector` into our projector (same layout, strict)."""
    if model.config.vision.feature_stages not in ([-1], [0]) or model.config.projector.hidden_size not in (
            None, internvl.config.text_config.hidden_size):
        raise ValueError("reusing the InternVL2 projector needs model.vision.feature_stages=[-1] and "
                         "model.projector.hidden_size=null")
    model.projector.projectors[0].load_state_dict(internvl.multi_modal_projector.state_dict(), strict=True)
