import hashlib
import subprocess
import sys
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from models.tiny import write_tiny_checkpoints

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
