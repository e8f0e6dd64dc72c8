"""Original OpenGVLab InternVL folders: told apart by config.json, read leanly, trained through every stage.

The math against OpenGVLab's (image tokens, LLM states) is in tests/test_original_layout.py; this file
checks what is read, what is refused, and that such a folder works as users run it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import sentencepiece
import torch
import transformers.modeling_utils

import models.internvl_checkpoint as internvl_checkpoint
from config import load_config
from models.build import build_model
from models.internvl_checkpoint import InternVLCheckpoint
from models.tiny import write_original_internvl
from tests.conftest import REPO, load_script, tiny_checkpoint
from train.run import main as train_main

predict = load_script("predict")


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("original")
    return {llm: write_original_internvl(root / f"InternVL-{llm}", llm=llm, dtype=torch.float32, image_size=56)
            for llm in ("qwen2", "internlm2")}


class TensorReads:
    """Records every tensor materialised from a safetensors file (transformers' loader and ours)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[str] = []
        real = transformers.modeling_utils.safe_open
        reads = self.keys

        class Slice:
            def __init__(self, inner, key):
                self._inner, self._key = inner, key

            def __getitem__(self, index):
                reads.append(self._key)
                return self._inner[index]

            def __getattr__(self, name):
                return getattr(self._inner, name)

        class Open:
            def __init__(self, *args, **kwargs):
                self._inner = real(*args, **kwargs)

            def get_slice(self, key):
                return Slice(self._inner.get_slice(key), key)

            def get_tensor(self, key):
                reads.append(key)
                return self._inner.get_tensor(key)

            def __getattr__(self, name):
                return getattr(self._inner, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

        monkeypatch.setattr(transformers.modeling_utils, "safe_open", Open)
        monkeypatch.setattr(internvl_checkpoint, "safe_open", Open)

    def prefixes(self) -> set[str]:
        return {".".join(k.split(".")[:2]) for k in self.keys}


def build(folder: Path, encoder: str, tiny: dict[str, Path], *overrides: str):
    vision = [f"model.vision.checkpoint={folder}", "model.vision.image_size=[56, 56]"] if encoder == "internvit" \
        else [f"model.vision.checkpoint={tiny_checkpoint(tiny, encoder)}", "model.vision.image_size=[64, 64]"]
    config = load_config(REPO / "config" / "base.yaml", [f"model.language.checkpoint={folder}",
                                                         f"model.vision.encoder={encoder}", *vision, *overrides])
    return build_model(config.model)


def test_the_layout_comes_from_config_json_never_the_folder_name(original, tiny_checkpoints, tmp_path):
    misnamed_original = shutil.copytree(original["qwen2"], tmp_path / "InternVL2_5-1B-hf")
    misnamed_hf = shutil.copytree(tiny_checkpoints["internvl2"], tmp_path / "InternVL2_5-1B")
    assert InternVLCheckpoint.read(misnamed_original).layout == "original"
    assert InternVLCheckpoint.read(misnamed_hf).layout == "hf"
    assert InternVLCheckpoint.read(original["internlm2"]).config.text_config.model_type == "llama"


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_with_a_swin_encoder_only_the_llm_body_is_read(original, tiny_checkpoints, monkeypatch, llm):
    reads = TensorReads(monkeypatch)
    build(original[llm], "swinv2", tiny_checkpoints)
    from_internvl = {k for k in reads.keys if k.startswith(("vision_model.", "mlp1.", "language_model."))}
    assert from_internvl and all(k.startswith("language_model.model.") for k in from_internvl), sorted(from_internvl)


def test_with_internvit_everything_but_the_lm_head_and_unused_layers_is_read(original, tiny_checkpoints,
                                                                           monkeypatch, tmp_path):
    folder = shutil.copytree(original["qwen2"], tmp_path / "select_layer")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "select_layer": -2}))
    reads = TensorReads(monkeypatch)
    model = build(folder, "internvit", tiny_checkpoints)
    assert reads.prefixes() == {"vision_model.embeddings", "vision_model.encoder", "mlp1.0", "mlp1.1", "mlp1.3",
                                "language_model.model"}
    last = config["vision_config"]["num_hidden_layers"] - 1
    assert not [k for k in reads.keys if k.startswith(f"vision_model.encoder.layers.{last}.")]
    assert len(model.vision.backbone.encoder.layer) == last  # select_layer -2: the last layer is never built


