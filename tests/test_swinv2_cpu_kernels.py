"""The Swin V2 CPU training kernels (`models/swinv2/cpu_kernels.py`): values, gradients, dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.swinv2 import cpu_kernels


def _qkv_and_mask(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 16, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = (torch.randn(1, 4, 16, 16, dtype=dtype) * 2).requires_grad_()
    return q, k, v, mask


def test_attention_with_trainable_mask_matches_sdpa_and_its_gradients() -> None:
    """The CPU training kernel (probabilities kept, four-GEMM backward) against autograd through SDPA."""
    q, k, v, mask = _qkv_and_mask()
    grad = torch.randn(3, 4, 16, 8)
    ours = cpu_kernels.attention(torch.stack((q, k, v)), mask)
    assert ours.grad_fn.name() == "_AttentionWithMaskGradBackward"
    ours_grads = torch.autograd.grad(ours, (q, k, v, mask), grad)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    ref_grads = torch.autograd.grad(ref, (q, k, v, mask), grad)
    assert torch.allclose(ours, ref, atol=1e-5)
    for name, a, b in zip("qkv", ours_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5), name
    assert ours_grads[3].shape == mask.shape and torch.allclose(ours_grads[3], ref_grads[3], atol=1e-5)


def test_attention_mask_gradient_sums_over_a_broadcast_batch() -> None:
    """A (1, G, N, N) mask shared by a batch of 3 gets the batch's summed gradient."""
    q, k, v, mask = _qkv_and_mask()
    ours = cpu_kernels.attention(torch.stack((q, k, v)), mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    (a,) = torch.autograd.grad(ours.sum(), mask)
    (b,) = torch.autograd.grad(ref.sum(), mask)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("case", ["no_grad", "frozen_mask", "float64", "dropout", "autocast"])
def test_attention_runs_sdpa_outside_cpu_float32_training(case: str) -> None:
    """The one dispatch rule: CPU, float32, autograd recording, no autocast (and, for this kernel,
    a mask that needs a gradient and no dropout); anything else is SDPA itself."""
    q, k, v, mask = _qkv_and_mask(torch.float64 if case == "float64" else torch.float32)
    if case == "frozen_mask":
        mask = mask.detach()
    dropout = 0.5 if case == "dropout" else 0.0
    with torch.set_grad_enabled(case != "no_grad"), torch.autocast("cpu", enabled=case == "autocast"):
        assert cpu_kernels.runs_cpu_kernels(q) == (case not in ("no_grad", "float64", "autocast"))
        torch.manual_seed(1)
        out = cpu_kernels.attention(torch.stack((q, k, v)), mask, dropout)
        torch.manual_seed(1)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0)
    assert out.grad_fn is None or "AttentionWithMaskGrad" not in out.grad_fn.name()
    assert torch.equal(out, ref)
