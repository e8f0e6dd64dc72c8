"""Tiny random checkpoints in Hugging Face format: the embedded default for the demo and the tests.

They are written with the same classes and `save_pretrained` calls that produced the real
checkpoints, so the project loads them through exactly the code path a real InternVL2.5-1B,
Swin-B or Swin V2-B folder goes through. Deterministic for a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast, Qwen2Config,
                          SwinConfig, SwinForImageClassification, Swinv2Config, Swinv2ForImageClassification)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.vit import ViTImageProcessorPil

from models.encoders import get_encoder_class

IMAGE_TOKEN = "<IMG_CONTEXT>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<img>", "</img>"]

# A few sentences of the task's language, so the tiny BPE learns real merges.
_CORPUS = [
    "How many receipts are in this image?",
    "How many receipts are on the desk? Count every receipt, not the other papers.",
    "Is there a receipt, two receipts, or no receipt in this scan?",
    "Receipt total subtotal tax cash change card store date items thank you",
    "Tax form letter invoice page document paper table scanner photo",
]


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Qwen2's scheme) trained offline on `_CORPUS`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN})


def write_internvl2(out: Path, seed: int) -> Path:
    """InternVL2 (InternViT + Qwen2) at toy size: 224 px, patch 14, 2+2 layers, hidden 32/64."""
    tokenizer = build_tokenizer()
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=[224, 224], patch_size=[14, 14], use_mean_pooling=True)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = InternVLConfig(vision_config=vision, text_config=text.to_dict(), downsample_ratio=0.5,
                            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=64)
    torch.manual_seed(seed)
    InternVLForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    GotOcr2ImageProcessorPil(size={"height": 224, "width": 224}, image_mean=IMAGENET_DEFAULT_MEAN,
                             image_std=IMAGENET_DEFAULT_STD).save_pretrained(out)
    return out


def write_swin(out: Path, seed: int, version: int) -> Path:
    """Swin (v1 or v2) at toy size: embed 16, depths 1-1-2-1, window 7, saved like the hub's classifiers."""
    fields = dict(image_size=224, patch_size=4, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                  window_size=7, drop_path_rate=0.0, num_labels=10)
    config = SwinConfig(**fields) if version == 1 else Swinv2Config(**fields)
    model_class = SwinForImageClassification if version == 1 else Swinv2ForImageClassification
    torch.manual_seed(seed)
    model_class(config).save_pretrained(out)
    ViTImageProcessorPil(size={"height": 224, "width": 224}, image_mean=IMAGENET_DEFAULT_MEAN,
                         image_std=IMAGENET_DEFAULT_STD).save_pretrained(out)
    return out


def write_tiny_checkpoints(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `internvl2/`, `swin/` and `swinv2/` under `out`; returns their paths by name."""
    out = Path(out)
    return {
        "internvl2": write_internvl2(out / "internvl2", seed),
        "swin": write_swin(out / "swin", seed + 1, version=1),
        "swinv2": write_swin(out / "swinv2", seed + 2, version=2),
    }


def tiny_vision_overrides(encoder: str, root: str | Path) -> list[str]:
    """Config overrides that point `model.vision` at `encoder` on its tiny weights.

    The folder is `root / recipe.tiny_checkpoint` (`root` as given to `write_tiny_checkpoints`); an
    encoder whose recipe names no tiny checkpoint is built at random from its `recipe.tiny_config`.
    """
    recipe = get_encoder_class(encoder).recipe
    if recipe.tiny_checkpoint is None:
        return [f"model.vision.encoder={encoder}", "model.vision.checkpoint=null",
                f"model.vision.config={json.dumps(recipe.tiny_config)}"]
    return [f"model.vision.encoder={encoder}", f"model.vision.checkpoint={Path(root) / recipe.tiny_checkpoint}"]
