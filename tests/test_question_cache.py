"""The question-state cache: the frozen LLM runs once per distinct question, answers do not change, and
every way the LLM's weights can change (training, loading, LoRA, dtype, dropout) drops the cache."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator

from config.loader import load_config, save_config
from models.build import build_model
from models.inference import ReceiptCounter
from models.internvl2 import InternVL2MultimodalModel
from train.data import build_datasets
from train.lora import inject_lora, lora_groups, merge_lora
from train.loop import Trainer
from tests.conftest import make_config, tiny_checkpoint

REPO = Path(__file__).parents[1]
QUESTIONS = ["How many receipts?", None, "Is there a receipt, two receipts, or no receipt in this scan?", None,
             "How many receipts?", "Count every receipt."]


def open_gates(model: InternVL2MultimodalModel) -> InternVL2MultimodalModel:
    """Zero-init gates hide the text path from the head; opened, the logits depend on the LLM states."""
    with torch.no_grad():
        for block in model.fusion.blocks:
            block.attn_gate.alpha.fill_(1.0)
            block.mlp_gate.alpha.fill_(1.0)
    return model


def frozen_model(tiny, seed: int = 0) -> InternVL2MultimodalModel:
    torch.manual_seed(seed)
    model = open_gates(build_model(make_config(tiny, "swin").model)).eval()
    return model.requires_grad_(False)


class LLMCalls:
    """Counts forwards of the LLM and the rows each one computed (a forward hook, as a user would add)."""

    def __init__(self, model: InternVL2MultimodalModel) -> None:
        self.rows: list[int] = []
        model.language.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output) -> None:
        self.rows.append(kwargs["input_ids"].shape[0])

    def __len__(self) -> int:
        return len(self.rows)


def uncached_logits(model: InternVL2MultimodalModel, *inputs: torch.Tensor) -> torch.Tensor:
    cache, model.question_cache = model.question_cache, None
    try:
        return model(*inputs).logits
    finally:
        model.question_cache = cache


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(len(QUESTIONS), 3, 224, 224)


def test_64_default_predictions_at_batch_8_run_the_llm_once_with_unchanged_probabilities(tiny_checkpoints):
    model = open_gates(build_model(make_config(tiny_checkpoints, "swin").model))
    calls = LLMCalls(model)
    counter = ReceiptCounter.from_model(model)
    images = torch.randn(64, 3, 224, 224)
    cached = counter.predict(images, batch_size=8)
    assert len(calls) == 1 and calls.rows == [1]  # one forward, over the one distinct question
    model.question_cache = None
    uncached = counter.predict(images, batch_size=8)
    assert len(calls) == 1 + 8
    probs = torch.tensor([list(p.probabilities.values()) for p in cached])
    assert torch.equal(probs, torch.tensor([list(p.probabilities.values()) for p in uncached]))
    assert (probs[0] - probs[1]).abs().max() > 1e-4  # the images really get different answers


def test_mixed_questions_in_a_batch_match_the_uncached_path_and_only_new_ones_run(tiny_checkpoints, pixels):
    model = frozen_model(tiny_checkpoints)
    calls = LLMCalls(model)
    ids, mask = model.tokenize(QUESTIONS)
    assert mask.sum(1).unique().numel() > 2  # questions of different lengths, so rows carry padding
    with torch.no_grad():
        expected = uncached_logits(model, pixels, ids, mask)
        calls.rows.clear()
        torch.testing.assert_close(model(pixels, ids, mask).logits, expected, rtol=0, atol=1e-6)
        assert calls.rows == [4]  # four distinct questions in six rows, one forward
        torch.testing.assert_close(model(pixels.flip(0), ids.flip(0), mask.flip(0)).logits, expected.flip(0),
                                   rtol=0, atol=1e-6)
        ids2, mask2 = model.tokenize(["A new question?", None])
        model(pixels[:2], ids2, mask2)
    assert calls.rows == [4, 1] and len(model.question_cache) == 5
    assert not torch.allclose(expected[0], model(pixels[:1]).logits[0])  # the question matters to the answer


def test_cache_holds_at_most_max_entries(tiny_checkpoints, pixels):
    model = frozen_model(tiny_checkpoints)
    model.question_cache.max_entries = 2
    ids, mask = model.tokenize(QUESTIONS)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, ids, mask).logits, uncached_logits(model, pixels, ids, mask),
                                   rtol=0, atol=1e-6)
    assert len(model.question_cache) == 2


def _load_state_dict(model: InternVL2MultimodalModel, source: InternVL2MultimodalModel, tmp_path: Path) -> None:
    model.load_state_dict(source.state_dict())


def _load_safetensors(model: InternVL2MultimodalModel, source: InternVL2MultimodalModel, tmp_path: Path) -> None:
    safetensors.torch.save_model(source, str(tmp_path / "w.safetensors"))
    safetensors.torch.load_model(model, str(tmp_path / "w.safetensors"))


def _load_language_only(model: InternVL2MultimodalModel, source: InternVL2MultimodalModel, tmp_path: Path) -> None:
    model.language.load_state_dict(source.language.state_dict())


@pytest.mark.parametrize("load", [_load_state_dict, _load_safetensors, _load_language_only],
                         ids=["load_state_dict", "safetensors", "language.load_state_dict"])
def test_loading_weights_drops_the_cache(load, tiny_checkpoints, pixels, tmp_path):
    model, other = frozen_model(tiny_checkpoints, seed=0), frozen_model(tiny_checkpoints, seed=1)
    with torch.no_grad():
        other.language.embed_tokens.weight.normal_()  # a different LLM (the tiny checkpoint is shared)
        before = model(pixels).logits
        load(model, other, tmp_path)
        after = model(pixels).logits
        torch.testing.assert_close(after, uncached_logits(model, pixels), rtol=0, atol=1e-6)
    assert not torch.allclose(before, after)  # stale states would have kept the old answers


def test_a_training_llm_runs_every_time_and_its_new_weights_are_used_once_frozen(tiny_checkpoints, pixels):
    model = frozen_model(tiny_checkpoints)
    calls = LLMCalls(model)
    with torch.no_grad():
        model(pixels)
    model.language.requires_grad_(True)
    optimizer = torch.optim.SGD(model.language.parameters(), lr=1.0)
    for _ in range(2):
        model(pixels, labels=torch.zeros(len(pixels), dtype=torch.long)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(calls) == 3 and len(model.question_cache) == 0
    model.language.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, uncached_logits(model, pixels), rtol=0, atol=1e-6)


def test_dtype_and_lora_changes_drop_the_cache(tiny_checkpoints, pixels):
    model = frozen_model(tiny_checkpoints)
    with torch.no_grad():
        model(pixels)
        model.double()
        torch.testing.assert_close(model(pixels.double()).logits, uncached_logits(model, pixels.double()),
                                   rtol=0, atol=1e-12)
        model.float()
        model(pixels)
    inject_lora(model, "language.lora", rank=4, alpha=8, dropout=0.0)
    model.requires_grad_(False)  # a stage that trains the head with frozen adapters
    with torch.no_grad():
        for module in lora_groups(model)["language.lora"]:
            for p in module.parameters():
                p.normal_(0, 0.5)  # lora_B starts at zero; make the adapters matter
        adapted = model(pixels).logits
        torch.testing.assert_close(adapted, uncached_logits(model, pixels), rtol=0, atol=1e-6)
        merge_lora(model.language)
        torch.testing.assert_close(model(pixels).logits, uncached_logits(model, pixels), rtol=0, atol=1e-6)
    torch.testing.assert_close(model(pixels).logits, adapted, rtol=1e-4, atol=1e-5)


def test_train_mode_is_cached_without_dropout_and_not_with_it(tiny_checkpoints, pixels):
    model = frozen_model(tiny_checkpoints).train()
    calls = LLMCalls(model)
    model.head.requires_grad_(True)
    with torch.inference_mode():  # states cached under inference mode cannot be saved for backward...
        model.eval()(pixels)
    model.train()
    for _ in range(2):  # ...so a training forward recomputes them once and then reuses them
        model(pixels, labels=torch.zeros(len(pixels), dtype=torch.long)).loss.backward()
    assert len(calls) == 2 and model.head[2].weight.grad is not None
    inject_lora(model, "language.lora", rank=4, alpha=8, dropout=0.5)
    model.language.requires_grad_(False)
    model(pixels)
    model(pixels)
    assert len(calls) == 4  # LoRA dropout draws new masks every forward: nothing to reuse
    model.eval()
    model(pixels)
    model(pixels)
    assert len(calls) == 5


def test_a_replaced_llm_is_not_served_the_old_llms_states(tiny_checkpoints, pixels):
    model, other = frozen_model(tiny_checkpoints), frozen_model(tiny_checkpoints)
    with torch.no_grad():
        other.language.embed_tokens.weight.normal_()
        before = model(pixels).logits
        model.language = other.language  # same names, dtypes and devices: only the module differs
        torch.testing.assert_close(model(pixels).logits, uncached_logits(model, pixels), rtol=0, atol=1e-6)
    assert not torch.allclose(before, model(pixels).logits)


def test_copies_start_empty_and_clear_only_their_own_cache(tiny_checkpoints, pixels):
    model = frozen_model(tiny_checkpoints)
    with torch.no_grad():
        model(pixels)
        twin = copy.deepcopy(model)
        assert len(twin.question_cache) == 0
        twin(pixels)
        twin.load_state_dict(frozen_model(tiny_checkpoints, seed=1).state_dict())  # the twin's hook, the twin's cache
    assert len(model.question_cache) == 1 and len(twin.question_cache) == 0


def test_a_frozen_llm_training_stage_runs_the_llm_once(tiny_checkpoints, tmp_path):
    receipts = tmp_path / "receipts"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_receipts.py"), "--out", str(receipts),
                    "--train", "8", "--val", "4", "--test", "4", "--size", "64", "--no-contact-sheet"],
                   check=True, capture_output=True)
    config = load_config(REPO / "config" / "base.yaml", [
        "model.vision.encoder=swinv2", f"model.vision.checkpoint={tiny_checkpoint(tiny_checkpoints, 'swinv2')}",
        f"model.language.checkpoint={tiny_checkpoints['internvl2']}", "model.vision.image_size=[64, 64]",
        f"data.train={receipts / 'train'}", f"data.val={receipts / 'val'}", f"data.test={receipts / 'test'}",
        "data.batch_size=4", "data.eval_batch_size=4", f"output_dir={tmp_path / 'run'}",
        "train.stages=[{name: align, epochs: 2, lr: 0.001, trainable: [projector, fusion, head]}]"])
    model = build_model(config.model)
    calls = LLMCalls(model)
    datasets = build_datasets(config.data, model.class_names, model.preprocessing, config.seed)
    save_config(config, tmp_path / "run" / "config.yaml")  # what train.run writes before training
    Trainer(config, Accelerator(cpu=True), model, datasets, tmp_path / "run").run()
    # 2 epochs x 2 train batches, 2 x 1 validation batch and 1 test batch: 7 forwards, one LLM run
    assert len(calls) == 1
