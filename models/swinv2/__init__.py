"""In-house Swin Transformer V2: fused SDPA attention, weight-compatible with transformers' Swinv2Model."""

from .convert import (checkpoint_filter_fn, config_from_transformers, config_to_transformers, from_transformers,
                      load_state_dict_strict)
from .model import SwinTransformerV2, SwinV2Config, SwinV2Output

__all__ = [
    "SwinTransformerV2", "SwinV2Config", "SwinV2Output", "from_transformers", "config_from_transformers",
    "config_to_transformers", "checkpoint_filter_fn", "load_state_dict_strict",
]
