"""ReceiptCounter: loading an exported folder safely, inputs of every kind, per-item errors, batching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from PIL import Image

import models.inference as inference
import models.internvl2 as internvl2
import models.language as language
from data.dataset import load_pixel_values
from models.build import build_model
from models.inference import ReceiptCounter, cpu_threads_beside, resolve_device
from tests.conftest import make_config


def export_tiny_model(tiny: dict[str, Path], out: Path, **save: Any) -> Path:
    """A tiny swin receipt counter with its fusion gates opened, saved with `save_pretrained(out, **save)`.

    Zero-init gates would hide the image from the head, making every image look alike; opened gates
    let the tests see that answers really depend on the pixels.
    """
    model = build_model(make_config(tiny, "swin").model).eval()
    with torch.no_grad():
        for block in model.fusion.blocks:
            block.attn_gate.alpha.fill_(1.0)
            block.mlp_gate.alpha.fill_(1.0)
    return model.save_pretrained(out, **save)


def draw_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A deterministic picture with a few coloured blocks (different seeds give different images)."""
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height), (250, 250, 245))
    for _ in range(6):
        x0, y0 = int(torch.randint(0, width - 8, (), generator=g)), int(torch.randint(0, height - 8, (), generator=g))
        colour = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g))
        image.paste(colour, (x0, y0, min(width, x0 + width // 3), min(height, y0 + height // 3)))
    return image.convert(mode)


@pytest.fixture(scope="module")
def export(tiny_checkpoints, tmp_path_factory) -> Path:
    return export_tiny_model(tiny_checkpoints, tmp_path_factory.mktemp("inference") / "export")


@pytest.fixture(scope="module")
def counter(export) -> ReceiptCounter:
    return ReceiptCounter.from_pretrained(export)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """Good images of mixed sizes and modes (tall receipt, landscape, grey, palette, RGBA)."""
    root = tmp_path_factory.mktemp("images")
    specs = [(300, 500, "RGB", "jpg"), (640, 480, "RGB", "png"), (120, 900, "L", "png"), (224, 224, "P", "png"),
             (500, 300, "RGBA", "png"), (401, 333, "RGB", "jpg")]
    paths = []
    for i, (w, h, mode, ext) in enumerate(specs):
        paths.append(root / f"img{i}_{mode}.{ext}")
        draw_image(w, h, seed=i, mode=mode).save(paths[-1])
    return paths


def probs(prediction) -> torch.Tensor:
    return torch.tensor(list(prediction.probabilities.values()))


def test_prediction_fields(counter, files):
    out = counter.predict([files[0]])
    assert len(out) == 1 and out[0].ok and out[0].image == str(files[0])
    p = out[0]
    assert list(p.probabilities) == counter.class_names == ["0", "1", "2+"]
    assert abs(sum(p.probabilities.values()) - 1.0) < 1e-5
    assert p.class_index == int(probs(p).argmax()) and p.label == counter.class_names[p.class_index]
    assert p.to_row() == {"image": str(files[0]), "label": p.label, "class_index": p.class_index,
                          "probabilities": p.probabilities, "uncertain": p.uncertain}
    assert p.uncertain == (max(p.probabilities.values()) < counter.uncertain_below) and len(p.logits) == 3


def test_paths_pil_images_and_tensors_give_the_same_answer(counter, files):
    path = files[1]
    pixels = load_pixel_values(path, counter.model.preprocessing)
    with Image.open(path) as pil:
        out = counter.predict([path, pil, pixels, pixels.unsqueeze(0)[0]])
    assert [p.image for p in out] == [str(path), None, None, None]
    for p in out[1:]:
        torch.testing.assert_close(probs(p), probs(out[0]), atol=1e-6, rtol=0)
    # a single input and a (B, 3, H, W) batch tensor are accepted as they are
    assert len(counter.predict(path)) == 1 and len(counter.predict(pixels.unsqueeze(0).repeat(2, 1, 1, 1))) == 2


def test_batching_does_not_change_answers(counter, files):
    inputs = [*files, *files[:2]]  # mixed sizes and modes in one batch, repeats across batches
    one = torch.stack([probs(p) for p in counter.predict(inputs, batch_size=1)])
    for batch_size in (3, 32):
        batched = torch.stack([probs(p) for p in counter.predict(inputs, batch_size=batch_size)])
        assert (batched - one).abs().max() < 1e-5, f"batch_size={batch_size} changed the probabilities"
    # the check means something only if different images get different answers
    assert (one[0] - one[1]).abs().max() > 1e-4


def test_bad_inputs_get_error_rows_and_the_batch_goes_on(counter, files, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(files[0].read_bytes()[:-200])  # header intact, data cut
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 81 MP: above the 64 MP default limit
    inputs = [files[0], tmp_path / "missing.jpg", tmp_path / "empty.jpg", tmp_path / "text.png",
              tmp_path / "cut.jpg", tmp_path / "bomb.png", torch.zeros(3, 10, 10), 42, files[1]]
    out = counter.predict(inputs, batch_size=4)
    reasons = [p.error for p in out]
    assert reasons[0] is None and reasons[-1] is None
    for reason, expected in zip(reasons[1:-1], ["file not found", "empty file", "not an image", "truncated",
                                                "decompression bomb", "tensor of shape (3, 10, 10)",
                                                "unsupported input type int"]):
        assert reason is not None and expected in reason
    assert out[1].to_row() == {"image": str(tmp_path / "missing.jpg"), "error": "file not found"}
    alone = counter.predict([files[0], files[1]])
    torch.testing.assert_close(probs(out[0]), probs(alone[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(probs(out[-1]), probs(alone[1]), atol=1e-5, rtol=0)


def test_exif_orientation_and_modes_go_through_the_shared_loader(counter, tmp_path):
    upright = draw_image(200, 420, seed=7)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a camera stores a rotated shot
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "rotated.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    upright.convert("I").point(lambda v: v * 256).convert("I;16").save(tmp_path / "wide16.png")  # 16-bit grey
    out = counter.predict([tmp_path / "rotated.png", tmp_path / "upright.png", tmp_path / "wide16.png"])
    assert all(p.ok for p in out), [p.error for p in out]
    torch.testing.assert_close(probs(out[0]), probs(out[1]), atol=1e-6, rtol=0)


def test_from_model_matches_from_pretrained(export, counter, files):
    in_memory = ReceiptCounter.from_model(internvl2.InternVL2MultimodalModel.from_pretrained(export))
    assert not in_memory.model.training and in_memory.encoder == counter.encoder == "swin"
    torch.testing.assert_close(probs(in_memory.predict(files[2])[0]), probs(counter.predict(files[2])[0]))


def test_loading_reads_each_file_once_and_never_again(export, files, monkeypatch):
    calls: dict[str, int] = {}

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    counting(internvl2, "read_export_config")
    counting(inference, "read_export_config")  # the settings (temperature, threshold) come from the same read
    counting(internvl2, "load_tokenizer")
    counting(safetensors.torch, "load_model")
    loaded = ReceiptCounter.from_pretrained(export)
    assert calls == {"read_export_config": 1, "load_tokenizer": 1, "load_model": 1}
    loaded.predict(files[:2], batch_size=1)
    assert calls == {"read_export_config": 1, "load_tokenizer": 1, "load_model": 1}


def test_pickle_weights_are_never_loaded(export, tmp_path, monkeypatch):
    folder = tmp_path / "pickle_only"
    folder.mkdir()
    for f in export.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    model = ReceiptCounter.from_pretrained(export).model
    torch.save(model.state_dict(), folder / "pytorch_model.bin")

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", no_pickle)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        ReceiptCounter.from_pretrained(folder)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer_config.json"])
def test_incomplete_folder_names_the_missing_file(export, tmp_path, missing):
    folder = tmp_path / "export"
    folder.mkdir()
    for f in export.iterdir():
        if f.name != missing:
            (folder / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        ReceiptCounter.from_pretrained(folder)


def test_mismatched_files_fail_naming_the_file(export, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    for f in export.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["model"]["num_classes"], config["model"]["class_names"] = 4, ["0", "1", "2", "3+"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match .*config\.json"):
        ReceiptCounter.from_pretrained(folder)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        ReceiptCounter.from_pretrained(folder)


def test_remote_code_stays_off(export, monkeypatch):
    seen = []
    original = language.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)
    monkeypatch.setattr(language.AutoTokenizer, "from_pretrained", spy)
    ReceiptCounter.from_pretrained(export)
    assert seen == [False]


def test_device_and_batch_size_are_checked(counter):
    with pytest.raises(ValueError, match="num_workers"):
        counter.predict([], num_workers=-1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        counter.predict([], batch_size=0)
    assert counter.predict([]) == []


def test_worker_processes_give_the_same_rows_in_input_order(counter, files, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    inputs = [files[0], tmp_path / "empty.jpg", *files[1:], torch.zeros(3, 10, 10), files[2], tmp_path / "gone.png"]
    here = counter.predict(inputs, batch_size=3)
    workers = counter.predict(inputs, batch_size=3, num_workers=2)
    assert [p.to_row() for p in workers] == [p.to_row() for p in here]
    assert [p.image for p in workers] == [str(i) if isinstance(i, Path) else None for i in inputs]
    assert [p.ok for p in workers].count(False) == 3


def test_results_stream_before_later_inputs_are_decoded(counter, files, tmp_path):
    late = tmp_path / "late.png"  # does not exist when prediction starts
    stream = counter.iter_predict([files[0], files[1], late], batch_size=2)
    first = [next(stream), next(stream)]
    draw_image(64, 64, seed=9).save(late)  # written after the first batch came back
    assert all(p.ok for p in first) and next(stream).ok and next(stream, None) is None


def test_the_model_gets_the_cores_the_workers_leave():
    cores = cpu_threads_beside(0)
    assert cores >= 1 and cpu_threads_beside(1) == max(1, cores - 1) and cpu_threads_beside(cores + 5) == 1


def test_a_bfloat16_export_is_half_the_size_and_predicts_like_the_float32_one(tiny_checkpoints, export, files,
                                                                                tmp_path):
    model = internvl2.InternVL2MultimodalModel.from_pretrained(export)
    half = model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((export / "config.json").read_text())["dtype"] == "float32"
    ratio = (half / "model.safetensors").stat().st_size / (export / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.51  # every floating tensor in 2 bytes instead of 4, plus the header
    widened = internvl2.InternVL2MultimodalModel.from_pretrained(half)  # float32 by default, widened exactly
    assert {p.dtype for p in widened.parameters()} == {torch.float32}
    for name, value in widened.state_dict().items():
        assert torch.equal(value, model.state_dict()[name].to(torch.bfloat16).float()), name
    want = [p.probabilities for p in ReceiptCounter.from_pretrained(export).predict(files)]
    # Tolerance: bfloat16 keeps 8 significant bits per weight (relative rounding <= 2^-9). On this tiny model the
    # probabilities moved by at most 1.6e-3 (bfloat16 weights, float32 arithmetic) and 2.6e-3 (bfloat16
    # arithmetic too) on 8 drawn images; the bounds leave a few times that.
    for dtype, tolerance in ((torch.float32, 0.01), ("auto", 0.02)):
        counter = ReceiptCounter.from_pretrained(half, dtype=dtype)
        assert counter.dtype == (torch.float32 if dtype == torch.float32 else torch.bfloat16)
        got = [p.probabilities for p in counter.predict(files)]
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            assert max(abs(g[k] - w[k]) for k in w) < tolerance, (dtype, g, w)
