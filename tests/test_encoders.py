"""Registry-wide adapter contract tests on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from models.encoders import EncoderUnavailableError, encoder_names, get_encoder_class
from tests.conftest import build_tiny_encoder

NAMES = encoder_names()
SIZES = [(224, 224), (224, 448), (230, 300)]  # square, tall receipt (W x 2), not a multiple of anything


def build(name: str, tiny, size=(224, 224)):
    return build_tiny_encoder(tiny, name, size)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_encoder_class("vit-huge")
    for name in NAMES:
        assert name in str(e.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_output_shapes_match_declared_grid(name, size, tiny_checkpoints):
    encoder = build(name, tiny_checkpoints, size).eval()
    out = encoder(torch.randn(2, 3, *size))
    assert out.grid == encoder.grid_size(size)
    assert out.tokens.shape == (2, out.grid[0] * out.grid[1], encoder.out_channels)
    assert len(out.stages) == len(encoder.feature_info) == len(out.stage_grids)
    for i, (tokens, grid, info) in enumerate(zip(out.stages, out.stage_grids, encoder.feature_info)):
        assert grid == encoder.grid_size(size, i)
        assert tokens.shape == (2, grid[0] * grid[1], info.channels)
    assert torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("name", NAMES)
def test_groups_are_exact_module_sets(name, tiny_checkpoints):
    encoder = build(name, tiny_checkpoints)
    groups = encoder.parameter_groups()
    all_params = {id(p) for p in encoder.parameters()}
    assert {id(p) for m in groups["all"] for p in m.parameters()} == all_params
    assert set(encoder.depth_groups) <= set(groups)
    # depth groups partition the backbone except the final norm: no parameter in two of them
    seen: set[int] = set()
    for group in encoder.depth_groups:
        ids = {id(p) for m in groups[group] for p in m.parameters()}
        assert ids, f"group {group} is empty"
        assert not ids & seen, f"group {group} overlaps an earlier group"
        seen |= ids
    final = {id(p) for m in groups.get("final_norm", []) for p in m.parameters()}
    assert seen | final == all_params
    last = {id(p) for m in groups["last_stage"] for p in m.parameters()}
    assert last == {id(p) for m in groups[encoder.depth_groups[-1]] for p in m.parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_lora_targets_name_linear_layers(name, tiny_checkpoints):
    encoder = build(name, tiny_checkpoints)
    linear_names = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in encoder.lora_target_modules:
        assert any(n == target or n.endswith("." + target) for n in linear_names), target


@pytest.mark.parametrize("name", NAMES)
def test_one_step_changes_exactly_the_trainable_group(name, tiny_checkpoints):
    encoder = build(name, tiny_checkpoints).train()
    encoder.requires_grad_(False)
    trainable = encoder.parameter_groups()["last_stage"]
    for module in trainable:
        module.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    encoder(torch.randn(2, 3, 224, 224)).tokens.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    trainable_ids = {id(p) for p in params}
    for n, p in encoder.named_parameters():
        if id(p) in trainable_ids:
            assert not torch.equal(p, before[n]), f"{n} is trainable but did not change"
        else:
            assert p.grad is None and torch.equal(p, before[n]), f"{n} is frozen but changed"


@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_gives_same_gradients(name, tiny_checkpoints):
    encoder = build(name, tiny_checkpoints).train()
    x = torch.randn(1, 3, 224, 224)
    encoder(x).tokens.sum().backward()
    ref = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad(set_to_none=True)
    encoder.set_grad_checkpointing(True)
    encoder(x).tokens.sum().backward()
    for n, p in encoder.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_missing_checkpoint_is_unavailable(name, tmp_path):
    with pytest.raises(EncoderUnavailableError, match="does not exist"):
        get_encoder_class(name).build(str(tmp_path / "nowhere"), {}, (224, 224))


@pytest.mark.parametrize("name", NAMES)
def test_bad_config_field_is_unavailable(name):
    with pytest.raises(EncoderUnavailableError, match="hidden_sizee|embed_dimm"):
        get_encoder_class(name).build(None, {"hidden_sizee" if name == "internvit" else "embed_dimm": 8}, (224, 224))


def test_wrong_checkpoint_type_is_unavailable(tiny_checkpoints):
    with pytest.raises(EncoderUnavailableError, match="model_type 'internvl'"):
        get_encoder_class("swin").build(str(tiny_checkpoints["internvl2"]), {}, (224, 224))


def test_preprocessing_comes_from_checkpoint(tiny_checkpoints):
    encoder = build("swin", tiny_checkpoints, (448, 896))
    assert encoder.preprocessing.size == (448, 896)
    assert encoder.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))


def test_swin_refuses_inputs_smaller_than_its_window_up_front(tiny_checkpoints):
    with pytest.raises(ValueError, match="smaller than window_size=7.*at least 224x224"):
        build("swin", tiny_checkpoints, (112, 112))
    encoder = build("swin", tiny_checkpoints)
    with pytest.raises(ValueError, match="a 224x160 input gives a 7x5 map at stage 3"):
        encoder(torch.randn(1, 3, 224, 160))
