import hashlib
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration, Qwen2Tokenizer

from models.tiny import (REMOTE_CODE_FILES, get_preset, hf_internvl_config, hf_tensor_specs, original_internvl_config,
                         original_llm_config, original_tensor_specs, original_vision_config, write_hf_internvl,
                         write_original_internvl, write_tiny_checkpoints)
from tests.conftest import load_script

REPO = Path(__file__).parents[1]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_checkpoints):
    again = write_tiny_checkpoints(tmp_path / "a", seed=0)
    other = write_tiny_checkpoints(tmp_path / "b", seed=1)
    for name in ("internvl2", "swin", "swinv2"):
        assert digest(again[name]) == digest(tiny_checkpoints[name])
        assert digest(other[name]) != digest(tiny_checkpoints[name])


def test_checkpoints_are_hugging_face_folders(tiny_checkpoints):
    assert AutoConfig.from_pretrained(tiny_checkpoints["internvl2"]).model_type == "internvl"
    assert AutoConfig.from_pretrained(tiny_checkpoints["swin"]).model_type == "swin"
    assert AutoConfig.from_pretrained(tiny_checkpoints["swinv2"]).model_type == "swinv2"
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["internvl2"])
    text = "How many receipts are in this image?"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == AutoConfig.from_pretrained(
        tiny_checkpoints["internvl2"]).image_token_id


def test_cli_writes_the_three_folders(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_checkpoints.py"), "--out",
                             str(tmp_path), "--seed", "3"], capture_output=True, text=True, check=True)
    for name in ("internvl2", "swin", "swinv2"):
        assert (tmp_path / name / "model.safetensors").is_file() and name in result.stdout


# --- InternVL folders in OpenGVLab's original layout and in transformers' layout ---------------------------

LLMS = ["qwen2", "internlm2"]


def all_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out.update({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()})
    return out


@pytest.mark.parametrize("llm", LLMS)
def test_original_folder_same_seed_same_bytes_other_seed_other_weights(llm, tmp_path):
    a, b, c = (write_original_internvl(tmp_path / name, llm=llm, seed=seed) for name, seed in
               (("a", 0), ("b", 0), ("c", 1)))
    assert all_digests(a) == all_digests(b)
    assert all_digests(a)["model.safetensors"] != all_digests(c)["model.safetensors"]


@pytest.mark.parametrize("llm", LLMS)
def test_original_folder_holds_what_the_hub_folder_holds(llm, tmp_path):
    folder = write_original_internvl(tmp_path / llm, llm=llm)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "internvl_chat" and config["architectures"] == ["InternVLChatModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_internvl_chat.InternVLChatModel"
    assert (config["downsample_ratio"], config["ps_version"], config["select_layer"]) == (0.5, "v2", -1)
    assert config["vision_config"]["model_type"] == "intern_vit_6b" and config["torch_dtype"] == "bfloat16"
    assert config["llm_config"]["architectures"] == [{"qwen2": "Qwen2ForCausalLM",
                                                      "internlm2": "InternLM2ForCausalLM"}[llm]]
    held = tensors(folder)
    assert {name: shape for name, (shape, _) in held.items()} == dict(original_tensor_specs(config))
    assert {dtype for _, dtype in held.values()} == {"BF16"}
    assert json.loads((folder / "preprocessor_config.json").read_text())["feature_extractor_type"] == \
        "CLIPFeatureExtractor"
    for name in REMOTE_CODE_FILES[llm]:
        with pytest.raises(RuntimeError, match="remote code was imported"):
            runpy.run_path(str(folder / name))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    text = "How many receipts are in this image?"
    if llm == "qwen2":
        assert tokenizer_config["tokenizer_class"] == "Qwen2Tokenizer"
        assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        tokenizer = Qwen2Tokenizer.from_pretrained(folder)
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
        assert len(tokenizer) == config["llm_config"]["vocab_size"]
    else:
        import sentencepiece
        assert tokenizer_config["tokenizer_class"] == "InternLM2Tokenizer"
        assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_internlm2.InternLM2Tokenizer"
        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        assert sp.decode(sp.encode(text)) == text and [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
        assert max(map(int, tokenizer_config["added_tokens_decoder"])) == config["llm_config"]["vocab_size"] - 1


def test_sharded_folder_has_the_index_save_pretrained_writes(tmp_path):
    folder = write_original_internvl(tmp_path / "sharded", shard_mib=0.1)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 1 and not (folder / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == files
    held = tensors(folder)
    assert set(index["weight_map"]) == set(held)
    assert index["metadata"]["total_size"] == sum(math.prod(shape) * 2 for shape, _ in held.values())


def test_internvl2_5_1b_preset_has_the_real_shapes_in_both_layouts():
    spec = get_preset("internvl2.5-1b")
    config = original_internvl_config(original_vision_config(spec.vision, 448, torch.bfloat16),
                                      original_llm_config("qwen2", spec.text, torch.bfloat16), image_size=448)
    original = dict(original_tensor_specs(config))
    hf = dict(hf_tensor_specs(hf_internvl_config("internvl2.5-1b")))
    assert original["vision_model.embeddings.position_embedding"] == (1, 1025, 1024)
    assert original["vision_model.encoder.layers.23.attn.qkv.weight"] == (3072, 1024)
    assert original["mlp1.1.weight"] == (896, 4096)
    assert original["language_model.model.layers.23.self_attn.k_proj.weight"] == (128, 896)
    assert original["language_model.lm_head.weight"] == original["language_model.model.embed_tokens.weight"] == \
        (151674, 896)
    assert sum(map(math.prod, original.values())) == sum(map(math.prod, hf.values())) == 938_193_024


def test_unknown_fields_and_missing_llms_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown fields"):
        write_original_internvl(tmp_path / "a", vision={"hidden": 8})
    with pytest.raises(ValueError, match="has no 'internlm2' LLM"):
        write_original_internvl(tmp_path / "b", llm="internlm2", preset="internvl2.5-1b")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.tmp-*"))


def test_hf_layout_writer_matches_what_transformers_loads(tmp_path):
    folder = write_hf_internvl(tmp_path / "hf", preset="tiny", dtype=torch.float32)
    model, info = InternVLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(model.model.multi_modal_projector.linear_1.weight, f.get_tensor(
            "multi_modal_projector.linear_1.weight"))


def test_cli_writes_an_original_layout_folder(tmp_path, capsys):
    cli = load_script("make_tiny_checkpoints")
    assert cli.main(["--out", str(tmp_path / "o"), "--layout", "original", "--llm", "internlm2"]) == 0
    assert "original layout, internlm2" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["llm_config"]["model_type"] == "internlm2"
