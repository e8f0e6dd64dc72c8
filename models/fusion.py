"""Gated cross-attention: text states (queries) attend to projected image tokens (keys/values).

Flamingo-style pre-norm blocks whose residual branches are scaled by tanh of a zero-initialised gate,
so an untrained block passes the text states through unchanged. Attention runs through
`torch.nn.functional.scaled_dot_product_attention` (fused kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention from `x` (B, T, D) to `context` (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)  # one matmul for keys and values
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) queries, context (B, N, D) keys/values -> (B, T, D)."""
        b, t, d = x.shape
        h = self.num_heads
        q = self.q_proj(x).view(b, t, h, d // h).transpose(1, 2)  # (B, h, T, hd)
        k, v = self.kv_proj(context).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, N, hd)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class TanhGate(nn.Module):
    """Scales a residual branch by tanh(alpha); alpha starts at 0, so the branch starts closed.

    A module of its own so the gates form an exact parameter group (`fusion.gates`) that a stage can
    give its own learning rate: a closed gate opens only as fast as its LR lets it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha) * x


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(g_attn) * attn(LN(x), LN(img)); then x + tanh(g_mlp) * MLP(LN(x)); gates start at 0."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, dropout)
        self.attn_gate = TanhGate()
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.mlp_gate = TanhGate()

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) text states, image_tokens (B, N, D) -> (B, T, D)."""
        x = x + self.attn_gate(self.attn(self.norm_q(x), self.norm_kv(image_tokens)))
        return x + self.mlp_gate(self.mlp(self.norm_mlp(x)))


class CrossAttentionFusion(nn.Module):
    """A stack of `GatedCrossAttentionBlock`s."""

    def __init__(self, dim: int, num_blocks: int, num_heads: int, mlp_ratio: float = 2.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(num_blocks))

    def forward(self, text_states: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """text_states (B, T, D) attend to image_tokens (B, N, D) -> (B, T, D)."""
        for block in self.blocks:
            text_states = block(text_states, image_tokens)
        return text_states
