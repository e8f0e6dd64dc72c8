"""Safe image opening: bad files are refused with the file and the reason, every mode becomes RGB."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, fitted_size, open_image, to_rgb
from data.transforms import resize_image, to_tensor


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


# ------------------------------------------------------------------------------------ fast decode
def _photo(tmp_path: Path, size: tuple[int, int], orientation: int = 1, name: str = "photo.jpg") -> Path:
    """A JPEG of `size` = (width, height) as stored: four coloured quadrants, so turns and crops show."""
    width, height = size
    image = Image.new("RGB", size, (230, 30, 30))
    image.paste((30, 30, 230), (width // 2, 0, width, height // 2))
    image.paste((30, 200, 30), (0, height // 2, width // 2, height))
    image.paste((240, 240, 240), (width // 2, height // 2, width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / name
    image.save(path, exif=exif, quality=92)
    return path


def test_a_large_jpeg_decodes_at_the_smallest_scale_that_covers_the_target(tmp_path: Path) -> None:
    path = _photo(tmp_path, (1800, 1200))
    assert open_image(path).size == (1800, 1200)  # no target: full size, as before
    # pad into 224 x 224 needs 224 x 149 of it: 1/8 (225 x 150) covers that
    assert open_image(path, target_size=(224, 224)).size == (225, 150)
    assert fitted_size((1200, 1800), (224, 224)) == (149, 224)
    # stretching into 224 x 224 needs both sides >= 224: 1/4 (450 x 300), 1/8 would give 150 rows
    assert open_image(path, target_size=(224, 224), resize="resize").size == (450, 300)
    # a target larger than half the image: no reduction
    assert open_image(path, target_size=(700, 1000)).size == (1800, 1200)


def test_draft_sizes_follow_the_exif_orientation(tmp_path: Path) -> None:
    # stored 1800 x 1200, orientation 6: upright it is 1200 wide and 1800 tall. Fitted into 448 x 224
    # (height x width) it needs 224 x 336 upright: 1/4 (300 x 450). Sizing the draft on the stored
    # orientation would pick 1/8 (150 x 225 upright), narrower than the 224 columns the target needs.
    path = _photo(tmp_path, (1800, 1200), orientation=6)
    upright = open_image(path, target_size=(448, 224))
    assert upright.size == (300, 450)
    full = open_image(path).resize(upright.size, Image.Resampling.BOX)
    assert full.size == (300, 450) and open_image(path).size == (1200, 1800)
    for xy in [(75, 110), (225, 110), (75, 340), (225, 340)]:  # quadrant centres land in the same places
        assert max(abs(a - b) for a, b in zip(upright.getpixel(xy), full.getpixel(xy))) < 12, xy


def test_drafted_pixels_match_a_full_decode_after_preprocessing(tmp_path: Path) -> None:
    path = tmp_path / "noisy.jpg"
    Image.effect_noise((1600, 1200), 40).convert("RGB").resize((1600, 1200)).save(path, quality=90)
    _photo(tmp_path, (1600, 1200), name="blocks.jpg")
    for name in ("noisy.jpg", "blocks.jpg"):
        full = to_tensor(resize_image(open_image(tmp_path / name), (224, 224)), (0.5,) * 3, (0.5,) * 3)
        fast = to_tensor(resize_image(open_image(tmp_path / name, target_size=(224, 224)), (224, 224)),
                         (0.5,) * 3, (0.5,) * 3)
        assert fast.shape == full.shape == (3, 224, 224)
        assert (fast - full).abs().mean() < 0.03, name  # values span [-1, 1]


def test_png_and_small_jpegs_are_decoded_as_before(tmp_path: Path) -> None:
    _noise_image((900, 900)).save(tmp_path / "big.png")
    small = _photo(tmp_path, (300, 200))
    assert open_image(tmp_path / "big.png", target_size=(224, 224)).size == (900, 900)
    assert open_image(small, target_size=(224, 224)).tobytes() == open_image(small).tobytes()
