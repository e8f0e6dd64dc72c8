"""Encoder-aware preprocessing and train-time augmentation, with PIL and torch only.

Public API:
    AugmentConfig(...)                                  -- strengths of the train-time augmentation.
    resize_image(image, size, mode="pad", pad_value=(255, 255, 255)) -> PIL.Image.Image
    to_tensor(image, mean, std) -> FloatTensor[3, H, W]
    augment_image(image, generator=None, config=AugmentConfig(), fill=(255, 255, 255), size=None,
                  mode="pad") -> PIL.Image.Image
    preprocess(image, preprocessing, augment=None, generator=None) -> FloatTensor[3, H, W]

`preprocessing` is the encoder's `data.preprocessing.ImagePreprocessing`: the target (height,
width) may be non-square; `resize="pad"` keeps the aspect ratio and pads with `pad_value` (a long
receipt stays long), `resize="resize"` stretches. Pixel values follow the Hugging Face image
processor convention (`do_rescale` by 1/255, then `do_normalize` with the encoder's mean and std,
e.g. `transformers.image_utils.OPENAI_CLIP_MEAN`), resampling is bicubic as in most of them.

Augmentation is deterministic for a given `torch.Generator` state: every random draw goes through it.
Its geometry (rotation, crop, and the resize or pad to the encoder's size) is one affine resampling
pass computed at the output resolution, after an antialiasing integer reduction of a large source;
the colour, blur and JPEG steps then work on the small output. On 448 px photos this is
about 2.4 ms per image instead of 24 ms for rotating and cropping at full size (docs/data.md).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
from PIL import Image, ImageEnhance, ImageFilter
from transformers.image_utils import PILImageResampling

from data.images import fitted_size, to_rgb
from data.preprocessing import ImagePreprocessing

WHITE = (255, 255, 255)
RESAMPLE = PILImageResampling.BICUBIC


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the train-time augmentation.

    Kept mild on purpose: the label is a count, so a crop or rotation strong enough to push a receipt
    out of the frame would change the right answer.

    Attributes:
        max_rotation: degrees, uniform in [-max_rotation, max_rotation].
        min_crop: each side keeps a uniform fraction in [min_crop, 1] of its length.
        brightness, contrast, saturation: factors uniform in [1 - x, 1 + x].
        blur_prob, max_blur_radius: Gaussian blur with a radius uniform in (0, max_blur_radius].
        jpeg_prob, jpeg_quality: JPEG re-encoding at a quality uniform in the (low, high) range.
        hflip_prob, vflip_prob: mirror left-right / top-bottom (a count does not change; a photo taken
            from above stays plausible).
        rot90_prob: turn by a quarter (same reasoning; a portrait image becomes landscape).
    """

    max_rotation: float = 5.0
    min_crop: float = 0.9
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    blur_prob: float = 0.3
    max_blur_radius: float = 1.2
    jpeg_prob: float = 0.3
    jpeg_quality: tuple[int, int] = (35, 90)
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    rot90_prob: float = 0.0


