"""The one place that maps an encoder name to its adapter class.

Adding an encoder is one adapter file (a `VisionEncoder` subclass with a `name` and an `EncoderRecipe`)
plus one line in `ENCODERS`; tests, benchmarks and the encoder comparison read everything else from
the adapter (docs/architecture.md shows an example).

Adapters are imported lazily, so a missing optional dependency of one encoder is reported as
`EncoderUnavailableError` for that encoder (and can trigger the configured fallback) instead of
breaking every import.
"""

from __future__ import annotations

import importlib

from models.encoders.base import EncoderRecipe, EncoderUnavailableError, VisionEncoder

ENCODERS: dict[str, str] = {
    "internvit": "models.encoders.internvit:InternViTEncoder",
    "swin": "models.encoders.swin:SwinEncoder",
    "swinv2": "models.encoders.swin:Swinv2Encoder",
    "swinv2_inhouse": "models.encoders.swinv2_inhouse:Swinv2InhouseEncoder",
}


def encoder_names() -> list[str]:
    """Every registered encoder name."""
    return list(ENCODERS)


def encoder_recipes() -> dict[str, EncoderRecipe]:
    """Name -> `EncoderRecipe` of every registered encoder whose adapter imports (the others are left out;
    `get_encoder_class` names why)."""
    recipes = {}
    for name in ENCODERS:
        try:
            recipes[name] = get_encoder_class(name).recipe
        except EncoderUnavailableError:
            continue
    return recipes


def get_encoder_class(name: str) -> type[VisionEncoder]:
    """Resolve a registry name to its adapter class.

    Raises:
        ValueError: `name` is not registered (the message lists the valid names).
        EncoderUnavailableError: the adapter's module cannot be imported.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown vision encoder {name!r}; valid names: {', '.join(ENCODERS)}")
    module_name, class_name = ENCODERS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EncoderUnavailableError(f"cannot import the {name!r} encoder ({module_name}): {e}") from e
    cls = getattr(module, class_name)
    if cls.name != name:
        raise RuntimeError(f"registry entry {name!r} points at {cls.__name__} whose name is {cls.name!r}")
    return cls
