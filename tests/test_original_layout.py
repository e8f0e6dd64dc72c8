"""OpenGVLab's original InternVL folders (`internvl_chat`) loaded by `build_model`, checked against the
independent reference of the original math (tests/reference_internvl.py), for a Qwen2 and an InternLM2 LLM.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers.utils import HF_MODULES_CACHE

from config import load_config
from models.build import build_model
from models.internvl2 import InternVL2MultimodalModel
from models.tiny import REMOTE_CODE_FILES, write_original_internvl
from tests.reference_internvl import extract_feature, llm_hidden_states, load_state, read_config

REPO = Path(__file__).parents[1]
LLMS = ["qwen2", "internlm2"]
SIZE = 56  # the toy preset's native size: a 4 x 4 patch grid, 4 image tokens after the pixel shuffle
def _build(folder: Path, *overrides: str) -> InternVL2MultimodalModel:
    config = load_config(REPO / "config" / "base.yaml", [
        f"model.language.checkpoint={folder}", "model.vision.encoder=internvit", f"model.vision.checkpoint={folder}",
        f"model.vision.image_size=[{SIZE}, {SIZE}]", *overrides])
    return build_model(config.model).eval()


VARIANTS = {
    "plain": {},
    "select_layer-2": {"select_layer": -2},
    "ps_v1": {"ps_version": "v1"},
    # as published: bf16, sharded with model.safetensors.index.json (the loader upcasts to float32 exactly)
    "bf16-sharded": {"dtype": torch.bfloat16, "shard_mib": 0.05},
    # InternViT-6B's form: RMSNorm blocks and q/k RMSNorm across all heads, no qkv bias
    "rms_norm-qk_norm": {"vision": {"norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False}},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Per LLM and variant, a toy folder, float32 unless the variant says otherwise (exact comparisons)."""
    root = tmp_path_factory.mktemp("original")
    return {(llm, name): write_original_internvl(root / f"{llm}-{name}", llm=llm, seed=5,
                                                 **{"dtype": torch.float32, **fields})
            for llm in LLMS for name, fields in VARIANTS.items()}


@pytest.fixture(scope="module")
def built(folders) -> dict[str, InternVL2MultimodalModel]:
    """The plain folder of each LLM built once."""
    return {llm: _build(folders[llm, "plain"]) for llm in LLMS}


def _text_inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 6), generator=generator)
    return ids, torch.tensor([[1] * 6, [1] * 3 + [0] * 3])  # the second row right-padded


@pytest.mark.parametrize("llm", LLMS)
def test_image_tokens_equal_the_original_extract_feature(llm, folders, built):
    folder = folders[llm, "plain"]
    config = read_config(folder)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = built[llm].encode_images(pixels)
    expected = extract_feature(load_state(folder), config["vision_config"], config, pixels)
    assert ours.shape == expected.shape == (2, 4, config["llm_config"]["hidden_size"])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("llm", LLMS)
def test_text_states_equal_the_original_llm(llm, folders, built):
    folder = folders[llm, "plain"]
    llm_config = read_config(folder)["llm_config"]
    ids, mask = _text_inputs(llm_config["vocab_size"])
    with torch.no_grad():
        ours = built[llm].language(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours, llm_hidden_states(load_state(folder), llm_config, ids, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("llm", LLMS)
def test_the_folders_python_files_are_never_imported(llm, folders, built):
    """Every .py in the folder raises RuntimeError on import, so building at all shows none ran; and no
    module from the folder, nor a copy of one in transformers' remote-code cache, is in sys.modules."""
    folder = folders[llm, "plain"].resolve()
    stems = {Path(name).stem for name in REMOTE_CODE_FILES[llm]}
    assert stems == {p.stem for p in folder.glob("*.py")}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        assert not (file and Path(file).resolve().is_relative_to(folder)), f"{name} was imported from {folder}"
        assert name.rsplit(".", 1)[-1] not in stems, f"{name} looks like the folder's remote code"
    assert not (Path(HF_MODULES_CACHE) / "transformers_modules" / folder.name).exists()


@pytest.mark.parametrize("llm", LLMS)
def test_select_layer_from_config_json_is_honoured(llm, folders):
    folder = folders[llm, "select_layer-2"]
    config = read_config(folder)
    assert config["select_layer"] == -2
    model = _build(folder)
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = model.encode_images(pixels)
    state = load_state(folder)
    torch.testing.assert_close(ours, extract_feature(state, config["vision_config"], config, pixels),
                               atol=1e-5, rtol=1e-5)
    last = extract_feature(state, config["vision_config"], {**config, "select_layer": -1}, pixels)
    assert not torch.allclose(ours, last, atol=1e-3), "select_layer -2 gave the last layer's tokens"


@pytest.mark.parametrize("llm", LLMS)
def test_ps_version_v1_is_refused_naming_the_field_and_the_folder(llm, folders):
    folder = folders[llm, "ps_v1"]
    with pytest.raises(ValueError) as info:
        _build(folder)
    message = str(info.value)
    assert "ps_version" in message and str(folder) in message, message


@pytest.mark.parametrize("llm", LLMS)
def test_bf16_sharded_folder_loads_through_its_index(llm, folders):
    folder = folders[llm, "bf16-sharded"]
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    config = read_config(folder)
    state = load_state(folder)  # bf16 upcast to float32
    model = _build(folder)
    pixels = torch.randn(1, 3, SIZE, SIZE)
    ids, mask = _text_inputs(config["llm_config"]["vocab_size"])
    with torch.no_grad():
        tokens = model.encode_images(pixels)
        text = model.language(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(tokens, extract_feature(state, config["vision_config"], config, pixels),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, llm_hidden_states(state, config["llm_config"], ids, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("llm", LLMS)
def test_rms_norm_and_qk_norm_towers_equal_the_original(llm, folders):
    folder = folders[llm, "rms_norm-qk_norm"]
    config = read_config(folder)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = _build(folder).encode_images(pixels)
    torch.testing.assert_close(ours, extract_feature(load_state(folder), config["vision_config"], config, pixels),
                               atol=1e-5, rtol=1e-5)
