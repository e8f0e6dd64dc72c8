"""Numerical parity of the in-house Swin V2 with transformers' Swinv2Model (same, converted weights).

Tiny random configs; every parameter is perturbed away from its initial value so that norms,
biases, logit scales and the position-bias MLP all matter.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import Swinv2Config, Swinv2Model

from models.swinv2 import SwinTransformerV2, from_transformers
from models.swinv2.convert import transformers_to_inhouse

ATOL = 1e-4
GRAD_RTOL = 1e-4


def make_pair(seed: int = 0, **kwargs) -> tuple[Swinv2Model, torch.nn.Module]:
    """A random transformers Swinv2Model (drop path off) and the in-house model converted from it."""
    torch.manual_seed(seed)
    defaults = dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4],
                    window_size=4, drop_path_rate=0.0)
    hf = Swinv2Model(Swinv2Config(**{**defaults, **kwargs}))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "logit_scale" in name else 0.1))
    return hf.eval(), from_transformers(hf)


def hf_stage_outputs(hf: Swinv2Model, x: torch.Tensor) -> list[torch.Tensor]:
    """transformers' per-stage outputs before downsampling, (B, N_i, C_i)."""
    emb, dims = hf.embeddings(x)
    enc = hf.encoder(emb, dims, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    return list(enc.hidden_states[1:])


CASES = {
    # name: (config overrides, input shape)
    "256_window8_batch2": (dict(image_size=256, window_size=8, embed_dim=8, depths=[2, 2, 2, 2],
                                num_heads=[1, 2, 2, 4]), (2, 3, 256, 256)),
    "256_window8_batch1": (dict(image_size=256, window_size=8, embed_dim=8, depths=[2, 2, 2, 2],
                                num_heads=[1, 2, 2, 4]), (1, 3, 256, 256)),
    "non_square_448x896": (dict(image_size=[448, 896], window_size=8, embed_dim=8, depths=[2, 2, 2, 2],
                                num_heads=[1, 2, 2, 4]), (1, 3, 448, 896)),
    "non_square_runtime_input": (dict(), (2, 3, 48, 96)),
    "not_divisible_by_window": (dict(), (3, 3, 70, 90)),
    "not_divisible_by_patch": (dict(), (2, 3, 66, 61)),
    "stage_smaller_than_window": (dict(window_size=8, depths=[2, 2, 2]), (2, 3, 64, 64)),
    "input_smaller_than_config": (dict(image_size=128, window_size=8), (2, 3, 40, 40)),
    "pretrained_window_differs": (dict(window_size=8, image_size=128, pretrained_window_sizes=[4, 6, 0]),
                                  (2, 3, 128, 128)),
    "qkv_bias_off": (dict(qkv_bias=False), (2, 3, 64, 64)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_forward_matches_transformers(name: str) -> None:
    overrides, shape = CASES[name]
    hf, ours = make_pair(**overrides)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref, out = hf(x), ours(x)
        ref_stages = hf_stage_outputs(hf, x)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() < ATOL
    assert (out.pooler_output - ref.pooler_output).abs().max() < ATOL
    assert len(out.stage_outputs) == len(ref_stages)
    for got, want in zip(out.stage_outputs, ref_stages):
        assert got.shape == want.shape
        assert (got - want).abs().max() < ATOL


def test_saturated_logit_scale_matches_transformers() -> None:
    """At the clamp (scale 100) the shift-mask value matters; transformers' (-100 added twice) is matched.

    Compared in float64: at scale 100, float32 rounding alone moves transformers' own output by
    ~1e-3, which would hide the mask semantics this test is about.
    """
    hf, ours = make_pair(window_size=4)
    hf, ours = hf.double(), ours.double()
    with torch.no_grad():
        for model in (hf, ours):
            for name, p in model.named_parameters():
                if name.endswith("logit_scale"):
                    p.fill_(math.log(100.0) + 0.5)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64) * 3
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        assert (ours(x).last_hidden_state - ref).abs().max() < 1e-8
        # The same weights with the Microsoft / timm / torchvision convention (-100 once).
        single = SwinTransformerV2(dataclasses.replace(ours.cfg, shift_mask_value=-100.0)).double().eval()
        single.load_state_dict(ours.state_dict())
        assert (single(x).last_hidden_state - ref).abs().max() > 1e-3


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", ["256_window8_batch2", "not_divisible_by_window", "stage_smaller_than_window",
                                  "pretrained_window_differs", "non_square_runtime_input"])
def test_train_mode_outputs_and_gradients_match(name: str) -> None:
    overrides, shape = CASES[name]
    hf, ours = make_pair(**overrides)
    hf.train()
    ours.train()
    x = torch.randn(*shape)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = hf(x_hf), ours(x_ours)
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() < ATOL
    weight = torch.randn_like(ref.last_hidden_state)
    ((ref.last_hidden_state * weight).sum() + ref.pooler_output.pow(2).sum()).backward()
    ((out.last_hidden_state * weight).sum() + out.pooler_output.pow(2).sum()).backward()

    assert _relative_error(x_ours.grad, x_hf.grad) < GRAD_RTOL
    ref_grads = transformers_to_inhouse({n: p.grad for n, p in hf.named_parameters()})
    our_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert set(ref_grads) == set(our_grads)
    for key, want in ref_grads.items():
        assert our_grads[key] is not None, key
        assert _relative_error(our_grads[key], want) < GRAD_RTOL, key
