"""Typed configuration schema.

Every key a YAML file may hold is a field here; `config.loader` rejects anything else with the
closest valid key. Components take plain typed arguments built from these objects, never the whole
config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_QUESTION = "How many receipts are in this image?"


@dataclass
class VisionConfig:
    """`model.vision`: which encoder, where its weights come from, and what to do when it can't be built."""

    encoder: str = "swin"  # a registry name: internvit, swin, swinv2, swinv2_inhouse
    checkpoint: str | None = None  # local HF folder or hub id; None = random init from `config`
    config: dict[str, Any] = field(default_factory=dict)  # HF config fields (random init) or overrides
    fallback: str | None = None  # registry name built when `encoder` cannot be built; None = error
    fallback_checkpoint: str | None = None  # weights of the fallback (internvit: the InternVL2 folder)
    image_size: list[int] = field(default_factory=lambda: [224, 224])  # (height, width) fed to the encoder
    resize: Literal["pad", "resize"] = "pad"  # keep aspect ratio and pad, or stretch
    feature_stages: list[int] = field(default_factory=lambda: [-1])  # stages whose tokens are projected
    # Filled in by the model builder, never by users: what was actually built and why.
    requested_encoder: str | None = None
    fallback_cause: str | None = None

    def encoder_record(self) -> dict[str, Any]:
        """What every metrics file records about the encoder: the one used, the one asked for, why they differ."""
        return {"encoder": self.encoder, "requested_encoder": self.requested_encoder,
                "fallback_cause": self.fallback_cause}


@dataclass
class ProjectorConfig:
    """`model.projector`: encoder tokens -> LLM hidden size."""

    # merge s x s neighbouring tokens; None = the encoder's default (an InternVL2 checkpoint's own
    # downsample ratio for internvit, whose projector weights are reused; 1 = off otherwise)
    pixel_shuffle: int | None = None
    hidden_size: int | None = None  # MLP width; None = LLM hidden size (InternVL's form)


@dataclass
class LanguageConfig:
    """`model.language`: the InternVL2 checkpoint that provides the Qwen2 LLM and tokenizer."""

    checkpoint: str = "checkpoints/tiny/internvl2"
    question: str = DEFAULT_QUESTION  # asked when a sample has no question of its own
    max_question_tokens: int = 32
    trust_remote_code: bool = False
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class FusionConfig:
    """`model.fusion`: gated cross-attention from text states (queries) to image tokens."""

    num_blocks: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    num_classes: int = 3
    class_names: list[str] = field(default_factory=lambda: ["0", "1", "2+"])
    head_dropout: float = 0.0


@dataclass
class DataConfig:
    train: str | None = None  # manifest (CSV/JSONL) or class-per-folder directory
    val: str | None = None
    test: str | None = None
    batch_size: int = 8
    eval_batch_size: int = 32
    num_workers: int = 0
    augment: bool = True
    augment_options: dict[str, Any] = field(default_factory=dict)  # data.transforms.AugmentConfig fields
    on_bad_image: Literal["skip", "fail"] = "skip"
    max_image_pixels: int = 64_000_000


@dataclass
class StageConfig:
    """One training stage; stages are data, code never names one."""

    name: str = "stage"
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    weight_decay: float = 0.05
    trainable: list[str] = field(default_factory=lambda: ["projector", "fusion", "head"])
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # group -> factor of `lr`
    layer_decay: float | None = None  # per-encoder-stage LR decay for vision groups
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0


@dataclass
class TrainConfig:
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    early_stopping_patience: int | None = None
    save_every_steps: int | None = None
    keep_last_checkpoints: int = 2
    log_every_steps: int = 10  # optimizer steps per row of RUN/steps.jsonl and per tracker log
    # experiment trackers, through accelerate: none, tensorboard, wandb, mlflow, trackio (or any other
    # tracker accelerate supports); each needs its package (`pip install -e .[tensorboard]`, ...)
    report_to: list[str] = field(default_factory=lambda: ["none"])
    # fsdp2: the trainer shards the model with torch's FSDP2 (`fully_shard`) where accelerate does not shard,
    # i.e. several CPU processes (`accelerate launch --multi_gpu` without GPUs); on GPUs use
    # config/accelerate/fsdp2.yaml instead. null: accelerate's config decides (docs/training.md).
    sharding: Literal["fsdp2"] | None = None
    # how RUN/best/ and RUN/final/ store their weights: bfloat16 halves them; loaded back as float32 by default
    export_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class InferenceConfig:
    """`inference`: how an export's outputs are read; recorded in every export (config.json "inference")."""

    # a prediction whose top (calibrated) probability is below this is flagged `uncertain`. 0.5: no class
    # holds a majority, i.e. the answer given is more likely wrong than right when probabilities are
    # calibrated; with 3 classes the top probability is never below 1/3. 0 flags nothing.
    uncertain_below: float = 0.5


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    output_dir: str = "runs/default"
    seed: int = 0
