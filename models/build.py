"""Build the receipt counter from a `ModelConfig`: pretrained pieces, the encoder fallback, and the
record of what was actually built."""

from __future__ import annotations

import dataclasses
import logging

from config.schema import ModelConfig, VisionConfig
from models.encoders import EncoderUnavailableError, VisionEncoder, get_encoder_class
from models.internvl2 import InternVL2MultimodalModel
from models.internvl_checkpoint import InternVLCheckpoint, resolve_folder
from models.language import load_tokenizer

logger = logging.getLogger(__name__)


def build_model(config: ModelConfig, load_weights: bool = True) -> InternVL2MultimodalModel:
    """Read the InternVL checkpoint's LLM, build the chosen encoder (or its fallback) and assemble the model.

    Only what the config uses is read: the LLM without its LM head, the ViT only for `internvit`, and
    the checkpoint's projector only when `internvit` comes from the same folder.

    Args:
        config: the model config.
        load_weights: False builds the architecture from the checkpoints' config files alone, reading no
            tensor; call it under `torch.device("meta")` to allocate nothing (the dry-run plan).

    The returned model's `config` is the resolved one: `vision.encoder` is the encoder actually
    built, `vision.requested_encoder` / `vision.fallback_cause` record a fallback, and
    `projector.pixel_shuffle` holds the value in force.

    Raises:
        FileNotFoundError: the language checkpoint folder or its config.json is missing.
        EncoderUnavailableError: the encoder cannot be built and no fallback is set (or it failed too).
        ValueError: an unknown encoder name, an unsupported checkpoint feature, or shapes/dimensions that
            do not fit (never a fallback).
    """
    language_ckpt = config.language.checkpoint
    try:
        source = InternVLCheckpoint.read(resolve_folder(language_ckpt))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"language checkpoint: {e}; write the tiny one with `python "
                                f"scripts/make_tiny_checkpoints.py --out checkpoints/tiny` or point "
                                f"model.language.checkpoint at an InternVL folder") from e
    language = source.language_model(load_weights)
    vision, vision_config = build_vision(config.vision, language_ckpt, load_weights)
    reuse_projector = vision.in_language_checkpoint and vision_config.checkpoint == language_ckpt
    pixel_shuffle = _resolve_pixel_shuffle(config.projector.pixel_shuffle, source if reuse_projector else None)
    resolved = dataclasses.replace(config, vision=vision_config,
                                   projector=dataclasses.replace(config.projector, pixel_shuffle=pixel_shuffle))
    tokenizer = load_tokenizer(source.folder, config.language.trust_remote_code, source.config)
    model = InternVL2MultimodalModel(resolved, vision, language, tokenizer)
    if reuse_projector:
        _check_projector_reuse(model, source)
        if load_weights:
            model.projector.projectors[0].load_state_dict(source.projector_state(), strict=True)
    return model


def build_vision(config: VisionConfig, language_ckpt: str, load_weights: bool = True
                 ) -> tuple[VisionEncoder, VisionConfig]:
    """Build `config.encoder`; on `EncoderUnavailableError` build `config.fallback`, loudly.

    Returns:
        The encoder and the vision config resolved to what was built.
    """
    try:
        encoder = _build_encoder(config.encoder, config.checkpoint, config.config, config, load_weights)
        return encoder, dataclasses.replace(config, requested_encoder=config.encoder, fallback_cause=None)
    except EncoderUnavailableError as e:
        if config.fallback is None:
            raise EncoderUnavailableError(f"{e} (model.vision.fallback is null, so nothing else is tried)") from e
        cause = str(e)
    in_language = get_encoder_class(config.fallback).in_language_checkpoint
    checkpoint = config.fallback_checkpoint or (language_ckpt if in_language else None)
    logger.warning("vision encoder %r could not be built, falling back to %r (checkpoint %s). Cause: %s",
                   config.encoder, config.fallback, checkpoint, cause)
    encoder = _build_encoder(config.fallback, checkpoint, {}, config, load_weights)
    return encoder, dataclasses.replace(config, encoder=config.fallback, checkpoint=checkpoint, config={},
                                        requested_encoder=config.encoder, fallback_cause=cause)


def _build_encoder(name: str, checkpoint: str | None, overrides: dict, config: VisionConfig,
                   load_weights: bool) -> VisionEncoder:
    size = (int(config.image_size[0]), int(config.image_size[1]))
    return get_encoder_class(name).build(checkpoint, dict(overrides), size, resize=config.resize,
                                         load_weights=load_weights)


def _resolve_pixel_shuffle(requested: int | None, source: InternVLCheckpoint | None) -> int:
    """Checkpoint projectors fix the shuffle factor (InternVL's downsample_ratio 0.5 -> 2)."""
    if source is None:
        return requested or 1
    native = source.pixel_shuffle
    if requested not in (None, native):
        raise ValueError(f"model.projector.pixel_shuffle={requested} conflicts with the InternVL2 checkpoint's "
                         f"projector (downsample_ratio {source.config.downsample_ratio} -> pixel_shuffle {native})")
    return native


def _check_projector_reuse(model: InternVL2MultimodalModel, source: InternVLCheckpoint) -> None:
    """The checkpoint's projector (`mlp1` / `multi_modal_projector`) fits ours only in its own form."""
    if model.config.vision.feature_stages not in ([-1], [0]) or model.config.projector.hidden_size not in (
            None, source.config.text_config.hidden_size):
        raise ValueError("reusing the InternVL2 projector needs model.vision.feature_stages=[-1] and "
                         "model.projector.hidden_size=null")
