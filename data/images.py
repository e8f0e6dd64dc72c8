"""Safe image opening: every file becomes an RGB `PIL.Image`, or a `BadImageError` that says why.

Public API:
    BadImageError(path, reason)             -- `str(err)` is "PATH: reason"; `.path`, `.reason`.
    DEFAULT_MAX_IMAGE_PIXELS: int           -- default pixel limit (config key `data.max_image_pixels`).
    open_image(path, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, target_size=None, resize="pad")
        -> PIL.Image.Image  (mode "RGB")
    fitted_size(size, box, resize="pad") -> (height, width)
    to_rgb(image, background=(255, 255, 255)) -> PIL.Image.Image

`open_image` applies the EXIF orientation, converts every PIL mode (1, L, P, RGBA, LA, PA, CMYK,
I;16, I, F, YCbCr, ...) to RGB with transparency composited on `background`, and refuses empty,
truncated, non-image and oversized ("decompression bomb") files. The pixel limit is a parameter:
nothing here changes `PIL.Image.MAX_IMAGE_PIXELS`. Pillow's own global check still runs inside
`Image.open` (it errors above twice its global limit, about 179 MP by default), so a
`max_image_pixels` above that ceiling also needs the application to raise the global itself.

Fast decode: given the `target_size` the image will be scaled into, a JPEG is decoded by libjpeg's
DCT scaling at 1/2, 1/4 or 1/8 of its size (PIL's draft mode), the smallest scale whose upright size
still covers what `target_size` takes of it, so the final resize only ever shrinks. A 12 MP phone
photo headed for 448 px is decoded at 1/4 or 1/8 instead of at full size and then shrunk.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# 64 MP: above any document scan or phone photo in normal use (a 64 MP RGB bitmap is ~190 MB),
# far below what exhausts memory in a data-loader worker.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

WHITE = (255, 255, 255)
RESIZE_MODES = ("pad", "resize")
# EXIF orientations whose upright image is the stored one turned by 90 degrees (width and height swap).
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class BadImageError(ValueError):
    """An image file that cannot be used, with the file and the reason.

    Attributes:
        path: the file as given.
        reason: a short human-readable cause ("empty file", "truncated or corrupt: ...", ...).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep both fields when sent back from a data-loader worker
        return (type(self), (self.path, self.reason))


def open_image(path: str | os.PathLike[str], max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               target_size: tuple[int, int] | None = None, resize: str = "pad") -> Image.Image:
    """Open, fully decode, EXIF-orient and convert an image file to RGB.

    Args:
        path: image file.
        max_image_pixels: refuse images with more than this many pixels (checked from the header,
            before decoding, on the full stored size).
        target_size: (height, width) the caller will scale the upright image into; a JPEG is then
            decoded at the smallest DCT scale that still covers `fitted_size(..., target_size, resize)`.
            None decodes at full size.
        resize: how the caller scales into `target_size`, as in `data.transforms.resize_image`.

    Returns:
        A loaded image in mode "RGB", upright according to its EXIF orientation; with `target_size`,
        possibly 1/2, 1/4 or 1/8 of the stored size, never smaller than what the target needs.

    Raises:
        BadImageError: missing, empty, not an image, truncated/corrupt, too large, or an
            unconvertible mode; the message names the file.
    """
    path = Path(path)
    _check_file(path)
    image = _decode(path, max_image_pixels, target_size, resize)
    image = _exif_upright(image)
    try:
        return to_rgb(image)
    except ValueError as exc:
        raise BadImageError(path, f"cannot convert mode {image.mode!r} to RGB ({exc})") from exc


def _check_file(path: Path) -> None:
    """Refuse paths that are not non-empty regular files, with a precise reason."""
    if not path.exists():
        raise BadImageError(path, "file not found")
    if not path.is_file():
        raise BadImageError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file")


def _decode(path: Path, max_image_pixels: int, target_size: tuple[int, int] | None = None,
            resize: str = "pad") -> Image.Image:
    """Read the header, check the size, then decode every pixel (so truncation shows up here)."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, f"decompression bomb refused ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(path, "not an image (unrecognised or corrupt header)") from exc
    except Exception as exc:  # noqa: BLE001 -- any failure parsing untrusted bytes means a bad file
        raise BadImageError(path, f"unreadable image header ({type(exc).__name__}: {exc})") from exc
    width, height = image.size
    if width * height > max_image_pixels:
        image.close()
        raise BadImageError(path, f"decompression bomb refused: {width}x{height} = {width * height} pixels "
                                  f"exceeds max_image_pixels={max_image_pixels}")
    if width == 0 or height == 0:
        image.close()
        raise BadImageError(path, f"zero-sized image ({width}x{height})")
    try:
        if target_size is not None:
            image.draft(None, _draft_request(image, target_size, resize))  # a no-op for formats but JPEG
        image.load()
    except Exception as exc:  # noqa: BLE001 -- decoders raise OSError, ValueError, struct.error, ...
        image.close()
        raise BadImageError(path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc
    return image


def fitted_size(size: tuple[int, int], box: tuple[int, int], resize: str = "pad") -> tuple[int, int]:
    """(height, width) an image of `size` = (height, width) takes once scaled into `box` = (height, width).

    "pad" fits it inside the box keeping the aspect ratio (the rest is padding), "resize" stretches it
    to the box.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {resize!r}")
    if resize == "resize":
        return box
    scale = min(box[0] / size[0], box[1] / size[1])
    return max(1, min(box[0], round(size[0] * scale))), max(1, min(box[1], round(size[1] * scale)))


def _draft_request(image: Image.Image, target_size: tuple[int, int], resize: str) -> tuple[int, int]:
    """The (width, height) in the *stored* orientation that PIL's draft must keep both sides >= to.

    `target_size` is about the upright image, so an EXIF quarter turn swaps the sides twice: once to
    get the upright size, once to bring the needed size back to the stored orientation.
    """
    width, height = image.size
    turned = _exif_orientation(image) in TRANSPOSING_ORIENTATIONS
    need_h, need_w = fitted_size((width, height) if turned else (height, width), target_size, resize)
    return (need_h, need_w) if turned else (need_w, need_h)


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored); a broken EXIF block reads as 1, as `_exif_upright` treats it."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return 1


def _exif_upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        # The pixels are fine and orientation is a hint: better a sideways image than none.
        return image


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to RGB.

    Transparency (RGBA, LA, PA, P or L/RGB with a transparency key) is composited on `background`
    rather than dropped, because dropped alpha often reveals black or garbage pixels. High bit-depth
    modes are rescaled, not clipped: 16-bit data (I;16*, or I with values above 255) is divided by
    256, float (F) data in [0, 1] is scaled by 255.

    Raises:
        ValueError: a mode Pillow cannot convert to RGB.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_l(image).convert("RGB")
    if image.mode == "CMYK":
        return image.convert("RGB")
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Map integer (16/32-bit) or float greyscale to 8-bit L."""
    if image.mode == "F":
        low, high = image.getextrema()
        scale = 255.0 if 0.0 <= low and high <= 1.0 else 1.0
        return image.point(lambda v: v * scale).convert("L")  # convert clips to 0..255
    wide = image if image.mode == "I" else image.convert("I")
    low, high = wide.getextrema()
    scale = 1 / 256 if image.mode.startswith("I;16") or high > 255 else 1.0
    return wide.point(lambda v: v * scale).convert("L")