def resize_image(image: Image.Image, size: tuple[int, int], mode: str = "pad",
                 pad_value: tuple[int, int, int] = WHITE) -> Image.Image:
    """Resize an RGB image to `size` = (height, width).

    Args:
        mode: "pad" scales to fit inside `size` keeping the aspect ratio and centres the result on a
            `pad_value` canvas; "resize" stretches to `size`.
    """
    height, width = size
    new_h, new_w = fitted_size((image.height, image.width), size, mode)
    if mode == "resize":
        return image.resize((width, height), RESAMPLE)
    canvas = Image.new("RGB", (width, height), tuple(pad_value))
    canvas.paste(image.resize((new_w, new_h), RESAMPLE), ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def to_tensor(image: Image.Image, mean: tuple[float, float, float],
              std: tuple[float, float, float]) -> torch.Tensor:
    """RGB image -> normalised float tensor (3, H, W): (pixel / 255 - mean) / std."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    out = torch.empty(3, image.height, image.width)
    out.copy_(pixels.permute(2, 0, 1))  # HWC uint8 -> CHW float in one pass
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    return out.mul_(scale).add_(shift)


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def augment_image(image: Image.Image, generator: torch.Generator | None = None,
                  config: AugmentConfig = AugmentConfig(), fill: tuple[int, int, int] = WHITE,
                  size: tuple[int, int] | None = None, mode: str = "pad") -> Image.Image:
    """Random flips, rotation, crop, colour jitter, blur and JPEG re-encoding of an RGB image.

    Args:
        generator: source of every random draw; the same generator state gives the same output.
        fill: colour for the corners uncovered by rotation and for padding (the encoder's pad value).
        size: (height, width) of the output, reached in the same resampling pass as the rotation and
            crop, the way `resize_image(..., mode)` would; None keeps the crop at the source's scale.
        mode: "pad" or "resize", as in `resize_image`.
    """
    for prob, transpose in ((config.hflip_prob, Image.Transpose.FLIP_LEFT_RIGHT),
                            (config.vflip_prob, Image.Transpose.FLIP_TOP_BOTTOM),
                            (config.rot90_prob, Image.Transpose.ROTATE_90)):
        if _uniform(generator, 0.0, 1.0) < prob:
            image = image.transpose(transpose)
    image = _rotate_crop_resize(image, generator, config, fill, size, mode)
    image = _colour_jitter(image, generator, config)
    if _uniform(generator, 0.0, 1.0) < config.blur_prob:
        radius = _uniform(generator, 0.1, config.max_blur_radius)
        image = image.filter(ImageFilter.GaussianBlur(radius))
    if _uniform(generator, 0.0, 1.0) < config.jpeg_prob:
        image = _jpeg_roundtrip(image, round(_uniform(generator, *config.jpeg_quality)))
    return image


def _rotate_crop_resize(image: Image.Image, generator: torch.Generator | None, config: AugmentConfig,
                        fill: tuple[int, int, int], size: tuple[int, int] | None, mode: str) -> Image.Image:
    """Rotate about the centre (canvas expanded to hold the whole image), keep a random window of
    [min_crop, 1] of each side, and scale it to `size`: one affine map from output to source pixels."""
    if mode not in ("pad", "resize"):
        raise ValueError(f"resize mode must be 'pad' or 'resize', got {mode!r}")
    w, h = image.size
    angle = math.radians(_uniform(generator, -config.max_rotation, config.max_rotation))
    cos, sin = math.cos(angle), math.sin(angle)
    rot_w, rot_h = abs(w * cos) + abs(h * sin), abs(w * sin) + abs(h * cos)  # the expanded canvas
    keep_w = rot_w * _uniform(generator, config.min_crop, 1.0)
    keep_h = rot_h * _uniform(generator, config.min_crop, 1.0)
    left = _uniform(generator, 0.0, rot_w - keep_w)
    top = _uniform(generator, 0.0, rot_h - keep_h)
    if size is None:
        out_h, out_w = max(1, round(keep_h)), max(1, round(keep_w))
        scale_x, scale_y, offset_x, offset_y = out_w / keep_w, out_h / keep_h, 0.0, 0.0
    else:
        out_h, out_w = size
        if mode == "resize":
            scale_x, scale_y, offset_x, offset_y = out_w / keep_w, out_h / keep_h, 0.0, 0.0
        else:
            scale_x = scale_y = min(out_h / keep_h, out_w / keep_w)
            offset_x, offset_y = (out_w - keep_w * scale_x) / 2, (out_h - keep_h * scale_y) / 2
    # output (x, y) -> window -> expanded canvas, centred -> turned back by the angle -> source
    cx = left - rot_w / 2 - offset_x / scale_x
    cy = top - rot_h / 2 - offset_y / scale_y
    matrix = [cos / scale_x, sin / scale_y, cos * cx + sin * cy + w / 2,
              -sin / scale_x, cos / scale_y, -sin * cx + cos * cy + h / 2]
    if matrix == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0] and (out_w, out_h) == (w, h):
        return image
    reduce = max(1, math.floor(min(scale_x, scale_y) ** -1 + 1e-6))  # antialias a downscale first
    if reduce > 1:
        image = image.reduce(reduce)
        matrix = [m / reduce for m in matrix]
    return image.transform((out_w, out_h), Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR,
                           fillcolor=tuple(fill))


def _colour_jitter(image: Image.Image, generator: torch.Generator | None, config: AugmentConfig) -> Image.Image:
    for enhancer, strength in ((ImageEnhance.Brightness, config.brightness),
                               (ImageEnhance.Contrast, config.contrast),
                               (ImageEnhance.Color, config.saturation)):
        factor = _uniform(generator, 1.0 - strength, 1.0 + strength)  # drawn even when 1: same stream
        if factor != 1.0:
            image = enhancer(image).enhance(factor)
    return image


def _jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def preprocess(image: Image.Image, preprocessing: ImagePreprocessing, augment: AugmentConfig | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Full pipeline for one RGB image: optional augmentation, resize/pad, normalise.

    Args:
        image: a PIL image, normally from `data.images.open_image`; other modes are converted.
        preprocessing: the encoder's size, mean, std, resize mode and pad value.
        augment: augmentation strengths for training; None (inference, evaluation) for none.
        generator: random source for the augmentation.

    Returns:
        FloatTensor (3, H, W) with (H, W) = `preprocessing.size`.
    """
    image = to_rgb(image)  # a no-op for open_image's output; callers may pass any PIL image
    if augment is not None:
        image = augment_image(image, generator, augment, preprocessing.pad_value, preprocessing.size,
                              preprocessing.resize)
    else:
        image = resize_image(image, preprocessing.size, preprocessing.resize, preprocessing.pad_value)
    return to_tensor(image, preprocessing.mean, preprocessing.std)
