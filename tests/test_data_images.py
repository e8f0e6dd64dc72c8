"""Safe image opening: bad files are refused with the file and the reason, every mode becomes RGB."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, open_image, to_rgb


def _noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Random RGB pixels, so compressed files have data all the way to the end."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.frombytes("RGB", size, data.numpy().tobytes())


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _refusal(path: Path, **kwargs) -> BadImageError:
    with pytest.raises(BadImageError) as info:
        open_image(path, **kwargs)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    return info.value


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty file" in _refusal(path).reason


def test_missing_file_is_refused(tmp_path: Path) -> None:
    assert "not found" in _refusal(tmp_path / "nowhere.png").reason


def test_non_image_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"this is a shopping list, not a picture\n" * 20)
    assert "not an image" in _refusal(path).reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_refused(tmp_path: Path, fmt: str) -> None:
    data = _encoded(_noise_image((96, 96)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    reason = _refusal(path).reason
    assert "truncated" in reason or "corrupt" in reason


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (3000, 2000)).save(path)  # compresses to a few kB, decodes to 6 MP
    assert path.stat().st_size < 50_000
    reason = _refusal(path, max_image_pixels=1_000_000).reason
    assert "decompression bomb" in reason and "3000x2000" in reason
    assert open_image(path, max_image_pixels=6_000_000).size == (3000, 2000)


def test_pixel_limit_is_a_parameter_not_a_global(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "small.png"
    Image.new("RGB", (10, 10)).save(path)
    assert "decompression bomb" in _refusal(path, max_image_pixels=50).reason
    assert open_image(path, max_image_pixels=100).size == (10, 10)
    assert Image.MAX_IMAGE_PIXELS == before
    assert DEFAULT_MAX_IMAGE_PIXELS < 2 * before  # inside Pillow's own ceiling, so ours decides


def test_error_pickles_with_its_fields() -> None:
    import pickle
    error = pickle.loads(pickle.dumps(BadImageError("a/b.jpg", "empty file")))
    assert (error.path, error.reason, str(error)) == ("a/b.jpg", "empty file", "a/b.jpg: empty file")


# Each case: (mode, a 2x1 image builder, file format, expected RGB of the two pixels).
def _two_pixels(mode: str, values: list) -> Image.Image:
    image = Image.new(mode, (2, 1))
    image.putdata(values)
    return image


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putdata([0, 1])
    image.info["transparency"] = 1
    return image


MODE_CASES = {
    "1": (lambda: _two_pixels("1", [0, 255]), "PNG", [(0, 0, 0), (255, 255, 255)]),
    "L": (lambda: _two_pixels("L", [10, 200]), "PNG", [(10, 10, 10), (200, 200, 200)]),
    "P": (_palette_with_transparency, "PNG", [(255, 0, 0), (255, 255, 255)]),
    "RGBA": (lambda: _two_pixels("RGBA", [(0, 0, 255, 255), (0, 0, 255, 0)]), "PNG",
             [(0, 0, 255), (255, 255, 255)]),
    "LA": (lambda: _two_pixels("LA", [(0, 255), (0, 0)]), "PNG", [(0, 0, 0), (255, 255, 255)]),
    "CMYK": (lambda: _two_pixels("CMYK", [(0, 0, 0, 0), (0, 0, 0, 255)]), "TIFF", [(255, 255, 255), (0, 0, 0)]),
    "I;16": (lambda: _two_pixels("I;16", [0, 65535]), "PNG", [(0, 0, 0), (255, 255, 255)]),
    "I": (lambda: _two_pixels("I", [256 * 100, 65535]), "TIFF", [(100, 100, 100), (255, 255, 255)]),
    "F": (lambda: _two_pixels("F", [0.0, 1.0]), "TIFF", [(0, 0, 0), (255, 255, 255)]),
}


@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_every_mode_becomes_rgb_from_a_file(tmp_path: Path, mode: str) -> None:
    build, fmt, expected = MODE_CASES[mode]
    path = tmp_path / f"img.{fmt.lower()}"
    build().save(path, format=fmt)
    with Image.open(path) as stored:
        assert stored.mode.startswith(mode[0])  # the file really holds that kind of data
    image = open_image(path)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(2)] == expected


def test_16_bit_mid_grey_is_scaled_not_clipped() -> None:
    assert to_rgb(_two_pixels("I;16", [32768, 1024])).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer must turn it 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=95)
    upright = open_image(path)
    assert upright.size == (20, 40)
    red_top = upright.getpixel((10, 5))
    blue_bottom = upright.getpixel((10, 35))
    assert red_top[0] > 200 and red_top[2] < 60
    assert blue_bottom[2] > 200 and blue_bottom[0] < 60
