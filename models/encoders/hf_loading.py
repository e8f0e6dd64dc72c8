"""Reading Hugging Face checkpoints for the adapters, with failures sorted into the two kinds that matter.

`EncoderUnavailableError` (may trigger the fallback): the folder or hub id is missing, a file is
unreadable, the config is malformed or describes another model type. Anything else, notably
shape mismatches while loading weights, propagates unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from data.preprocessing import ImagePreprocessing
from models.encoders.base import EncoderUnavailableError, VisionEncoder

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


def read_config_dict(checkpoint: str, expected_types: tuple[str, ...], encoder: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict, checked to describe one of `expected_types`."""
    if looks_local(checkpoint) and not Path(checkpoint).is_dir():
        raise EncoderUnavailableError(f"encoder {encoder!r}: checkpoint folder {checkpoint} does not exist")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(checkpoint)
    except (OSError, ValueError) as e:  # missing folder/file, no network, malformed JSON
        raise EncoderUnavailableError(f"encoder {encoder!r}: cannot read {checkpoint}: {e}") from e
    model_type = config_dict.get("model_type")
    if model_type not in expected_types:
        raise EncoderUnavailableError(f"encoder {encoder!r}: {checkpoint}/config.json has model_type "
                                      f"{model_type!r}, expected one of {list(expected_types)}")
    return config_dict


def looks_local(checkpoint: str) -> bool:
    """A filesystem path rather than a hub id ("namespace/name")."""
    return Path(checkpoint).exists() or checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") > 1


def read_image_stats(checkpoint: str | None) -> Stats:
    """Mean/std from the checkpoint's preprocessor_config.json, else ImageNet's (what Swin and InternViT use)."""
    default = (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    if checkpoint is None:
        return default
    try:
        proc, _ = ImageProcessingMixin.get_image_processor_dict(checkpoint)
    except OSError:  # no preprocessor_config.json: the backbone's documented defaults apply
        return default
    mean, std = proc.get("image_mean"), proc.get("image_std")
    if mean is None or std is None:
        return default
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def checkpoint_preprocessing(checkpoint: str | None, image_size: tuple[int, int], resize: str) -> ImagePreprocessing:
    """The encoder's preprocessing: the configured size and resize mode, the checkpoint's mean/std."""
    mean, std = read_image_stats(checkpoint)
    return ImagePreprocessing(size=(int(image_size[0]), int(image_size[1])), mean=mean, std=std, resize=resize)


def make_config(config_class: type[PretrainedConfig], fields: dict[str, Any], encoder: str) -> PretrainedConfig:
    """Build a backbone config, refusing unknown fields and wrong types (transformers accepts both quietly)."""
    known = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
    unknown = sorted(set(fields) - known)
    if unknown:
        raise EncoderUnavailableError(f"encoder {encoder!r}: unknown {config_class.__name__} field(s) {unknown}")
    try:
        return config_class(**fields)
    except (TypeError, ValueError, StrictDataclassError) as e:
        raise EncoderUnavailableError(f"encoder {encoder!r}: bad {config_class.__name__}: {e}") from e


class HFBackboneEncoder(VisionEncoder):
    """An adapter around a transformers `PreTrainedModel` held as `self.backbone`."""

    def __init__(self, backbone: PreTrainedModel, preprocessing: ImagePreprocessing) -> None:
        super().__init__()
        self.backbone = backbone
        self._preprocessing = preprocessing

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return self._preprocessing

    def hf_config_dict(self) -> dict[str, Any]:
        return self.backbone.config.to_dict()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.backbone.activation_checkpointing_enable()
        else:
            self.backbone.activation_checkpointing_disable()
