"""Swin Transformer V2 (arXiv 2111.09883) in plain PyTorch, weight-compatible with transformers' Swinv2Model.

Reads top to bottom: pure helpers (window partition / reverse, log-spaced relative coordinates and
their index, shift-region mask, stochastic depth), then the modules (fused qkv projection, window
attention, MLP, block, patch merging, stage, patch embedding) and finally the model.

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

Attention is `F.scaled_dot_product_attention` with `scale=1.0`: q is L2-normalised and multiplied
by the clamped, exponentiated per-head logit scale, k is L2-normalised, and the continuous position
bias (16 * sigmoid(MLP(log-spaced coords))) plus the shift mask is the `attn_mask`. It is called
through `cpu_kernels.attention`, which runs the same math as a CPU kernel in CPU float32 training
(`models/swinv2/cpu_kernels.py`); everywhere else it is SDPA itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import cpu_kernels

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
    "sub_batch_mib",
]

# Continuous position bias MLP width, fixed by the paper and every released checkpoint.
CPB_HIDDEN = 512
# Upper clamp of the learnable log logit scale: exp(scale) <= 1 / 0.01 = 100.
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
# LayerNorms that transformers builds without `layer_norm_eps` (patch embedding, patch merging).
DEFAULT_LN_EPS = 1e-5
# Sub-batch size of `chunk_mib="auto"` on CPU, measured (docs/benchmarks.md); accelerators run whole batches.
CPU_CHUNK_MIB = 16.0

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
        chunk_mib: sub-batch size in MiB, "auto", or None. A stage whose largest transient tensor
            (the MLP hidden activation, tokens x mlp_ratio x C elements) would exceed this many MiB
            for the whole batch runs its blocks on sub-batches of whole images (at least one) and
            concatenates the results: every op is per image, so the output is the same. It works
            around glibc's allocator on CPU (every allocation above 32 MiB is mapped afresh and
            page-faulted in on each use; docs/benchmarks.md). "auto" (the default): `CPU_CHUNK_MIB`
            on CPU, no sub-batches on any other device; a number applies on every device; None never
            splits. Not part of the architecture: not converted, not saved with the weights.
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
    chunk_mib: float | str | None = "auto"

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
        if self.chunk_mib not in (None, "auto") and not (isinstance(self.chunk_mib, (int, float))
                                                         and self.chunk_mib > 0):
            raise ValueError(f'chunk_mib must be a positive number of MiB, "auto" or None, got {self.chunk_mib!r}')

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


def sub_batch_mib(chunk_mib: float | str | None, device: torch.device) -> float | None:
    """The sub-batch size that `SwinV2Config.chunk_mib` means on `device` (None: no sub-batches)."""
    if chunk_mib == "auto":
        return CPU_CHUNK_MIB if device.type == "cpu" else None
    return chunk_mib


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

class DropPath(nn.Module):
    """Module form of `drop_path` (per-sample stochastic depth)."""

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.prob, self.training)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class QKVLinear(nn.Linear):
    """One fused q/k/v projection (C -> 3C) with learnable q and v biases and no k bias.

    An `nn.Linear` subclass so that peft can wrap it as a LoRA target, while the biases stay in one
    GEMM (the [q_bias, 0, v_bias] vector).
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
        return F.linear(x, self.weight, qkv_bias)


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
        self.proj = nn.Linear(dim, dim)
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

    def cosine_factors(self, qkv: Tensor) -> Tensor:
        """[s / |q|, 1 / |k|, 1] for q, k, v stacked on dim 0 (s the clamped, exponentiated logit
        scale): `qkv * factors` is `F.normalize(q) * s`, `F.normalize(k)`, v.

        Args:
            qkv: (3, B, nW, h, N, d).

        Returns:
            (3, B, nW, h, N, 1).
        """
        scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()  # (h, 1, 1)
        inv_norm = 1.0 / qkv[:2].norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
        return torch.cat((inv_norm[:1] * scale, inv_norm[1:], torch.ones_like(inv_norm[1:])))

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Attend within windows.

        Args:
            x: (B, nW, N, C) windows.
            attn_mask: additive, (1, h, N, N) when every window shares it (no shift), else
                (1, nW * h, N, N) (see `SwinV2Block.attention_mask`).

        Returns:
            (B, nW, N, C).
        """
        b, nw, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).view(b, nw, n, 3, h, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, d)
        qkv = self.cosine_factors(qkv) * qkv  # one write, laid out head-major like the factors
        # A shared mask: windows are the batch. A mask per window: windows fold into the heads axis,
        # so one (1, nW * h, N, N) mask broadcasts over the batch instead of being materialised B times.
        groups = (b * nw, h) if attn_mask.shape[1] == h else (b, nw * h)
        dropout = self.attn_drop if self.training else 0.0
        out = cpu_kernels.attention(qkv.view(3, *groups, n, d), attn_mask, dropout)  # (B', G, N, d)
        out = out.view(b, nw, h, n, d).transpose(2, 3).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 -> dropout, on (..., C)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


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
        self._shift_mask: tuple[tuple, Tensor] | None = None
        self._token_rows: dict[tuple, tuple[Tensor, Tensor, Tensor | None]] = {}

    def padded(self, height: int, width: int) -> tuple[int, int]:
        """A (height, width) map's size once padded to a window multiple."""
        return height + (-height) % self.window, width + (-width) % self.window

    def attention_mask(self, height: int, width: int, ref: Tensor) -> Tensor:
        """Position bias plus shift mask for a (height, width) map: (1, h, N, N) without shift,
        else (1, nW * h, N, N). Computed from the weights on every call (it carries their gradient)."""
        bias = self.attn.position_bias().to(ref.dtype).unsqueeze(0)  # (1, h, N, N)
        if not self.shift:
            return bias
        hp, wp = self.padded(height, width)
        key = (hp, wp, ref.device, ref.dtype)
        if self._shift_mask is None or self._shift_mask[0] != key:  # depends on no weights: kept
            mask = shift_region_mask(hp, wp, self.window, self.shift, self.mask_value, ref.device, ref.dtype)
            self._shift_mask = (key, mask.unsqueeze(1))
        n = bias.shape[-1]
        return (bias + self._shift_mask[1]).view(1, -1, n, n)

    def token_rows(self, batch: int, height: int, width: int, device: torch.device) -> tuple[Tensor, ...]:
        """Row indices that turn a flattened (B * H * W, C) map into windows and back.

        Returns:
            to_windows: (B * L,) source row of every window token (L = padded tokens per image).
            to_map: (B * H * W,) row of every map token among the window tokens.
            padding: (B * L, 1) True on padding rows, or None without padding.
        """
        key = (batch, height, width, device)
        if key not in self._token_rows:
            gather, scatter = window_token_index(height, width, self.window, self.shift)
            tokens, length = height * width, gather.numel()
            offsets = torch.arange(batch)[:, None]
            pad = gather == tokens
            to_windows = (offsets * tokens + gather.masked_fill(pad, 0)).flatten()
            to_map = (offsets * length + scatter).flatten()
            padding = pad.expand(batch, -1).reshape(-1, 1).to(device) if bool(pad.any()) else None
            if len(self._token_rows) >= 4:  # a few batch sizes (sub-batches differ): bounded memory
                self._token_rows.clear()
            self._token_rows[key] = (to_windows.to(device), to_map.to(device), padding)
        return self._token_rows[key]

    def shifted_window_attention(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Pad to the window, roll, attend per window, roll back, crop: (B, H, W, C) -> same.

        Pad + roll + window partition is one row gather (`window_token_index`) and its inverse one more.
        """
        b, height, width, c = x.shape
        to_windows, to_map, padding = self.token_rows(b, height, width, x.device)
        windows = x.reshape(-1, c).index_select(0, to_windows)
        if padding is not None:
            windows = windows.masked_fill(padding, 0.0)
        out = self.attn(windows.view(b, -1, self.window * self.window, c), attn_mask)
        return out.reshape(-1, c).index_select(0, to_map).view(b, height, width, c)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C); `attn_mask` from `attention_mask` (computed here if None)."""
        if attn_mask is None:
            attn_mask = self.attention_mask(x.shape[1], x.shape[2], x)
        x = x + self.drop_path(self.norm1(self.shifted_window_attention(x, attn_mask)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


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
        self.chunk_mib = cfg.chunk_mib
        self.hidden = int(dim * cfg.mlp_ratio)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, W, C) -> (stage output (B, H, W, C), next stage input (B, H', W', C')).

        Runs on sub-batches of whole images when the batch's MLP activation exceeds the sub-batch
        size (`SwinV2Config.chunk_mib`, resolved for `x`'s device by `sub_batch_mib`).
        """
        b, h, w, _ = x.shape
        mib = sub_batch_mib(self.chunk_mib, x.device)
        per_image = h * w * self.hidden * x.element_size()
        images = b if mib is None else max(1, int(mib * 2**20 // per_image))
        masks = [block.attention_mask(h, w, x) for block in self.blocks]  # once, shared by sub-batches
        if images >= b:
            return self._forward(x, masks)
        parts = [self._forward(part, masks) for part in x.split(images)]
        out = torch.cat([p[0] for p in parts])
        return out, (torch.cat([p[1] for p in parts]) if self.downsample is not None else out)

    def _forward(self, x: Tensor, masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        for block, mask in zip(self.blocks, masks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (a stride == kernel convolution) then LayerNorm; pads the
    image to a patch multiple."""

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
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


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
        # on the CPU: plain floats are needed, also when the model is built under torch.device("meta")
        probs = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
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
