"""Swin Transformer V2 (arXiv 2111.09883) in plain PyTorch, weight-compatible with transformers' Swinv2Model.

Reads top to bottom: pure helpers (window partition / reverse, log-spaced relative coordinates,
shift-region mask, the one-gather window index, stochastic depth), the attention kernel wrapper,
then the modules (fused qkv projection, window attention, block, patch merging, stage, patch
embedding) and finally the model.

Layout conventions: feature maps travel between blocks as (B, H, W, C) ("NHWC"); windows as
(B, nW, N, C) with nW windows per image and N = window * window tokens per window.

Behaviour follows transformers' Swinv2Model exactly where the paper's reference implementations
differ (see docs/swinv2.md):
- the window size and shift of every stage are fixed at construction from `img_size`: a stage whose
  configured feature-map height is <= the window uses a window equal to that height and no shift;
- at run time, feature maps are zero-padded (bottom/right) to a multiple of the window, then rolled,
  and cropped back afterwards, so any input size works;
- the shift mask value is -200 (transformers adds its -100 mask twice; Microsoft, timm and
  torchvision add -100 once). It is `SwinV2Config.shift_mask_value`.

Attention runs through `F.scaled_dot_product_attention` with `scale=1.0`: q is L2-normalised and
multiplied by the clamped, exponentiated per-head logit scale, k is L2-normalised, and the
continuous position bias (16 * sigmoid(MLP(log-spaced coords))) plus the shift mask is the
`attn_mask`. In inference (eval mode, and no gradient needed for the bias MLP), that mask is
computed once per feature-map shape and cached; the cache is keyed by the bias weights' identity
and version counters, so loading weights or any in-place update (optimizer step, `copy_`)
invalidates it, and it is dropped on every `train()` / `eval()` switch. For CPU training with a
trainable bias, PyTorch's SDPA would fall back to its unfused math path (scaled copies of q and k,
a safe softmax, an autograd graph of several ops); `scaled_dot_product_attention` below runs the
same math as one autograd Function that keeps the probabilities and needs four GEMMs in backward.
CPU float32 training also runs the biased linears through oneDNN (`linear`: the bias is added
inside the GEMM) and the GELU MLP as one autograd node (`_GeluMlp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SwinV2Config",
    "SwinV2Output",
    "SwinTransformerV2",
    "window_partition",
    "window_reverse",
    "relative_coords_table",
    "relative_position_index",
    "shift_region_mask",
    "stage_window_and_shift",
]

# Continuous position bias MLP width, fixed by the paper and every released checkpoint.
CPB_HIDDEN = 512
# Upper clamp of the learnable log logit scale: exp(scale) <= 1 / 0.01 = 100.
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
# LayerNorms that transformers builds without `layer_norm_eps` (patch embedding, patch merging).
DEFAULT_LN_EPS = 1e-5

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


@dataclass(frozen=True)
class SwinV2Config:
    """Architecture of a Swin V2 backbone.

    Attributes:
        img_size: (height, width) the model is configured for; fixes each stage's window and shift
            (as in transformers). Inputs of any size are accepted at run time.
        patch_size: side of the square patches of the stem convolution.
        in_chans: input image channels.
        embed_dim: channels of stage 0; stage i has embed_dim * 2**i.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: target attention window side.
        pretrained_window_sizes: per stage, the window the bias MLP was trained with (0: same as
            the window); rescales the log-spaced coordinates for window transfer.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: learn q and v biases (never a k bias).
        hidden_act: MLP activation name.
        drop_rate: dropout after the stem and after each MLP (transformers' hidden_dropout_prob).
        attn_drop_rate: dropout on attention probabilities and after the attention projection
            (transformers' attention_probs_dropout_prob, which it uses for both).
        drop_path_rate: stochastic depth rate of the last block (linear from 0).
        layer_norm_eps: eps of the block and final LayerNorms.
        shift_mask_value: additive mask between tokens of different shift regions.
        chunk_mib: a stage whose largest transient tensor (the MLP hidden activation, tokens x
            mlp_ratio x C elements) would exceed this many MiB for the whole batch runs its blocks on
            sub-batches of whole images (at least one) that stay under it, and concatenates the
            results: every op is per image, so the output is the same, while each transient tensor
            stays small enough to be served again from the allocator's heap (glibc maps every
            allocation above 32 MiB afresh and page-faults it in on each use) and to stay in cache
            between ops. None never splits. Not part of the architecture: not converted, not saved.
    """

    img_size: tuple[int, int] = (256, 256)
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 8
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-5
    shift_mask_value: float = -200.0
    chunk_mib: float | None = 16.0

    def __post_init__(self) -> None:
        n = len(self.depths)
        if len(self.num_heads) != n or len(self.pretrained_window_sizes) != n:
            raise ValueError(f"depths, num_heads and pretrained_window_sizes need one entry per stage; got "
                             f"{self.depths}, {self.num_heads}, {self.pretrained_window_sizes}")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(f"stage {i}: {self.embed_dim * 2**i} channels not divisible by {heads} heads")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {self.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
        if self.chunk_mib is not None and not self.chunk_mib > 0:
            raise ValueError(f"chunk_mib must be a positive number of MiB or None, got {self.chunk_mib}")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_dim(self, stage: int) -> int:
        return int(self.embed_dim * 2**stage)


@dataclass
class SwinV2Output:
    """Output of `SwinTransformerV2.forward`.

    Attributes:
        last_hidden_state: (B, N, C) final-stage tokens after the final LayerNorm, row-major grid.
        pooler_output: (B, C) mean of `last_hidden_state` over tokens.
        stage_outputs: per stage, (B, N_i, C_i) tokens before downsampling (the last one before the
            final norm), at the stage's own resolution.
        stage_grids: per stage, its (h_i, w_i) token grid.
    """

    last_hidden_state: Tensor
    pooler_output: Tensor
    stage_outputs: list[Tensor] = field(default_factory=list)
    stage_grids: list[tuple[int, int]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------

def window_partition(x: Tensor, window: int) -> Tensor:
    """Split a feature map into non-overlapping windows.

    Args:
        x: (B, H, W, C) with H and W multiples of `window`.
        window: window side.

    Returns:
        (B, nW, window * window, C), windows in row-major order over the (H/window, W/window) grid.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of `window_partition`: (B, nW, window * window, C) -> (B, height, width, C)."""
    b, _, _, c = windows.shape
    x = windows.view(b, height // window, width // window, window, window, c).transpose(2, 3)
    return x.reshape(b, height, width, c)


def relative_coords_table(window: int, pretrained_window: int = 0) -> Tensor:
    """Log-spaced relative coordinates fed to the continuous position bias MLP.

    Offsets in [-(window-1), window-1] are normalised by (pretrained_window - 1) when a pretrained
    window is given (so a larger window extrapolates the pretrained range), else by (window - 1),
    scaled to [-8, 8] and mapped through sign(x) * log2(1 + |x|) / log2(8).

    Returns:
        (2 * window - 1, 2 * window - 1, 2) float32, last dim (dh, dw).
    """
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)
    if pretrained_window > 0:
        table = table / (pretrained_window - 1)
    elif window > 1:
        table = table / (window - 1)
    table = table * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: int) -> Tensor:
    """For every (query, key) pair of a window, the row of `relative_coords_table` (flattened).

    Returns:
        (window * window, window * window) int64.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # (2, N, N), each in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


def shift_region_mask(height: int, width: int, window: int, shift: int, value: float,
                      device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive mask that stops attention across the seams created by the cyclic shift.

    Each axis of the (padded) map splits into [0, size-window), [size-window, size-shift) and
    [size-shift, size); tokens of different (row region, column region) must not attend to each other.

    Returns:
        (nW, N, N) with 0 within a region and `value` across regions.
    """
    def regions(size: int) -> Tensor:
        idx = torch.arange(size, device=device)
        return (idx >= size - window).long() + (idx >= size - shift).long()

    region = (regions(height)[:, None] * 3 + regions(width)[None, :]).view(1, height, width, 1)
    region = window_partition(region, window)[0, :, :, 0]  # (nW, N)
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill_(different, value)


def stage_window_and_shift(resolution: tuple[int, int], window: int) -> tuple[int, int]:
    """Window and shift of a stage whose configured feature map is `resolution` (h, w).

    transformers' rule (it looks at the height only): if h <= window the whole height becomes one
    window and shifting is disabled; otherwise the window is kept and shifted blocks use window // 2.
    """
    height = resolution[0]
    if height <= window:
        return height, 0
    return window, window // 2


def window_token_index(height: int, width: int, window: int, shift: int) -> tuple[Tensor, Tensor]:
    """Flat-token indices that pad, roll and window-partition a map in one gather.

    transformers pads the (height, width) map at the bottom/right to a window multiple, rolls it by
    -shift on both axes, then partitions it. Here that whole chain is one index.

    Returns:
        gather: (Hp * Wp,) for every token in window order, its flat index in the (height * width)
            map, or height * width (an appended zero row) for padding.
        scatter: (height * width,) for every map token, its position in window order.
    """
    hp, wp = height + (-height) % window, width + (-width) % window
    rows = (torch.arange(hp) + shift) % hp  # torch.roll(x, -shift)[i] == x[(i + shift) % n]
    cols = (torch.arange(wp) + shift) % wp
    inside = (rows[:, None] < height) & (cols[None, :] < width)
    source = torch.where(inside, rows[:, None] * width + cols[None, :], height * width)
    gather = window_partition(source.view(1, hp, wp, 1), window).flatten()
    scatter = torch.empty(height * width + 1, dtype=torch.long)
    scatter[gather] = torch.arange(gather.numel())
    return gather, scatter[: height * width]


@dataclass(frozen=True)
class _RowGather:
    """A token index applied to every image of a batch, as rows of the flattened (B * T, C) map.

    Gathering along dim 0 of a contiguous matrix is a parallel row copy on CPU; along dim 1 of
    (B, T, C) it runs single-threaded at half the speed.

    Attributes:
        rows: (B * L,) source row of every output row (padding reads row 0 and is zeroed after).
        zero: output rows that are padding, or None.
    """

    rows: Tensor
    zero: Tensor | None

    @classmethod
    def build(cls, index: Tensor, batch: int, source_tokens: int) -> "_RowGather":
        """From `index` (L,), flat token positions in a map of `source_tokens`; `source_tokens` = padding."""
        pad = index == source_tokens
        offsets = torch.arange(batch, device=index.device)[:, None]
        rows = (offsets * source_tokens + index.masked_fill(pad, 0)).flatten()
        if not bool(pad.any()):
            return cls(rows, None)
        return cls(rows, (offsets * index.numel() + pad.nonzero().flatten()).flatten())

    def __call__(self, x: Tensor) -> Tensor:
        """(B * T, C) -> (B * L, C)."""
        out = x.index_select(0, self.rows)
        return out if self.zero is None else out.index_fill_(0, self.zero, 0)


class _PermuteTokens(torch.autograd.Function):
    """A `_RowGather` whose backward is its adjoint, another gather (every source row is read once).

    Both directions are plain gathers, which are far cheaper on CPU than the scatter-add that
    autograd would otherwise derive, and than roll + pad + reshape copies.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, gather: _RowGather, adjoint: _RowGather) -> Tensor:
        ctx.adjoint = adjoint
        return gather(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return ctx.adjoint(grad.contiguous()), None, None


def drop_path(x: Tensor, prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability `prob`."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    return x.div(keep) * torch.floor(mask + keep)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class _CpuAttentionWithMaskGrad(torch.autograd.Function):
    """Attention for CPU training with a trainable additive mask, keeping the probabilities.

    Forward: P = softmax(q k^T + mask), out = P v (two GEMMs, like SDPA). Backward from the saved P,
    four GEMMs and no recomputation: dv = P^T dO, dS = softmax_backward(dO v^T, P), dq = dS k,
    dk = dS^T q, dmask = sum_b dS. Storing P (N / d times the size of out) instead of out and the
    log-sum-exp is what buys that. Inputs: qkv (3, B, G, N, d), q, k, v stacked; mask (1, G, N, N).
    The GEMMs write dq, dk and dv into one stacked gradient, so nothing has to stack them again.
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, mask: Tensor) -> Tensor:
        q, k, v = qkv.unbind(0)
        scores = torch.matmul(q, k.transpose(-1, -2)).add_(mask)
        # softmax and its backward below run in place (each row is reduced before it is written),
        # so the scores buffer becomes the probabilities, and the probability gradient dS
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
        ctx.save_for_backward(qkv, probs)
        ctx.mask_dtype = mask.dtype
        return torch.matmul(probs, v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        qkv, probs = ctx.saved_tensors
        q, k, v = qkv.unbind(0)
        grad = grad.contiguous()  # it arrives token-major; two GEMMs read it, so lay it out once
        grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        dq, dk, dv = grad_qkv.unbind(0)
        torch.matmul(probs.transpose(-1, -2), grad, out=dv)
        dprobs = torch.matmul(grad, v.transpose(-1, -2))
        dscores = torch.ops.aten._softmax_backward_data.out(dprobs, probs, -1, probs.dtype, grad_input=dprobs)
        torch.matmul(dscores, k, out=dq)
        torch.matmul(dscores.transpose(-1, -2), q, out=dk)
        return grad_qkv, dscores.sum(0, keepdim=True).to(ctx.mask_dtype)


def _runs_cpu_mask_grad(device: torch.device, mask: Tensor, dropout: float) -> bool:
    """Whether `scaled_dot_product_attention` takes `_CpuAttentionWithMaskGrad` for these inputs."""
    return device.type == "cpu" and mask.requires_grad and torch.is_grad_enabled() and dropout == 0.0


def scaled_dot_product_attention(qkv: Tensor, mask: Tensor, dropout: float) -> Tensor:
    """`F.scaled_dot_product_attention(q, k, v, mask, scale=1.0)`; on CPU with a mask that needs grad,
    `_CpuAttentionWithMaskGrad` (the same math with a four-GEMM backward).

    Args:
        qkv: (3, B, G, N, d), q, k and v stacked; contiguous for `_CpuAttentionWithMaskGrad`, or
            its GEMMs copy them.
        mask: additive (1, G, N, N).
        dropout: attention-probability dropout (only the math path supports it with a trainable mask).

    Returns:
        (B, G, N, d).
    """
    if _runs_cpu_mask_grad(qkv.device, mask, dropout):
        return _CpuAttentionWithMaskGrad.apply(qkv, mask)
    q, k, v = qkv.unbind(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0)


def _cosine_factors(qkv: Tensor, scale: Tensor, dim: int) -> Tensor:
    """[s / |q|, 1 / |k|, 1] per vector, stacked along `dim` like q, k, v in `qkv` (norms of q and k only)."""
    inv_norm = qkv.narrow(dim, 0, 2).norm(dim=-1, keepdim=True).clamp_min_(1e-12).reciprocal_()
    q_inv, k_inv = inv_norm.split(1, dim=dim)
    return torch.cat((q_inv * scale, k_inv, torch.ones_like(k_inv)), dim=dim)


class _ScaledCosineQKV(torch.autograd.Function):
    """`factors * qkv` of `WindowAttention._cosine_qkv`, with a backward written for it.

    Forward: out = [q / |q| * s, k / |k|, v] (s the per-head logit scale). Backward, per vector, from
    the saved output and factors only: dq = (s dO_q - out_q (out_q . dO_q) / s) / |q|,
    dk = (dO_k - out_k (out_k . dO_k)) / |k|, dv = dO_v and ds = sum (out_q . dO_q) / s, i.e. two
    passes over the gradient where autograd's graph (multiply, cat, split, norm) takes six.
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, scale: Tensor, dim: int) -> Tensor:
        factors = _cosine_factors(qkv, scale, dim)
        out = factors * qkv
        ctx.save_for_backward(out, factors, scale)
        ctx.dim = dim
        # qkv is a permuted view of the projection's output; a gradient in that memory layout
        # passes back through the permute and view for free instead of being copied to it
        ctx.grad_layout = torch.empty_like(qkv, device="meta")
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        out, factors, scale = ctx.saved_tensors
        dim = ctx.dim
        # out . dO for q and k only (v passes straight through)
        dot = torch.linalg.vecdot(out.narrow(dim, 0, 2), grad.narrow(dim, 0, 2)).unsqueeze(-1)
        q_dot, k_dot = dot.split(1, dim)
        q_dot = q_dot / scale  # q_hat . dO_q
        q_factor, k_factor, _ = factors.split(1, dim)  # s / |q|, 1 / |k|, 1
        out_factor = torch.cat((q_factor * q_dot / scale, k_factor * k_dot), dim=dim)
        layout = ctx.grad_layout
        grad_qkv = torch.empty_strided(layout.shape, layout.stride(), dtype=grad.dtype, device=grad.device)
        torch.mul(grad, factors, out=grad_qkv)
        grad_qkv.narrow(dim, 0, 2).addcmul_(out.narrow(dim, 0, 2), out_factor, value=-1.0)  # v: dO_v as is
        return grad_qkv, q_dot.sum_to_size(scale.shape), None


class DropPath(nn.Module):
    """Module form of `drop_path` (per-sample stochastic depth)."""

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.prob, self.training)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class _BiasEpilogueLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` for 2-D float32 CPU input, the bias added inside the GEMM.

    CPU `addmm` first copies the broadcast bias into the whole (M, N) output and then accumulates
    the product onto it: one extra write and read of the output, which on a memory-bound machine
    costs up to a third of the GEMM for the stage-0 projections. oneDNN's linear
    (`torch.ops.mkldnn._linear_pointwise`, the kernel PyTorch's inductor uses for CPU linears) adds
    the bias as the GEMM writes each tile. Backward is `addmm`'s: dx = dO W, dW = dO^T x, db = sum dO.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        # x is only needed for dW: frozen weights (adapters, a frozen encoder) keep nothing extra
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        return (grad.mm(weight) if needs_x else None, grad.t().mm(x) if needs_weight else None,
                grad.sum(0) if needs_bias else None)


def _bias_epilogue_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether `linear` takes `_BiasEpilogueLinear`: CPU float32 training (autograd records) of a
    linear with a bias, oneDNN enabled, no autocast. Measured faster in a train step only (the eval
    forward was level), so everything else stays on `F.linear`."""
    return (bias is not None and x.device.type == "cpu"
            and x.dtype == weight.dtype == bias.dtype == torch.float32
            and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
            and _MKLDNN_LINEAR and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu"))


def _has_mkldnn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise.default is not None
    except (AttributeError, RuntimeError):  # a build without oneDNN, or an older op set
        return False


_MKLDNN_LINEAR = _has_mkldnn_linear()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, with the bias added inside the GEMM in CPU float32 training (`_BiasEpilogueLinear`)."""
    if not _bias_epilogue_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    out = _BiasEpilogueLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys, a LoRA target for peft) running `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class QKVLinear(Linear):
    """One fused q/k/v projection (C -> 3C) with learnable q and v biases and no k bias.

    A real `nn.Linear` subclass so that peft can wrap it as a LoRA target while the biases stay
    fused into one GEMM (`linear` with the [q_bias, 0, v_bias] vector).
    """

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """(..., C) -> (..., 3C), channels ordered [q | k | v]."""
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        return linear(x, self.weight, qkv_bias)


class WindowAttention(nn.Module):
    """Scaled cosine window attention with a continuous relative position bias.

    Args:
        dim: channels C.
        num_heads: heads h (head dim d = C / h).
        window: window side (N = window**2 tokens per window).
        pretrained_window: window the bias MLP was trained with (0: `window`).
        qkv_bias: learn q and v biases.
        attn_drop: dropout on attention probabilities.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, window: int, pretrained_window: int = 0,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.attn_drop = attn_drop
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN), nn.ReLU(inplace=True),
                                     nn.Linear(CPB_HIDDEN, num_heads, bias=False))
        self.qkv = QKVLinear(dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Input-independent geometry; recomputed from the window, so never saved.
        self.register_buffer("relative_coords_table", relative_coords_table(window, pretrained_window),
                             persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def position_bias(self) -> Tensor:
        """Continuous relative position bias, (h, N, N), in (0, 16)."""
        table = self.cpb_mlp(self.relative_coords_table.to(self.cpb_mlp[0].weight.dtype))  # (2w-1, 2w-1, h)
        n = self.window * self.window
        bias = table.view(-1, self.num_heads)[self.relative_position_index.view(-1)].view(n, n, -1)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Attend within windows.

        Args:
            x: (B, nW, N, C) windows.
            attn_mask: additive mask broadcastable to (B, nW * h, N, N): (1, h, N, N) when all
                windows share it (no shift) or (1, nW * h, N, N).

        Returns:
            (B, nW, N, C).
        """
        b, nw, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).view(b, nw, n, 3, h, d)
        dropout = self.attn_drop if self.training else 0.0
        shared_mask = attn_mask.shape[1] == h
        if shared_mask and not _runs_cpu_mask_grad(x.device, attn_mask, dropout):
            # One mask for every window: windows are the batch. q, k, v stay token-major strided
            # views (no transpose copies) and the fused kernel's output is token-major too.
            qkv = self._cosine_qkv(qkv, dim_of_qkv=3).view(b * nw, n, 3, h, d).permute(2, 0, 3, 1, 4)
            out = scaled_dot_product_attention(qkv, attn_mask, dropout).transpose(1, 2)  # (B*nW, N, h, d)
        else:
            # Head-major q, k, v, which the normalising multiply writes directly. With a mask per
            # window, windows fold into the "heads" axis so the 4-D kernel broadcasts one
            # (1, nW * h, N, N) mask over the batch instead of materialising B copies of it. CPU
            # training's attention runs plain GEMMs, which would copy token-major views to this
            # layout on every use (twice forward, twice more backward).
            qkv = self._cosine_qkv(qkv.permute(3, 0, 1, 4, 2, 5), dim_of_qkv=0)  # (3, B, nW, h, N, d)
            groups = (b * nw, h) if shared_mask else (b, nw * h)
            out = scaled_dot_product_attention(qkv.view(3, *groups, n, d), attn_mask, dropout)
            out = out.view(b, nw, h, n, d).transpose(2, 3)
        return self.proj_drop(self.proj(out.reshape(b, nw, n, c)))

    def _cosine_qkv(self, qkv: Tensor, dim_of_qkv: int) -> Tensor:
        """Scaled cosine attention inputs in one multiply: q / |q| * logit scale, k / |k|, v.

        Args:
            qkv: q, k, v stacked along `dim_of_qkv` (size 3), heads on dim -2 or -3, head dim last.
            dim_of_qkv: 3 for token-major (B, nW, N, 3, h, d); 0 for head-major (3, B, nW, h, N, d).

        Returns:
            Same shape, laid out like the broadcast factors, i.e. contiguous in `qkv`'s logical order.
            Token-major without gradient, `qkv` itself, scaled in place (it is the projection's
            fresh output, already in that layout).
        """
        scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()  # (h, 1, 1)
        if dim_of_qkv == 3:
            scale = scale.view(-1, 1)  # heads sit on dim -2 in token-major order
            needs_grad = torch.is_grad_enabled() and (qkv.requires_grad or scale.requires_grad)
            if not needs_grad and not self.qkv._forward_hooks:  # a hook may have kept the raw output
                return qkv.mul_(_cosine_factors(qkv, scale, dim_of_qkv))
        return _ScaledCosineQKV.apply(qkv, scale, dim_of_qkv)


