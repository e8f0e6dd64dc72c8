"""Loading the InternVL2 checkpoint: its Qwen2 language model, its tokenizer, and (for `internvit`) its
vision tower and projector, all in transformers' native InternVL format."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, InternVLConfig, InternVLModel, PretrainedConfig, PreTrainedTokenizerBase

from models.encoders.hf_loading import looks_local


def load_internvl(checkpoint: str, trust_remote_code: bool = False, load_weights: bool = True) -> InternVLModel:
    """The whole InternVL model (vision tower, projector, LLM) from a folder or hub id.

    With `load_weights=False` only config.json is read and the architecture is built with fresh
    weights (call it under `torch.device("meta")` to allocate none).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: the checkpoint is not in transformers' native InternVL format.
    """
    if looks_local(checkpoint) and not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"language checkpoint {checkpoint} does not exist; write the tiny one with "
                                f"`python scripts/make_tiny_checkpoints.py --out checkpoints/tiny` or point "
                                f"model.language.checkpoint at an InternVL2 folder")
    config_dict, _ = PretrainedConfig.get_config_dict(checkpoint)
    if config_dict.get("model_type") != "internvl":
        raise ValueError(f"{checkpoint}: model_type {config_dict.get('model_type')!r} is not transformers' native "
                         f"'internvl' format (original OpenGVLab 'internvl_chat' folders must be converted with "
                         f"transformers' convert_internvl_weights_to_hf.py first)")
    if not load_weights:
        return InternVLModel(InternVLConfig.from_dict(config_dict))
    return InternVLModel.from_pretrained(checkpoint, trust_remote_code=trust_remote_code,
                                         dtype=torch.float32)


def load_tokenizer(checkpoint: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, with a pad token (right padding: the LLM is causal, pooling is masked)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
