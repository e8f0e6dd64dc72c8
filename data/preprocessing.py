"""How images must be prepared for an encoder: the one record the data pipeline and the models share.

It lives in `data/` (the lower layer) so that `data` never imports `models`; an encoder adapter
declares its `ImagePreprocessing`, `data.transforms.preprocess` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images must be prepared for an encoder.

    Attributes:
        size: target (height, width) in pixels.
        mean: per-channel RGB mean, applied after scaling pixels to [0, 1].
        std: per-channel RGB std.
        resize: "pad" keeps the aspect ratio and pads to `size` (tall receipts are not squashed);
            "resize" stretches to `size`.
        pad_value: RGB fill (0-255) for the padded border.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "pad"
    pad_value: tuple[int, int, int] = (255, 255, 255)

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "pad_value": list(self.pad_value)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImagePreprocessing":
        return cls(size=tuple(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   resize=d.get("resize", "pad"), pad_value=tuple(d.get("pad_value", (255, 255, 255))))