class _GeluMlp(torch.autograd.Function):
    """fc2(gelu(fc1(x))) for 2-D float32 CPU input, as one autograd node.

    Both linears are `_BiasEpilogueLinear`'s oneDNN kernel. What fusing buys is the backward: the
    gradient of the activation is a buffer this function allocated itself (dO W2), so GELU's
    backward overwrites it instead of writing a second (M, 4C) buffer. Saved: x (for dW1), the
    pre-activation, the activation (for dW2), exactly what the three separate nodes keep; an input
    of a frozen weight's gradient is not kept.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                approximate: str) -> Tensor:
        hidden = torch.ops.mkldnn._linear_pointwise(x, fc1_weight, fc1_bias, "none", [], "")
        activated = F.gelu(hidden, approximate=approximate)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, fc1_weight, hidden,
                              activated if ctx.needs_input_grad[3] else None, fc2_weight)
        ctx.approximate = approximate
        return torch.ops.mkldnn._linear_pointwise(activated, fc2_weight, fc2_bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, fc1_weight, hidden, activated, fc2_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        fc2_grads = (grad.t().mm(activated) if needs[3] else None, grad.sum(0) if needs[4] else None)
        grad_hidden = grad.mm(fc2_weight)
        torch.ops.aten.gelu_backward.grad_input(grad_hidden, hidden, approximate=ctx.approximate,
                                                grad_input=grad_hidden)
        return (grad_hidden.mm(fc1_weight) if needs[0] else None, grad_hidden.t().mm(x) if needs[1] else None,
                grad_hidden.sum(0) if needs[2] else None, *fc2_grads, None)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 -> dropout, on (..., C).

    In CPU float32 training with GELU, runs as `_GeluMlp` while the three parts are this module's
    own (not wrapped, e.g. by a peft LoRA layer, and without hooks, which must see each output).
    """

    def __init__(self, dim: int, hidden: int, act: str = "gelu", drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = _ACTIVATIONS[act]()
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        if self._runs_fused(x):
            flat = _GeluMlp.apply(x.reshape(-1, x.shape[-1]), self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                  self.fc2.bias, self.act.approximate)
            return self.drop(flat.view(*x.shape[:-1], flat.shape[-1]))
        hidden = self.fc1(x)
        # With no gradient to keep the pre-activation for, activate in place: no second (B, L, 4C)
        # buffer to allocate and fault in, which cost as much as the activation itself.
        hidden = self.act(hidden) if hidden.requires_grad else _activate_(self.act, hidden)
        return self.drop(self.fc2(hidden))

    def _runs_fused(self, x: Tensor) -> bool:
        """Whether `forward` takes `_GeluMlp` (see the class docstring)."""
        parts = (self.fc1, self.act, self.fc2)
        return (type(self.fc1) is Linear and type(self.fc2) is Linear and type(self.act) is nn.GELU
                and not any(m._forward_hooks or m._forward_pre_hooks for m in parts)
                and _bias_epilogue_applies(x, self.fc1.weight, self.fc1.bias)
                and self.fc2.bias is not None and self.fc2.weight.dtype == self.fc2.bias.dtype == torch.float32)


def _activate_(act: nn.Module, x: Tensor) -> Tensor:
    """`act(x)` written into `x` for the activations of `_ACTIVATIONS`."""
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if isinstance(act, nn.ReLU):
        return x.relu_()
    if isinstance(act, nn.SiLU):
        return F.silu(x, inplace=True)
    return act(x)


class SwinV2Block(nn.Module):
    """Residual post-norm block: x + norm1(W-MSA(x)), then x + norm2(MLP(x)), on (B, H, W, C).

    Args:
        dim: channels.
        num_heads: attention heads.
        window: window side for this block (already clipped for small stages).
        shift: cyclic shift (0 for regular windows).
        pretrained_window: see `WindowAttention`.
        cfg: the model config (dropout rates, eps, activation, mask value).
        drop_path_prob: stochastic depth probability of both residual branches.
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, pretrained_window: int,
                 cfg: SwinV2Config, drop_path_prob: float = 0.0) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.mask_value = cfg.shift_mask_value
        self.attn = WindowAttention(dim, num_heads, window, pretrained_window, cfg.qkv_bias,
                                    cfg.attn_drop_rate, cfg.attn_drop_rate)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.hidden_act, cfg.drop_rate)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.drop_path = DropPath(drop_path_prob)
        self._shift_masks: dict[tuple, Tensor] = {}
        self._token_indices: dict[tuple, tuple[_RowGather, _RowGather]] = {}
        self._mask_cache: dict[tuple, Tensor] = {}

    # -- masks ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "SwinV2Block":
        # A cached (detached) mask must never leak into training; drop it on every mode switch.
        self._mask_cache.clear()
        return super().train(mode)

    def _shift_mask(self, height: int, width: int, ref: Tensor) -> Tensor:
        """(nW, 1, N, N) shift-region mask; depends on no weights, so it is always cached."""
        key = (height, width, ref.device, ref.dtype)
        if key not in self._shift_masks:
            mask = shift_region_mask(height, width, self.window, self.shift, self.mask_value, ref.device, ref.dtype)
            self._shift_masks = {key: mask.unsqueeze(1)}
        return self._shift_masks[key]

    def _build_mask(self, height: int, width: int, ref: Tensor) -> Tensor:
        """Position bias plus shift mask: (1, h, N, N) without shift, else (1, nW * h, N, N)."""
        bias = self.attn.position_bias().to(ref.dtype)  # (h, N, N)
        if not self.shift:
            return bias.unsqueeze(0)
        n = bias.shape[-1]
        return (bias.unsqueeze(0) + self._shift_mask(height, width, ref)).reshape(1, -1, n, n)

    def _bias_version(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.attn.cpb_mlp.parameters())

    def attention_mask(self, height: int, width: int, ref: Tensor) -> Tensor:
        """The SDPA mask for a padded (height, width) map, cached when no gradient can need it."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.attn.cpb_mlp.parameters())
        if self.training or needs_grad:
            return self._build_mask(height, width, ref)
        key = (height, width, ref.device, ref.dtype, self._bias_version())
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = self._build_mask(height, width, ref).detach()
            self._mask_cache = {key: mask}  # one shape at a time: bounded memory
        return mask

    # -- forward -------------------------------------------------------------------------------
    def _token_gathers(self, batch: int, height: int, width: int, device: torch.device) -> tuple[_RowGather, _RowGather]:
        """(map -> windows, windows -> map) row gathers for this block's window and shift, cached.

        They depend on no weights; a few batch sizes are kept (sub-batches of a stage differ).
        """
        key = (batch, height, width, device)
        if key not in self._token_indices:
            gather, scatter = window_token_index(height, width, self.window, self.shift)
            gather, scatter = gather.to(device), scatter.to(device)
            if len(self._token_indices) >= 4:
                self._token_indices.clear()
            self._token_indices[key] = (_RowGather.build(gather, batch, height * width),
                                        _RowGather.build(scatter, batch, gather.numel()))
        return self._token_indices[key]

    def _shifted_window_attention(self, x: Tensor) -> Tensor:
        """Pad to the window, roll, attend per window, unroll, crop: (B, H, W, C) -> same.

        Pad + roll + partition is one gather and its inverse one more (`window_token_index`).
        """
        b, height, width, c = x.shape
        hp, wp = height + (-height) % self.window, width + (-width) % self.window
        to_windows, to_map = self._token_gathers(b, height, width, x.device)
        windows = _PermuteTokens.apply(x.reshape(b * height * width, c), to_windows, to_map)
        out = self.attn(windows.view(b, -1, self.window * self.window, c), self.attention_mask(hp, wp, x))
        out = _PermuteTokens.apply(out.reshape(b * hp * wp, c), to_map, to_windows)
        return out.view(b, height, width, c)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        # the residual is added into the normalised branch, a fresh tensor that no backward reads
        # (unless a forward hook on the norm kept it: then out of place)
        branch = self.drop_path(self.norm1(self._shifted_window_attention(x)))
        x = x + branch if self.norm1._forward_hooks else branch.add_(x)
        branch = self.drop_path(self.norm2(self.mlp(x)))
        return x + branch if self.norm2._forward_hooks else branch.add_(x)


class PatchMerging(nn.Module):
    """V2 patch merging: 2x2 neighbourhood concat -> Linear(4C, 2C) -> LayerNorm(2C).

    Concatenation order is (0,0), (1,0), (0,1), (1,1) in (row, col) offsets, as in the Microsoft,
    timm, torchvision and transformers implementations. Odd sides are zero-padded first.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=DEFAULT_LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        # (B, H/2, row-off, W/2, col-off, C) -> (B, H/2, W/2, col-off, row-off, C): row offset varies fastest.
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.norm(self.reduction(x))


class SwinV2Stage(nn.Module):
    """Blocks at one resolution, then (except for the last stage) patch merging.

    Args:
        dim: channels of this stage.
        depth: number of blocks.
        num_heads: attention heads.
        resolution: configured (h, w) feature map of this stage (fixes window and shift).
        pretrained_window: see `WindowAttention`.
        cfg: the model config.
        drop_path_probs: one stochastic depth probability per block.
        downsample: end the stage with patch merging.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, resolution: tuple[int, int], pretrained_window: int,
                 cfg: SwinV2Config, drop_path_probs: list[float], downsample: bool) -> None:
        super().__init__()
        window, shift = stage_window_and_shift(resolution, cfg.window_size)
        self.window, self.shift = window, shift
        self.blocks = nn.ModuleList([
            SwinV2Block(dim, num_heads, window, 0 if i % 2 == 0 else shift, pretrained_window, cfg, drop_path_probs[i])
            for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None
        self.grad_checkpointing = False
        self.chunk_bytes = None if cfg.chunk_mib is None else cfg.chunk_mib * 2**20
        self.hidden = self.blocks[0].mlp.fc1.out_features if depth else dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, W, C) -> (stage output (B, H, W, C), next stage input (B, H', W', C')).

        Runs on sub-batches of whole images when the batch's MLP activation exceeds `chunk_mib`.
        """
        b, h, w, _ = x.shape
        per_image = h * w * self.hidden * x.element_size()
        images = b if self.chunk_bytes is None else max(1, int(self.chunk_bytes // per_image))
        if images >= b:
            return self._forward(x)
        parts = [self._forward(part) for part in x.split(images)]
        out = torch.cat([p[0] for p in parts])
        return out, (torch.cat([p[1] for p in parts]) if self.downsample is not None else out)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection then LayerNorm; pads the image to a patch multiple.

    The projection keeps the checkpoints' Conv2d parameter, but runs as what a convolution with
    stride == kernel is: one GEMM over the flattened patches, whose output is already channels-last.
    The convolution would produce NCHW and cost a layout copy of the (B, h, w, C) map both ways.
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=DEFAULT_LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), C)."""
        p = self.patch_size
        pad_b, pad_r = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        if not self._projection_is_patch_gemm():
            return self.norm(self.proj(x).permute(0, 2, 3, 1))
        b, c, h, w = x.shape
        # (B, C_in, h, p, w, p) -> (B, h, w, C_in, p, p): each patch flattened like the kernel
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, -1)
        weight = self.proj.weight
        return self.norm(linear(patches, weight.reshape(weight.shape[0], -1), self.proj.bias))

    def _projection_is_patch_gemm(self) -> bool:
        """Whether `proj` is still the plain stride == kernel convolution built here. A wrapped or
        hooked one (a peft adapter, a feature hook) or a reconfigured one runs as a module."""
        conv, p = self.proj, self.patch_size
        return (type(conv) is nn.Conv2d and conv.kernel_size == conv.stride == (p, p) and conv.padding == (0, 0)
                and conv.dilation == (1, 1) and conv.groups == 1 and not conv._forward_hooks
                and not conv._forward_pre_hooks)


class SwinTransformerV2(nn.Module):
    """Swin Transformer V2 backbone (no classification head).

    `forward` returns a `SwinV2Output` whose `last_hidden_state` and `pooler_output` match
    transformers' `Swinv2Model` given converted weights (see `models.swinv2.convert`).
    """

    def __init__(self, cfg: SwinV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        probs = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        grid = (cfg.img_size[0] // cfg.patch_size, cfg.img_size[1] // cfg.patch_size)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            start = sum(cfg.depths[:i])
            self.layers.append(SwinV2Stage(
                cfg.stage_dim(i), depth, cfg.num_heads[i], (grid[0] // 2**i, grid[1] // 2**i),
                cfg.pretrained_window_sizes[i], cfg, probs[start:start + depth], downsample=i < cfg.num_stages - 1))
        self.num_features = cfg.stage_dim(cfg.num_stages - 1)
        self.norm = nn.LayerNorm(self.num_features, eps=cfg.layer_norm_eps)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Truncated-normal Linear weights, zero biases (the reference initialisation)."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- introspection ---------------------------------------------------------------------------
    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """Per stage: output channels, stride in input pixels and module name (timm convention)."""
        return [dict(num_chs=self.cfg.stage_dim(i), reduction=self.cfg.patch_size * 2**i, module=f"layers.{i}")
                for i in range(self.cfg.num_stages)]

    def grid_size(self, image_size: tuple[int, int], stage: int = -1) -> tuple[int, int]:
        """Token grid (h, w) of `stage` for an input of (height, width) pixels."""
        stage = stage % self.cfg.num_stages
        h = math.ceil(image_size[0] / self.cfg.patch_size)
        w = math.ceil(image_size[1] / self.cfg.patch_size)
        for _ in range(stage):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return h, w

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameter names for layer-wise LR / freezing (timm convention)."""
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+)\.blocks\.(\d+)", None),
            (r"^layers\.(\d+)\.downsample", (99998,)),  # merging ends its stage, after its blocks
            (r"^norm", (99999,)),
        ])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    # -- forward ---------------------------------------------------------------------------------
    def forward_features(self, pixel_values: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Backbone without pooling.

        Args:
            pixel_values: (B, C_in, H, W).

        Returns:
            (final map after the final norm, (B, h, w, C); per-stage maps before downsampling,
            [(B, h_i, w_i, C_i)]).
        """
        x = self.pos_drop(self.patch_embed(pixel_values))
        stages = []
        for stage in self.layers:
            out, x = stage(x)
            stages.append(out)
        return self.norm(x), stages

    def forward_head(self, features: Tensor) -> Tensor:
        """Mean-pool a (B, h, w, C) map to (B, C)."""
        return features.mean(dim=(1, 2))

    def forward(self, pixel_values: Tensor) -> SwinV2Output:
        """(B, C_in, H, W) images -> `SwinV2Output` (tokens row-major over each grid)."""
        features, stages = self.forward_features(pixel_values)
        b, h, w, c = features.shape
        return SwinV2Output(
            last_hidden_state=features.reshape(b, h * w, c),
            pooler_output=self.forward_head(features),
            stage_outputs=[s.reshape(b, -1, s.shape[-1]) for s in stages],
            stage_grids=[(s.shape[1], s.shape[2]) for s in stages],
        )
