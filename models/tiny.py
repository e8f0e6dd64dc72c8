"""Random checkpoints in the layouts users download: the embedded default for the demo and the tests.

`write_tiny_checkpoints` writes toy InternVL2, Swin and Swin V2 folders in Hugging Face format with
the same classes and `save_pretrained` calls that produced the real checkpoints.
`write_original_internvl` writes an InternVL folder as OpenGVLab publishes it (`internvl_chat`,
weights `vision_model.*` / `mlp1.*` / `language_model.*`, Qwen2 or InternLM2 LLM) and
`write_hf_internvl` one in transformers' native layout; both at toy size or at InternVL2.5-1B's real
shapes, tensor by tensor (no model is built, no tensor is held twice). Deterministic for a seed.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2Tokenizer, SwinConfig, SwinForImageClassification, Swinv2Config,
                          Swinv2ForImageClassification)
from transformers.core_model_loading import revert_weight_conversion
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.vit import ViTImageProcessorPil

from models.encoders import get_encoder_class
from models.files import replace_dir, write_json

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


# --- InternVL folders in the layouts users download, toy or full size, written tensor by tensor -------------

TensorSpec = tuple[str, tuple[int, ...]]

# InternVL's own tokens, added after the LLM's vocabulary (as OpenGVLab's tokenizers hold them).
INTERNVL_TOKENS = ["<img>", "</img>", IMAGE_TOKEN, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# OpenGVLab's Python files in a hub folder; ours raise on import, so a test can show none is ever imported.
REMOTE_CODE_FILES = {
    "qwen2": ["configuration_intern_vit.py", "configuration_internvl_chat.py", "conversation.py",
              "modeling_intern_vit.py", "modeling_internvl_chat.py"],
    "internlm2": ["configuration_intern_vit.py", "configuration_internvl_chat.py", "conversation.py",
                  "modeling_intern_vit.py", "modeling_internvl_chat.py", "configuration_internlm2.py",
                  "modeling_internlm2.py", "tokenization_internlm2.py"],
}
_REMOTE_CODE_STUB = ('"""Stands in for OpenGVLab\'s remote code: the project never imports a checkpoint\'s Python '
                     'files."""\n\nraise RuntimeError("remote code was imported")\n')
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_FILL_CHUNK = 1 << 22  # values drawn per step: a bf16 tensor is never held in float32 whole


@dataclass(frozen=True)
class InternVLPreset:
    """Shapes of an InternVL model, in the field names of OpenGVLab's vision_config / llm_config.

    `text` without `vocab_size` takes the size of the tokenizer written beside the weights.
    """

    vision: dict[str, Any]
    text: dict[str, Any]
    image_size: int
    llms: tuple[str, ...] = ("qwen2", "internlm2")


PRESETS = {
    # ViT 32 wide, 2 layers; LLM 64 wide, 2 layers, 4 query / 2 key-value heads; 56 px = a 4 x 4 patch grid.
    "tiny": InternVLPreset(
        vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
        image_size=56),
    # InternViT-300M-448px + Qwen2.5-0.5B-Instruct, as OpenGVLab/InternVL2_5-1B holds them (938 M parameters).
    "internvl2.5-1b": InternVLPreset(
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, max_position_embeddings=32768, vocab_size=151674),
        image_size=448, llms=("qwen2",)),
    # InternViT-300M-448px + InternLM2.5-7B-chat, as OpenGVLab/InternVL2_5-8B holds them.
    "internvl2.5-8b": InternVLPreset(
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=32768, vocab_size=92553),
        image_size=448, llms=("internlm2",)),
    # InternViT-6B-448px-V2_5 (qk-norm, RMSNorm, no qkv bias) + Qwen2.5-72B-Instruct, as OpenGVLab/InternVL2_5-78B.
    "internvl2.5-78b": InternVLPreset(
        vision=dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
                    qk_normalization=True, norm_type="rms_norm", qkv_bias=False),
        text=dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, max_position_embeddings=32768, vocab_size=151674),
        image_size=448, llms=("qwen2",)),
}


