"""CPU float32 training kernels for the Swin V2 model, behind one dispatch rule.

The model (`models/swinv2/model.py`) states the math with public torch ops. On a CPU, in float32,
with autograd recording, a few of those ops have a slow general path; the kernels here compute the
same values and gradients faster. Each is kept only for what a fresh train-step A/B measured
(docs/benchmarks.md, "Swin V2"); everything else runs the public op.

Entry points (each falls back to the public op whenever `runs_cpu_kernels` is false):
- `attention(qkv, mask, dropout)`: `F.scaled_dot_product_attention` with `scale=1.0`. With a mask
  that needs a gradient, CPU SDPA takes its unfused math path; `_AttentionWithMaskGrad` saves the
  probabilities and runs four GEMMs in backward.

Private torch ops are used here and only here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["runs_cpu_kernels", "attention"]


def runs_cpu_kernels(x: Tensor) -> bool:
    """The one dispatch rule: a CPU float32 tensor while autograd records and no autocast is on."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu"))


class _AttentionWithMaskGrad(torch.autograd.Function):
    """softmax(q k^T + mask) v with a trainable additive mask, keeping the probabilities.

    Forward: P = softmax(q k^T + mask), out = P v. Backward from the saved P, four GEMMs and no
    recomputation: dv = P^T dO, dS = softmax_backward(dO v^T, P), dq = dS k, dk = dS^T q,
    dmask = sum_b dS. The softmax and its backward run in place (each row is reduced before it is
    written), so the score buffer becomes P and dP becomes dS. dq, dk and dv are written into one
    stacked gradient, so nothing has to stack them again.
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, mask: Tensor) -> Tensor:
        q, k, v = qkv.unbind(0)
        scores = torch.matmul(q, k.transpose(-1, -2)).add_(mask)
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
        ctx.save_for_backward(qkv, probs)
        ctx.mask_dtype = mask.dtype
        return torch.matmul(probs, v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        qkv, probs = ctx.saved_tensors
        q, k, v = qkv.unbind(0)
        grad = grad.contiguous()  # two GEMMs read it: lay it out once
        grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        dq, dk, dv = grad_qkv.unbind(0)
        torch.matmul(probs.transpose(-1, -2), grad, out=dv)
        dprobs = torch.matmul(grad, v.transpose(-1, -2))
        dscores = torch.ops.aten._softmax_backward_data.out(dprobs, probs, -1, probs.dtype, grad_input=dprobs)
        torch.matmul(dscores, k, out=dq)
        torch.matmul(dscores.transpose(-1, -2), q, out=dk)
        return grad_qkv, dscores.sum(0, keepdim=True).to(ctx.mask_dtype)


def attention(qkv: Tensor, mask: Tensor, dropout: float = 0.0) -> Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0)`.

    Args:
        qkv: (3, B, G, N, d), q, k and v stacked (G: heads, or windows x heads).
        mask: additive (1, G, N, N).
        dropout: attention-probability dropout; the CPU kernel runs only without it.

    Returns:
        (B, G, N, d).
    """
    if runs_cpu_kernels(qkv) and mask.requires_grad and dropout == 0.0:
        return _AttentionWithMaskGrad.apply(qkv.contiguous(), mask)
    q, k, v = qkv.unbind(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0)
