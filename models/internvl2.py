"""InternVL2MultimodalModel: a swappable vision encoder, a projector, the InternVL2 LLM and gated
cross-attention, classifying images by how many receipts they hold.

Data flow (one forward pass):
    pixel_values (B, 3, H, W) -> VisionEncoder -> stage tokens [(B, N_i, C_i)]
        -> VisionProjector -> image tokens (B, N, D)
    question ids (B, T) -> Qwen2 LLM -> text states (B, T, D)
        (while the LLM is frozen, once per distinct question: `models.question_cache`)
    text states (queries) x image tokens (keys/values) -> CrossAttentionFusion -> (B, T, D)
        -> masked mean pooling -> head -> logits (B, num_classes)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from config.loader import from_dict, to_dict
from config.schema import InferenceConfig, ModelConfig
from models.calibration import CALIBRATION_KEY, Calibration, check_uncertain_below
from models.card import calibration_section, model_card, with_calibration_section
from models.files import replace_dir, write_text_atomic
from data.preprocessing import ImagePreprocessing
from models.encoders import VisionEncoder, get_encoder_class
from models.fusion import CrossAttentionFusion, TanhGate
from models.language import load_tokenizer
from models.projector import VisionProjector
from models.question_cache import QuestionStateCache

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"  # the model card; never read back
FORMAT_NAME = "receipt-counter"
FORMAT_VERSION = 1
INFERENCE_KEY = "inference"  # config.json's `InferenceConfig` (exports before it: the defaults)
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what an export's weights may be stored as


@dataclass(frozen=True)
class BaseCheckpoint:
    """A pretrained folder the model was built from, and the modules whose weights were loaded from it.

    key: the config key naming the folder (`model.language.checkpoint` or `model.vision.checkpoint`).
    folder: the folder or hub id, as in the resolved config.
    modules: the modules it filled; their parameters are what a resume checkpoint can leave out while frozen.
    """

    key: str
    folder: str
    modules: tuple[nn.Module, ...]


@dataclass
class ReceiptCounterOutput(ModelOutput):
    """loss: scalar when labels are given; logits: (B, num_classes)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class InternVL2MultimodalModel(nn.Module):
    """The receipt counter. Build it with `models.build.build_model` or `from_pretrained`.

    Args:
        config: the resolved model config (encoder actually used, projector settings filled in).
        vision: the vision encoder adapter.
        language: the InternVL2 language model (Qwen2, without LM head); `hidden_size` sets D.
        tokenizer: its tokenizer.
        question_cache_size: distinct questions whose LLM states are kept while the LLM is frozen
            (`models.question_cache` states when they are reused and when dropped); 0 turns the cache off.
    """

    def __init__(self, config: ModelConfig, vision: VisionEncoder, language: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase, question_cache_size: int = 128) -> None:
        super().__init__()
        if len(config.class_names) != config.num_classes:
            raise ValueError(f"model.class_names has {len(config.class_names)} names for "
                             f"model.num_classes={config.num_classes}")
        self.config = config
        self.vision = vision
        self.language = language
        self.tokenizer = tokenizer
        dim = language.config.hidden_size
        self.projector = VisionProjector(_stage_channels(vision, config.vision.feature_stages),
                                         config.vision.feature_stages, dim, config.projector.pixel_shuffle or 1,
                                         config.projector.hidden_size)
        f = config.fusion
        self.fusion = CrossAttentionFusion(dim, f.num_blocks, f.num_heads, f.mlp_ratio, f.dropout)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Dropout(config.head_dropout), nn.Linear(dim, config.num_classes))
        self.question_cache = QuestionStateCache(question_cache_size) if question_cache_size else None
        # Loaded LLM weights make cached states stale. A bound method, so a deepcopy clears its own cache.
        language.register_load_state_dict_post_hook(self._forget_question_states)

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return self.vision.preprocessing

    def num_image_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """Image tokens the fusion attends to for an input of (height, width), default the configured size."""
        size = image_size or self.preprocessing.size
        grids = [self.vision.grid_size(size, i) for i in self.config.vision.feature_stages]
        return self.projector.num_tokens(grids)

    def tokenize(self, questions: list[str | None], device: torch.device | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Questions (None = the default question) -> input_ids, attention_mask, both (B, T)."""
        texts = [q or self.config.language.question for q in questions]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.config.language.max_question_tokens,
                             return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> projected image tokens (B, N, D)."""
        out = self.vision(pixel_values)
        return self.projector(out.stages, out.stage_grids)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
                ) -> ReceiptCounterOutput:
        """Classify images by receipt count.

        Args:
            pixel_values: (B, 3, H, W), normalised as `preprocessing` says.
            input_ids: (B, T) question tokens; None asks the default question of every image.
            attention_mask: (B, T), 1 for real tokens.
            labels: (B,) class indices.

        Returns:
            `ReceiptCounterOutput` with logits (B, num_classes) and, given labels, the cross-entropy loss.
        """
        if input_ids is None:
            input_ids, attention_mask = self.tokenize([None] * pixel_values.shape[0], pixel_values.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_tokens = self.encode_images(pixel_values)  # (B, N, D)
        text = self.text_states(input_ids, attention_mask)  # (B, T, D)
        fused = self.fusion(text.to(image_tokens.dtype), image_tokens)  # (B, T, D)
        mask = attention_mask.unsqueeze(-1).to(fused.dtype)  # (B, T, 1)
        pooled = (fused * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)
        logits = self.head(pooled)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ReceiptCounterOutput(loss=loss, logits=logits)

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) question tokens and mask -> the LLM's last hidden states (B, T, D), cached while it is frozen."""
        if self.question_cache is None:
            return self.language(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.question_cache.text_states(self.language, input_ids, attention_mask)

    def _forget_question_states(self, module: nn.Module, incompatible_keys: Any) -> None:
        """`load_state_dict` post-hook on the LLM: its weights may have changed."""
        if self.question_cache is not None:
            self.question_cache.clear()

    @property
    def reuses_language_projector(self) -> bool:
        """The projector was loaded from the InternVL2 checkpoint (the checkpoint's own tower is the encoder)."""
        return self.vision.in_language_checkpoint and self.config.vision.checkpoint == self.config.language.checkpoint

    def base_checkpoints(self) -> list[BaseCheckpoint]:
        """The pretrained folders the weights came from and what each filled: the LLM (and, for the checkpoint's
        own tower, the encoder and projector) from `model.language.checkpoint`, the encoder from
        `model.vision.checkpoint` otherwise. Fusion, head, LoRA adapters and a random-init encoder come from no
        folder (the seed and the config rebuild their initial values)."""
        language = [self.language]
        bases = []
        if self.reuses_language_projector:
            language += [self.vision, self.projector.projectors[0]]
        elif self.config.vision.checkpoint is not None:
            bases.append(BaseCheckpoint("model.vision.checkpoint", self.config.vision.checkpoint, (self.vision,)))
        return [BaseCheckpoint("model.language.checkpoint", self.config.language.checkpoint, tuple(language)), *bases]

    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        """Named module sets for unfreezing: projector, fusion, fusion.gates, head, language.all, vision.<group>."""
        gates = [m for m in self.fusion.modules() if isinstance(m, TanhGate)]
        groups = {"projector": [self.projector], "fusion": [self.fusion], "fusion.gates": gates, "head": [self.head],
                  "language.all": [self.language]}
        groups.update({f"vision.{name}": modules for name, modules in self.vision.parameter_groups().items()})
        return groups

    def save_pretrained(self, save_directory: str | os.PathLike, card: str | None = None,
                        dtype: torch.dtype = torch.float32, inference: InferenceConfig | None = None,
                        calibration: Calibration | None = None) -> Path:
        """Write a self-describing folder: config.json, model.safetensors, tokenizer files and a model card.

        The folder is written beside the target and renamed into place, so a crash never leaves a
        half-written checkpoint under the final name.

        Args:
            save_directory: the folder to write (replaced if it exists).
            card: the model card's text (README.md); None writes `models.card.model_card(self)`,
                which describes the model without training or evaluation records.
            dtype: how floating-point weights are stored (`EXPORT_DTYPES`): bfloat16 halves the folder;
                config.json records it as "dtype". Integer buffers keep their dtype.
            inference: recorded as config.json's "inference" (None: the defaults).
            calibration: recorded as config.json's "calibration" (None: T = 1, not fitted).
        """
        dtype_name = _dtype_name(dtype)
        inference, calibration = inference or InferenceConfig(), calibration or Calibration()
        check_uncertain_below(inference.uncertain_below, "inference.uncertain_below")
        exported = {**self.export_config(), "dtype": dtype_name, INFERENCE_KEY: to_dict(inference),
                    CALIBRATION_KEY: calibration.to_dict()}
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            (tmp / CONFIG_NAME).write_text(json.dumps(exported, indent=2))
            if card is None:
                card = model_card(self, calibration=calibration, inference=inference)
            (tmp / CARD_NAME).write_text(card, encoding="utf-8")
            _save_weights(self, tmp / WEIGHTS_NAME, dtype)
            self.tokenizer.save_pretrained(tmp)
            replace_dir(tmp, target)  # one atomic exchange: `target` is never missing
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def export_config(self) -> dict[str, Any]:
        """What config.json of an export holds: enough to rebuild the architecture (`from_export_config`)."""
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "encoder": self.vision.name,
                "model": to_dict(self.config), "vision_backbone_config": self.vision.hf_config_dict(),
                "text_config": self.language.config.to_dict(), "preprocessing": self.preprocessing.to_dict(),
                "class_names": self.class_names}

    @classmethod
    def from_export_config(cls, exported: dict[str, Any], tokenizer: PreTrainedTokenizerBase
                           ) -> "InternVL2MultimodalModel":
        """The architecture `exported` (an `export_config()`) describes, with freshly initialised weights.

        Build it under `torch.device("meta")` to get the structure without allocating weights.
        """
        config = from_dict(ModelConfig, exported["model"], prefix="model")
        vision = get_encoder_class(exported["encoder"]).from_config_dict(
            exported["vision_backbone_config"], ImagePreprocessing.from_dict(exported["preprocessing"]))
        text = dict(exported["text_config"])
        language = AutoModel.from_config(AutoConfig.for_model(text.pop("model_type"), **text))
        return cls(config, vision, language, tokenizer)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                        exported: dict[str, Any] | None = None) -> "InternVL2MultimodalModel":
        """Rebuild from a `save_pretrained` folder alone (no other checkpoint, no network).

        Args:
            dtype: the dtype of the returned model's floating-point weights: float32 (default; a bfloat16
                export is widened exactly), bfloat16, or "auto" for the dtype the export was stored in.
            exported: the folder's config.json when the caller has already read it (`read_export_config`);
                None reads it.

        Raises:
            FileNotFoundError: config.json, model.safetensors or the tokenizer is missing (named).
            ValueError: the folder is not a receipt-counter export or its weights do not match.
        """
        folder = Path(folder)
        exported = read_export_config(folder) if exported is None else exported
        model = cls.from_export_config(exported, load_tokenizer(str(folder)))
        try:  # load_state_dict copies into the float32 parameters, casting a bfloat16 file exactly
            safetensors.torch.load_model(model, str(folder / WEIGHTS_NAME), strict=True)
        except RuntimeError as e:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME}: {e}") from e
        if dtype == "auto":
            dtype = EXPORT_DTYPES[exported.get("dtype", "float32")]  # exports before the key was float32
        return model.to(dtype).eval()