def test_a_dry_build_reads_config_files_only(original, tiny_checkpoints, tmp_path):
    folder = shutil.copytree(original["qwen2"], tmp_path / "garbage_weights")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    config = load_config(REPO / "config" / "base.yaml", [f"model.language.checkpoint={folder}",
                                                         "model.vision.encoder=internvit",
                                                         f"model.vision.checkpoint={folder}"])
    with torch.device("meta"):
        model = build_model(config.model, load_weights=False)
    assert all(p.is_meta for p in model.parameters())
    reference = build_model(load_config(REPO / "config" / "base.yaml", [
        f"model.language.checkpoint={original['qwen2']}", "model.vision.encoder=internvit",
        f"model.vision.checkpoint={original['qwen2']}"]).model)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}
    with pytest.raises(Exception, match="garbage_weights"):
        build_model(config.model)


def test_transformers_5_rope_parameters_read_like_4x_rope_theta(original, tmp_path):
    folder = shutil.copytree(original["qwen2"], tmp_path / "rope_parameters")
    config = json.loads((folder / "config.json").read_text())
    llm = dict(config["llm_config"])
    theta = llm.pop("rope_theta")
    llm["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    (folder / "config.json").write_text(json.dumps({**config, "llm_config": llm}))
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        old = InternVLCheckpoint.read(original["qwen2"]).language_model()(input_ids=ids).last_hidden_state
        new = InternVLCheckpoint.read(folder).language_model()(input_ids=ids).last_hidden_state
    assert theta != 10000.0  # not transformers' default, so a dropped value would show
    torch.testing.assert_close(new, old, rtol=0, atol=0)


@pytest.mark.parametrize("field, value, message", [
    ("llm_config.model_type", "phi3", "llm_config.model_type 'phi3'"),
    ("vision_config.norm_type", "batch_norm", "norm_type 'batch_norm' is not supported"),
    ("select_layer", [-1, -2], "select_layer"),
])
def test_unsupported_features_are_named(original, tmp_path, field, value, message):
    folder = shutil.copytree(original["qwen2"], tmp_path / "unsupported")
    config = json.loads((folder / "config.json").read_text())
    node, _, key = field.rpartition(".")
    (config[node] if node else config)[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as e:
        InternVLCheckpoint.read(folder)
    assert str(folder) in str(e.value)


def test_a_folder_without_safetensors_is_refused_by_name(original, tmp_path):
    folder = shutil.copytree(original["qwen2"], tmp_path / "pickles_only")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pickles_only has no model\.safetensors"):
        InternVLCheckpoint.read(folder).language_model()


def test_internlm2_tokenizer_equals_its_sentencepiece_model(original, tiny_checkpoints):
    model = build(original["internlm2"], "swinv2", tiny_checkpoints)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(original["internlm2"] / "tokenizer.model"))
    question = model.config.language.question
    ids, _ = model.tokenize([question])
    assert ids[0].tolist() == [processor.bos_id()] + processor.encode(question)


@pytest.mark.parametrize("name, encoder", [("internvl2_5_1b_swin_b", "swin"), ("internvl2_5_1b_vit", "internvit")])
def test_an_original_folder_trains_through_every_stage_and_predicts(original, tiny_checkpoints, receipts, tmp_path,
                                                                    capsys, name, encoder):
    """The shipped Swin-B and ViT configs with an original-layout folder (toy size): all stages, then predict."""
    folder, swin = original["qwen2"], tiny_checkpoint(tiny_checkpoints, "swin")
    vision = [f"model.vision.checkpoint={folder}", "model.vision.image_size=[56, 56]"] if encoder == "internvit" \
        else [f"model.vision.checkpoint={swin}", "model.vision.image_size=[224, 224]"]
    sets = [f"model.language.checkpoint={folder}", *vision, "model.fusion.num_heads=4", "train.mixed_precision=no",
            f"data.train={receipts / 'train'}", f"data.val={receipts / 'val'}", f"data.test={receipts / 'test'}",
            "data.batch_size=4", "data.eval_batch_size=4", f"output_dir={tmp_path / 'run'}",
            *[f"train.stages.{i}.max_steps=1" for i in range(3)]]
    config = str(REPO / "config" / f"{name}.yaml")
    assert train_main(["--config", config] + [a for s in sets for a in ("--set", s)]) == 0
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["encoder"] == encoder
    assert not [m for m in sys.modules if "internvl_chat" in m or "intern_vit" in m]  # no remote code ran
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(final), str(receipts / "test")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 6 and all(row["label"] in ("0", "1", "2+") for row in rows)


def test_split_weights_own_their_memory(original):
    """q/k/v split from one fused tensor must not share its storage: safetensors drops shared tensors."""
    vit = InternVLCheckpoint.read(original["qwen2"]).vision_tower()
    llm = InternVLCheckpoint.read(original["internlm2"]).language_model()
    for attention in [vit.encoder.layer[0].attention, llm.layers[0].self_attn]:
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        storages = {p.weight.untyped_storage().data_ptr() for p in projections}
        assert len(storages) == 3


@pytest.mark.parametrize("name", ["internvl2_5_1b_vit", "internvl2_5_1b_swin_b", "internvl2_5_1b_swinv2_b"])
def test_every_real_model_config_plans_its_stages(original, tiny_checkpoints, name, capsys):
    """The shipped full-size configs, pointed at tiny folders of the same layouts: every stage's groups exist."""
    encoder = load_config(REPO / "config" / f"{name}.yaml").model.vision.encoder
    vision = original["qwen2"] if encoder == "internvit" else tiny_checkpoint(tiny_checkpoints, encoder)
    sets = [f"model.language.checkpoint={original['qwen2']}", f"model.vision.checkpoint={vision}",
            "model.fusion.num_heads=4"]
    assert train_main(["--config", str(REPO / "config" / f"{name}.yaml"), "--dry-run"]
                      + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert all(f"'{stage}'" in out for stage in ("align", "vision", "lora"))


def test_a_llama_llm_folder_loads_as_llama(original, tmp_path):
    """InternVL2-40B/76B name a Llama LLM (no attention biases). Qwen2 with zero q/k/v biases is the same
    network, so equal states show the Llama path reads the same names."""
    zero_bias, llama = (shutil.copytree(original["qwen2"], tmp_path / name) for name in ("zero_bias", "llama"))
    weights = safetensors.torch.load_file(original["qwen2"] / "model.safetensors")
    biases = [k for k in weights if k.startswith("language_model.") and k.endswith(("q_proj.bias", "k_proj.bias",
                                                                                    "v_proj.bias"))]
    assert biases
    safetensors.torch.save_file({**weights, **{k: torch.zeros_like(weights[k]) for k in biases}},
                                zero_bias / "model.safetensors")
    safetensors.torch.save_file({k: v for k, v in weights.items() if k not in biases}, llama / "model.safetensors")
    config = json.loads((llama / "config.json").read_text())
    llm = {**config["llm_config"], "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (llama / "config.json").write_text(json.dumps({**config, "llm_config": llm}))
    ids = torch.randint(0, 200, (2, 7))
    model = InternVLCheckpoint.read(llama).language_model()
    assert type(model).__name__ == "LlamaModel"
    with torch.no_grad():
        expected = InternVLCheckpoint.read(zero_bias).language_model()(input_ids=ids).last_hidden_state
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
