"""Preprocessing built from an encoder's ImagePreprocessing, and deterministic augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_transforms import normalize
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension

from data.transforms import AugmentConfig, augment_image, preprocess, resize_image, to_tensor
from data.preprocessing import ImagePreprocessing


def _tall_receipt() -> Image.Image:
    """A black 50x200 strip: aspect ratio 1:4, like a long receipt."""
    return Image.new("RGB", (50, 200), (0, 0, 0))


def _busy_image(seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (60, 80, 3), generator=generator, dtype=torch.uint8)
    return Image.frombytes("RGB", (80, 60), data.numpy().tobytes())


def test_pad_keeps_a_tall_image_unsquashed() -> None:
    out = resize_image(_tall_receipt(), (224, 224), mode="pad", pad_value=(255, 255, 255))
    assert out.size == (224, 224)
    dark_columns = [x for x in range(224) if out.getpixel((x, 112))[0] < 128]
    # 1:4 strip scaled to 224 tall is 56 wide, centred: columns 84..139
    assert len(dark_columns) == 56 and dark_columns[0] == 84
    assert out.getpixel((10, 112)) == (255, 255, 255) and out.getpixel((213, 112)) == (255, 255, 255)


def test_plain_resize_stretches() -> None:
    out = resize_image(_tall_receipt(), (224, 224), mode="resize")
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_non_square_target_size_and_pad_colour() -> None:
    prep = ImagePreprocessing(size=(192, 320), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pad_value=(0, 0, 0))
    pixels = preprocess(Image.new("RGB", (100, 100), (255, 255, 255)), prep)
    assert pixels.shape == (3, 192, 320)
    assert torch.allclose(pixels[:, :, 160], torch.ones(3, 192))   # the white square, centred
    assert torch.allclose(pixels[:, :, 10], -torch.ones(3, 192))   # black padding on the sides


def test_unknown_resize_mode() -> None:
    with pytest.raises(ValueError, match="resize mode"):
        resize_image(_tall_receipt(), (32, 32), mode="crop")


def test_normalisation_matches_transformers_convention() -> None:
    image = _busy_image()
    ours = to_tensor(image, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    array = np.asarray(image, dtype=np.float32) / 255.0  # do_rescale
    theirs = normalize(array, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, data_format=ChannelDimension.FIRST,
                       input_data_format=ChannelDimension.LAST)
    assert ours.dtype == torch.float32 and ours.shape == (3, 60, 80)
    assert torch.allclose(ours, torch.from_numpy(np.ascontiguousarray(theirs)), atol=1e-5)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augmentation_is_deterministic_for_a_generator_seed() -> None:
    prep = ImagePreprocessing(size=(64, 96), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    strong = AugmentConfig(blur_prob=1.0, jpeg_prob=1.0)
    first = preprocess(_busy_image(), prep, strong, _generator(7))
    again = preprocess(_busy_image(), prep, strong, _generator(7))
    other = preprocess(_busy_image(), prep, strong, _generator(8))
    plain = preprocess(_busy_image(), prep)
    assert first.shape == (3, 64, 96)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, plain)


def test_augmentation_stays_mild_enough_to_keep_the_count() -> None:
    """A receipt in the middle of the frame survives rotation and crop at full strength."""
    scene = Image.new("RGB", (200, 200), (40, 40, 40))
    scene.paste((255, 255, 255), (90, 40, 110, 160))
    config = AugmentConfig(max_rotation=5.0, min_crop=0.9, blur_prob=0.0, jpeg_prob=0.0)
    for seed in range(10):
        out = augment_image(scene, _generator(seed), config)
        bright = sum(out.convert("L").histogram()[129:])  # jitter keeps paper above mid-grey
        assert bright > 0.7 * 20 * 120


def test_preprocess_accepts_any_pil_mode() -> None:
    prep = ImagePreprocessing(size=(16, 16), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    transparent = Image.new("LA", (8, 8), (0, 0))
    assert torch.allclose(preprocess(transparent, prep), torch.ones(3, 16, 16))  # composited on white


@pytest.mark.parametrize("flip, transpose", [("hflip_prob", Image.Transpose.FLIP_LEFT_RIGHT),
                                             ("vflip_prob", Image.Transpose.FLIP_TOP_BOTTOM),
                                             ("rot90_prob", Image.Transpose.ROTATE_90)])
def test_flips_mirror_the_image(flip: str, transpose: Image.Transpose) -> None:
    image = Image.new("RGB", (40, 30), (255, 255, 255))
    image.paste((200, 0, 0), (0, 0, 10, 5))  # a mark in one corner
    only_flip = AugmentConfig(max_rotation=0.0, min_crop=1.0, brightness=0.0, contrast=0.0, saturation=0.0,
                              blur_prob=0.0, jpeg_prob=0.0, hflip_prob=0.0, vflip_prob=0.0, rot90_prob=0.0)
    flipped = augment_image(image, torch.Generator().manual_seed(0),
                            AugmentConfig(**{**only_flip.__dict__, flip: 1.0}))
    assert flipped.tobytes() == image.transpose(transpose).tobytes()
    assert augment_image(image, torch.Generator().manual_seed(0), only_flip).tobytes() == image.tobytes()


_GEOMETRY_ONLY = AugmentConfig(max_rotation=0.0, min_crop=1.0, brightness=0.0, contrast=0.0, saturation=0.0,
                               blur_prob=0.0, jpeg_prob=0.0, hflip_prob=0.0, vflip_prob=0.0, rot90_prob=0.0)


@pytest.mark.parametrize("size, mode", [((224, 224), "pad"), ((96, 160), "pad"), ((100, 70), "resize")])
def test_augmentation_resamples_straight_to_the_encoder_size(size: tuple[int, int], mode: str) -> None:
    """With no rotation or crop, the one-pass geometry (reduce + bilinear affine) gives what
    resize_image gives, up to the resampling filter."""
    source = _busy_image().crop((0, 0, 8, 6)).resize((400, 300), Image.Resampling.NEAREST)  # 50x50 blocks
    out = augment_image(source, _generator(0), _GEOMETRY_ONLY, size=size, mode=mode)
    assert out.size == (size[1], size[0])
    reference = to_tensor(resize_image(source, size, mode), (0, 0, 0), (1, 1, 1))
    difference = (to_tensor(out, (0, 0, 0), (1, 1, 1)) - reference).abs()
    one_pixel_off = (reference - torch.roll(reference, 1, dims=2)).abs()
    assert difference.mean() < 0.5 * one_pixel_off.mean(), (difference.mean(), one_pixel_off.mean())


def test_augmentation_pads_a_tall_receipt_like_resize_image() -> None:
    out = augment_image(_tall_receipt(), _generator(0), _GEOMETRY_ONLY, fill=(255, 255, 255), size=(224, 224))
    dark_columns = [x for x in range(224) if out.getpixel((x, 112))[0] < 128]
    assert 55 <= len(dark_columns) <= 57 and 83 <= dark_columns[0] <= 85
    assert out.getpixel((10, 112)) == (255, 255, 255) and out.getpixel((213, 112)) == (255, 255, 255)


def test_rotation_fills_the_uncovered_corners() -> None:
    turned = AugmentConfig(**{**_GEOMETRY_ONLY.__dict__, "max_rotation": 30.0})
    black = Image.new("RGB", (120, 120), (0, 0, 0))
    outs = [augment_image(black, _generator(seed), turned, fill=(255, 0, 0), size=(64, 64)) for seed in range(4)]
    assert any(out.getpixel((0, 0)) == (255, 0, 0) for out in outs)  # a corner outside the turned square
    assert all(out.getpixel((32, 32)) == (0, 0, 0) for out in outs)  # the centre stays image


def test_colour_jitter_off_skips_the_work_but_keeps_the_random_stream() -> None:
    image = _busy_image()
    jitter = AugmentConfig(**{**_GEOMETRY_ONLY.__dict__, "brightness": 0.25, "contrast": 0.25, "saturation": 0.25})
    with_jitter, without = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert augment_image(image, with_jitter, jitter).tobytes() != image.tobytes()
    assert augment_image(image, without, _GEOMETRY_ONLY).tobytes() == image.tobytes()
    # Same number of draws either way, so turning colour off does not reshuffle the other augmentations.
    assert torch.equal(with_jitter.get_state(), without.get_state())