def read_export_config(folder: Path) -> dict[str, Any]:
    """config.json of an exported folder, checked for format and for the weights file beside it."""
    for name in (CONFIG_NAME, WEIGHTS_NAME, "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: not a complete receipt-counter model folder")
    try:
        exported = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {e}") from e
    if exported.get("format") != FORMAT_NAME:
        raise ValueError(f"{folder / CONFIG_NAME} is not a receipt-counter export (format={exported.get('format')!r})")
    return exported


def export_settings(exported: dict[str, Any], where: str) -> tuple[InferenceConfig, Calibration]:
    """How an export's outputs are read: the "inference" settings and "calibration" of its config.json
    (`exported`, read from the file `where`); the defaults where a field is absent (older exports).

    Raises:
        ValueError: an invalid field, named with the file.
    """
    try:
        inference = from_dict(InferenceConfig, exported.get(INFERENCE_KEY, {}), prefix=INFERENCE_KEY)
        check_uncertain_below(inference.uncertain_below, f"{INFERENCE_KEY}.uncertain_below")
    except ValueError as e:  # ConfigError too
        raise ValueError(f"{where}: {e}") from None
    return inference, Calibration.from_export(exported, where)


def write_calibration(folder: str | os.PathLike, calibration: Calibration) -> None:
    """Record `calibration` in an existing export: config.json's "calibration", then the card's section.

    Each file is written beside itself and renamed into place (`models.files.write_text_atomic`), so a
    crash leaves the old file or the new one, never a half-written one.
    """
    folder = Path(folder)
    exported = read_export_config(folder)
    inference, _ = export_settings(exported, str(folder / CONFIG_NAME))
    write_text_atomic(folder / CONFIG_NAME, json.dumps({**exported, CALIBRATION_KEY: calibration.to_dict()}, indent=2))
    card = folder / CARD_NAME
    if card.is_file():
        section = calibration_section(calibration, inference)
        write_text_atomic(card, with_calibration_section(card.read_text(encoding="utf-8"), section))


def _dtype_name(dtype: torch.dtype) -> str:
    names = {v: k for k, v in EXPORT_DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"cannot export weights as {dtype}: choose one of {', '.join(EXPORT_DTYPES)}")
    return names[dtype]


def _save_weights(model: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """model.safetensors with floating-point tensors as `dtype`; float32 is the model's own state, untouched."""
    if dtype == torch.float32:
        safetensors.torch.save_model(model, str(path))
        return
    # Casting copies each tensor, so no two share memory any more (what save_model exists to handle).
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})


def _stage_channels(vision: VisionEncoder, stages: list[int]) -> list[int]:
    info = vision.feature_info
    bad = [s for s in stages if not -len(info) <= s < len(info)]
    if bad or not stages:
        raise ValueError(f"model.vision.feature_stages={stages}: encoder {vision.name!r} has {len(info)} stage(s)")
    return [info[s].channels for s in stages]