def get_preset(name: str, llm: str = "qwen2") -> InternVLPreset:
    """The named preset; an unknown name, or an LLM family the preset does not have, is an error."""
    if name not in PRESETS:
        raise ValueError(f"unknown InternVL preset {name!r}; valid: {sorted(PRESETS)}")
    if llm not in PRESETS[name].llms:
        raise ValueError(f"preset {name!r} has no {llm!r} LLM (it has {list(PRESETS[name].llms)})")
    return PRESETS[name]


def _merged(defaults: dict[str, Any], overrides: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"{what}: unknown fields {unknown}; valid: {sorted(defaults)}")
    return {**defaults, **overrides}


def original_vision_config(fields: dict[str, Any], image_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """vision_config of an original folder (InternVisionConfig as transformers 4.x writes it)."""
    defaults = {"architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.0,
                "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1024, "image_size": image_size,
                "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
                "layer_norm_eps": 1e-6, "model_type": "intern_vit_6b", "norm_type": "layer_norm",
                "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14,
                "qk_normalization": False, "qkv_bias": True, "torch_dtype": _dtype_name(dtype),
                "transformers_version": "4.37.2", "use_bfloat16": dtype == torch.bfloat16, "use_flash_attn": True}
    return _merged(defaults, fields, "vision_config")


def original_llm_config(llm: str, fields: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """llm_config of an original folder: a Qwen2 or an InternLM2 config dict as transformers 4.x writes it."""
    common = {"hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
              "max_position_embeddings": 32768, "num_attention_heads": 14, "num_hidden_layers": 24,
              "num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": False,
              "torch_dtype": _dtype_name(dtype), "transformers_version": "4.37.2",
              "use_bfloat16": dtype == torch.bfloat16, "use_cache": True}
    if llm == "qwen2":
        defaults = {"_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "architectures": ["Qwen2ForCausalLM"],
                    "model_type": "qwen2", "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
                    "max_window_layers": 21, "rms_norm_eps": 1e-6, "rope_scaling": None, "sliding_window": 32768,
                    "use_sliding_window": False, "vocab_size": 151674, **common}
    elif llm == "internlm2":
        defaults = {"_name_or_path": "internlm/internlm2_5-1_8b-chat", "architectures": ["InternLM2ForCausalLM"],
                    "model_type": "internlm2", "attn_implementation": "eager",
                    "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                                 "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                                 "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
                    "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "rms_norm_eps": 1e-5,
                    "rope_scaling": {"type": "dynamic", "factor": 2.0}, "vocab_size": 92553, **common}
    else:
        raise ValueError(f"unknown LLM family {llm!r}; valid: ['internlm2', 'qwen2']")
    return _merged(defaults, fields, "llm_config")


def original_internvl_config(vision_config: dict[str, Any], llm_config: dict[str, Any], *, image_size: int,
                             downsample_ratio: float = 0.5, select_layer: int = -1, ps_version: str = "v2",
                             dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """config.json of an OpenGVLab InternVL folder (InternVLChatConfig), around the two sub-configs."""
    return {"architectures": ["InternVLChatModel"],
            "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                         "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                         "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
            "downsample_ratio": downsample_ratio, "dynamic_image_size": True, "force_image_size": image_size,
            "hidden_size": llm_config["hidden_size"], "llm_config": llm_config, "max_dynamic_patch": 12,
            "min_dynamic_patch": 1, "model_type": "internvl_chat", "pad2square": False, "ps_version": ps_version,
            "select_layer": select_layer, "template": "internvl2_5", "tie_word_embeddings": False,
            "torch_dtype": _dtype_name(dtype), "transformers_version": None, "use_backbone_lora": 0,
            "use_llm_lora": 0, "use_thumbnail": True, "vision_config": vision_config}


def original_tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """(name, shape) of every tensor an original InternVL folder holds, from its config.json alone."""
    llm = config["llm_config"]
    llm_specs = {"Qwen2ForCausalLM": _qwen2_specs, "InternLM2ForCausalLM": _internlm2_specs}
    arch = llm["architectures"][0]
    if arch not in llm_specs:
        raise ValueError(f"llm_config architecture {arch!r} is not one of {sorted(llm_specs)}")
    return [*_intern_vit_specs(config["vision_config"]), *_mlp1_specs(config), *llm_specs[arch](llm)]


def _intern_vit_specs(v: dict[str, Any]) -> list[TensorSpec]:
    """InternVisionModel under `vision_model.` (modeling_intern_vit.py): no final norm, no pooler weights."""
    c, i, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    if v["norm_type"] not in ("layer_norm", "rms_norm"):
        raise ValueError(f"vision_config.norm_type {v['norm_type']!r} is not 'layer_norm' or 'rms_norm'")
    norm_params = ("weight", "bias") if v["norm_type"] == "layer_norm" else ("weight",)
    specs: list[TensorSpec] = [
        ("vision_model.embeddings.class_embedding", (1, 1, c)),
        ("vision_model.embeddings.patch_embedding.weight", (c, v["num_channels"], p, p)),
        ("vision_model.embeddings.patch_embedding.bias", (c,)),
        ("vision_model.embeddings.position_embedding", (1, 1 + (v["image_size"] // p) ** 2, c))]
    for n in range(v["num_hidden_layers"]):
        layer = f"vision_model.encoder.layers.{n}."
        specs.append((layer + "attn.qkv.weight", (3 * c, c)))
        specs += [(layer + "attn.qkv.bias", (3 * c,))] if v["qkv_bias"] else []
        specs += [(layer + "attn.q_norm.weight", (c,)), (layer + "attn.k_norm.weight", (c,))] \
            if v["qk_normalization"] else []
        specs += [(layer + "attn.proj.weight", (c, c)), (layer + "attn.proj.bias", (c,)),
                  (layer + "ls1", (c,)), (layer + "ls2", (c,))]
        specs += [(f"{layer}{norm}.{param}", (c,)) for norm in ("norm1", "norm2") for param in norm_params]
        specs += [(layer + "mlp.fc1.weight", (i, c)), (layer + "mlp.fc1.bias", (i,)),
                  (layer + "mlp.fc2.weight", (c, i)), (layer + "mlp.fc2.bias", (c,))]
    return specs


def _mlp1_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """The projector: LayerNorm(C*r*r) -> Linear(C*r*r, D) -> GELU -> Linear(D, D), r = 1/downsample_ratio."""
    wide = config["vision_config"]["hidden_size"] * int(1 / config["downsample_ratio"]) ** 2
    d = config["llm_config"]["hidden_size"]
    return [("mlp1.0.weight", (wide,)), ("mlp1.0.bias", (wide,)), ("mlp1.1.weight", (d, wide)),
            ("mlp1.1.bias", (d,)), ("mlp1.3.weight", (d, d)), ("mlp1.3.bias", (d,))]


def _qwen2_specs(t: dict[str, Any]) -> list[TensorSpec]:
    """Qwen2ForCausalLM under `language_model.`: q/k/v biases, no o_proj bias, untied lm_head unless tied."""
    d, f, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    hd = d // t["num_attention_heads"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    specs: list[TensorSpec] = [("language_model.model.embed_tokens.weight", (v, d))]
    for n in range(t["num_hidden_layers"]):
        layer = f"language_model.model.layers.{n}."
        specs += [(layer + "self_attn.q_proj.weight", (q, d)), (layer + "self_attn.q_proj.bias", (q,)),
                  (layer + "self_attn.k_proj.weight", (kv, d)), (layer + "self_attn.k_proj.bias", (kv,)),
                  (layer + "self_attn.v_proj.weight", (kv, d)), (layer + "self_attn.v_proj.bias", (kv,)),
                  (layer + "self_attn.o_proj.weight", (d, q)), (layer + "mlp.gate_proj.weight", (f, d)),
                  (layer + "mlp.up_proj.weight", (f, d)), (layer + "mlp.down_proj.weight", (d, f)),
                  (layer + "input_layernorm.weight", (d,)), (layer + "post_attention_layernorm.weight", (d,))]
    specs.append(("language_model.model.norm.weight", (d,)))
    return specs + ([] if t["tie_word_embeddings"] else [("language_model.lm_head.weight", (v, d))])


def _internlm2_specs(t: dict[str, Any]) -> list[TensorSpec]:
    """InternLM2ForCausalLM under `language_model.`: one fused wqkv, grouped per key-value head."""
    d, f, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    hd = d // t["num_attention_heads"]
    qkv = (t["num_attention_heads"] + 2 * t["num_key_value_heads"]) * hd
    specs: list[TensorSpec] = [("language_model.model.tok_embeddings.weight", (v, d))]
    for n in range(t["num_hidden_layers"]):
        layer = f"language_model.model.layers.{n}."
        specs.append((layer + "attention.wqkv.weight", (qkv, d)))
        specs += [(layer + "attention.wqkv.bias", (qkv,))] if t["bias"] else []
        specs.append((layer + "attention.wo.weight", (d, d)))
        specs += [(layer + "attention.wo.bias", (d,))] if t["bias"] else []
        specs += [(layer + "feed_forward.w1.weight", (f, d)), (layer + "feed_forward.w3.weight", (f, d)),
                  (layer + "feed_forward.w2.weight", (d, f)), (layer + "attention_norm.weight", (d,)),
                  (layer + "ffn_norm.weight", (d,))]
    specs.append(("language_model.model.norm.weight", (d,)))
    return specs + ([] if t["tie_word_embeddings"] else [("language_model.output.weight", (v, d))])


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A random tensor for the parameter `name`, the same for a (seed, name) whatever else is written.

    Biases ~ N(0, 0.1); 1-d weights (norms, layer scales) ~ N(1, 0.1), so that a swapped or dropped
    norm shows in the outputs; 3-d embeddings (class, position) ~ N(0, 0.5); matrices and convolutions
    ~ N(0, 1/fan_in), which keeps activations near unit scale through the layers.
    """
    if name.endswith(".bias"):
        mean, std = 0.0, 0.1
    elif len(shape) == 1:
        mean, std = 1.0, 0.1
    elif len(shape) == 3:
        mean, std = 0.0, 0.5
    else:
        mean, std = 0.0, math.prod(shape[1:]) ** -0.5
    generator = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _FILL_CHUNK):
        n = min(_FILL_CHUNK, flat.numel() - start)
        flat[start:start + n] = torch.randn(n, generator=generator).mul_(std).add_(mean)
    return out


def write_safetensors_lazily(path: Path, specs: list[TensorSpec], dtype: torch.dtype,
                             make: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
    """A safetensors file written one tensor at a time, `make(name, shape)` called for each in turn.

    The header (names, shapes, byte offsets) follows from the shapes alone, so it is written first and
    each tensor is freed once its bytes are out: peak memory is one tensor, not the file.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        end = offset + math.prod(shape) * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)  # little-endian u64 header length, as the format says
        for name, shape in specs:
            tensor = make(name, shape)
            if tensor.shape != shape or tensor.dtype != dtype:
                raise ValueError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, header says {shape} {dtype}")
            handle.write(tensor.contiguous().view(-1).view(torch.uint8).numpy())


def write_weights(folder: Path, specs: list[TensorSpec], dtype: torch.dtype,
                  make: Callable[[str, tuple[int, ...]], torch.Tensor], shard_mib: float | None = None) -> list[Path]:
    """`model.safetensors`, or shards of at most `shard_mib` MiB with `model.safetensors.index.json`
    (a tensor larger than a shard gets one to itself), named as `save_pretrained` names them."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[TensorSpec]] = [[]]
    limit, used = (shard_mib or math.inf) * 2**20, 0
    for name, shape in specs:
        size = math.prod(shape) * itemsize
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    if len(shards) == 1:
        write_safetensors_lazily(folder / "model.safetensors", specs, dtype, make)
        return [folder / "model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file_name, shard in zip(names, shards):
        write_safetensors_lazily(folder / file_name, shard, dtype, make)
    weight_map = {name: file_name for file_name, shard in zip(names, shards) for name, _ in shard}
    total = sum(math.prod(shape) for _, shape in specs) * itemsize
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return [folder / name for name in names]


def write_original_internvl(out: str | Path, *, llm: str = "qwen2", preset: str = "tiny",
                            vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, image_size: int | None = None,
                            downsample_ratio: float = 0.5, select_layer: int = -1, ps_version: str = "v2",
                            shard_mib: float | None = None, weights: bool = True) -> Path:
    """A random InternVL folder in OpenGVLab's original layout, as users download it from the hub.

    It holds config.json (`internvl_chat`, with `auto_map`, `llm_config`, `vision_config`), weights by
    the original names (`vision_model.*`, `mlp1.*`, `language_model.*`), the LLM's tokenizer (Qwen2
    byte-level BPE, or an InternLM2 sentencepiece `tokenizer.model`), preprocessor_config.json, and
    OpenGVLab's Python file names with bodies that raise `RuntimeError("remote code was imported")`.

    Args:
        out: the folder to write (replaced if it exists; written beside it and renamed into place).
        llm: "qwen2" or "internlm2".
        preset: a name in `PRESETS` ("tiny", "internvl2.5-1b").
        vision, text: vision_config / llm_config fields over the preset's (e.g. {"qk_normalization": True}).
        seed: the weights are a function of (seed, tensor name) only.
        dtype: the weights' dtype (bfloat16 as published; float32 for exactness tests).
        image_size: the ViT's native size (its position embeddings); default the preset's.
        downsample_ratio, select_layer, ps_version: the top-level config.json fields of those names.
        shard_mib: shard size in MiB (then model.safetensors.index.json); None writes one file.
        weights: False writes everything but the weights: enough for `python -m train --dry-run`, which
            reads config files only (how a 78B model is planned on a laptop).

    Returns:
        `out`.
    """
    spec = get_preset(preset, llm)
    size = image_size or spec.image_size
    with _staged_folder(Path(out)) as tmp:
        tokens = _save_qwen2_tokenizer(tmp) if llm == "qwen2" else _save_internlm2_tokenizer(tmp)
        llm_fields = {**tokens, **spec.text, **(text or {})}
        if llm_fields["vocab_size"] < tokens["vocab_size"]:
            raise ValueError(f"llm_config vocab_size {llm_fields['vocab_size']} is smaller than the tokenizer's "
                             f"{tokens['vocab_size']}")
        config = original_internvl_config(
            original_vision_config({**spec.vision, **(vision or {})}, size, dtype),
            original_llm_config(llm, llm_fields, dtype), image_size=size, downsample_ratio=downsample_ratio,
            select_layer=select_layer, ps_version=ps_version, dtype=dtype)
        write_json(tmp / "config.json", config)
        if weights:
            write_weights(tmp, original_tensor_specs(config), dtype,
                          lambda name, shape: random_tensor(name, shape, seed, dtype), shard_mib)
        write_json(tmp / "preprocessor_config.json", _clip_preprocessor_config(size))
        for file_name in REMOTE_CODE_FILES[llm]:
            (tmp / file_name).write_text(_REMOTE_CODE_STUB)
    return Path(out)


@contextmanager
def _staged_folder(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out`, renamed into its place when the block succeeds and removed when it fails,
    so a crash never leaves a half-written checkpoint under the final name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clip_preprocessor_config(size: int) -> dict[str, Any]:
    """preprocessor_config.json of OpenGVLab's InternVL2 folders: a CLIP feature extractor, ImageNet statistics."""
    return {"crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": size}


def _save_qwen2_tokenizer(folder: Path) -> dict[str, int]:
    """`build_tokenizer()`'s BPE as a hub Qwen2 folder holds one: vocab.json, merges.txt, tokenizer.json and
    a tokenizer_config.json naming `Qwen2Tokenizer`, InternVL's tokens added. Returns llm_config's token fields."""
    bpe = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        bpe.backend_tokenizer.model.save(tmp)
        vocab = json.loads((Path(tmp) / "vocab.json").read_text(encoding="utf-8"))
        merges = [tuple(line.split(" ")) for line in (Path(tmp) / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#version")]
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS]})
        tokenizer.save_pretrained(folder)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(Path(tmp) / name, folder / name)
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id}


def _save_internlm2_tokenizer(folder: Path) -> dict[str, int]:
    """A sentencepiece BPE trained on `_CORPUS` as InternLM2's `tokenizer.model` (<unk>, <s>, </s> = 0, 1, 2;
    byte fallback), InternVL's tokens added after it, and tokenizer_config.json naming OpenGVLab's remote
    `InternLM2Tokenizer`. Returns llm_config's token fields."""
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError("InternLM2 folders need sentencepiece: pip install 'receipt-counter[internlm2]'") from e
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_writer=model, model_type="bpe", vocab_size=320,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    special = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<|im_start|>", 4: "<|im_end|>",
               **{pieces + i: token for i, token in enumerate(INTERNVL_TOKENS)}}
    extra = ["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS]
    write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, token in special.items()},
        "additional_special_tokens": extra,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "model_max_length": 8192,
        "pad_token": "</s>", "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>"})
    write_json(folder / "special_tokens_map.json", {"additional_special_tokens": extra, "bos_token": "<s>",
                                                    "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"})
    return {"vocab_size": pieces + len(INTERNVL_TOKENS), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_internvl_config(preset: str = "internvl2.5-1b", tokenizer: PreTrainedTokenizerFast | None = None
                       ) -> InternVLConfig:
    """The preset as transformers' native `InternVLConfig` (what convert_internvl_weights_to_hf.py writes)."""
    spec = get_preset(preset, "qwen2")
    tokenizer = tokenizer or build_tokenizer()
    v, t, size = spec.vision, spec.text, spec.image_size
    grid = size // 14
    vision = dict(hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
                  num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                  image_size=[size, size], patch_size=[14, 14], attention_bias=True, norm_type="layer_norm",
                  layer_norm_eps=1e-6, use_qk_norm=False, use_mean_pooling=True)
    text = Qwen2Config(**{k: t[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
                       vocab_size=t.get("vocab_size", len(tokenizer)), rms_norm_eps=1e-6, tie_word_embeddings=False,
                       rope_theta=1000000.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return InternVLConfig(vision_config=vision, text_config=text.to_dict(), downsample_ratio=0.5,
                          image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                          image_seq_length=grid * grid // 4,
                          tie_word_embeddings=False)


def hf_tensor_specs(config: InternVLConfig) -> list[TensorSpec]:
    """(name, shape) of every tensor `InternVLForConditionalGeneration.save_pretrained` writes for `config`,
    read off a model built on the meta device (no memory) and renamed as saving renames it."""
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    saved = revert_weight_conversion(model, model.state_dict())
    tied = {"language_model.lm_head.weight", "lm_head.weight"} if config.text_config.tie_word_embeddings else set()
    return [(name, tuple(t.shape)) for name, t in saved.items() if name not in tied]


def write_hf_internvl(out: str | Path, *, preset: str = "internvl2.5-1b", seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16, shard_mib: float | None = None) -> Path:
    """A random InternVL folder in transformers' native layout (`InternVLForConditionalGeneration`), written
    tensor by tensor like `write_original_internvl`; the tokenizer and image processor of `write_internvl2`."""
    tokenizer = build_tokenizer()
    config = hf_internvl_config(preset, tokenizer)
    config.dtype = dtype
    with _staged_folder(Path(out)) as tmp:
        config.save_pretrained(tmp)
        write_weights(tmp, hf_tensor_specs(config), dtype,
                      lambda name, shape: random_tensor(name, shape, seed, dtype), shard_mib)
        tokenizer.save_pretrained(tmp)
        size = config.vision_config.image_size
        GotOcr2ImageProcessorPil(size={"height": size[0], "width": size[1]}, image_mean=IMAGENET_DEFAULT_MEAN,
                                 image_std=IMAGENET_DEFAULT_STD).save_pretrained(tmp)
    return Path(out)
