"""VisionProjector: encoder tokens -> LLM hidden size, InternVL's projector form.

Per selected encoder stage: optional pixel shuffle (s x s neighbouring tokens merged into one token
of s*s*C channels; odd grids are padded, not cropped), then LayerNorm -> Linear -> GELU -> Linear.
Several stages (hierarchical Swin features) are projected separately and concatenated along tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pixel_shuffle(tokens: torch.Tensor, grid: tuple[int, int], scale: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Merge `scale` x `scale` neighbouring tokens into one, channel order as InternVL's `pixel_shuffle`.

    Args:
        tokens: (B, h*w, C), row-major over `grid`.
        grid: (h, w).
        scale: merge factor s; 1 returns the input.

    Returns:
        (B, ceil(h/s) * ceil(w/s), C*s*s) and the new grid. Odd grids are zero-padded at the
        bottom/right first.
    """
    if scale == 1:
        return tokens, grid
    b, _, c = tokens.shape
    h, w = grid
    x = tokens.reshape(b, h, w, c)
    x = F.pad(x, (0, 0, 0, (-w) % scale, 0, (-h) % scale))  # (B, H', W', C), H' and W' multiples of s
    hp, wp = x.shape[1], x.shape[2]
    x = x.reshape(b, hp, wp // scale, c * scale)  # fold s columns into channels
    x = x.permute(0, 2, 1, 3).reshape(b, wp // scale, hp // scale, c * scale * scale)  # fold s rows
    x = x.permute(0, 2, 1, 3)  # (B, H'/s, W'/s, C*s*s)
    new_grid = (hp // scale, wp // scale)
    return x.reshape(b, new_grid[0] * new_grid[1], -1), new_grid


class MLPProjector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear (InternVL's `multi_modal_projector` layout)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) -> (B, N, out_dim)."""
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class VisionProjector(nn.Module):
    """Projects the tokens of one or more encoder stages into the LLM's hidden size.

    Args:
        stage_channels: channels of each selected stage, in `stage_indices` order.
        stage_indices: which `EncoderOutput.stages` entries to use (negative indices allowed).
        out_dim: the LLM hidden size.
        pixel_shuffle: merge factor s (1 = off).
        hidden_dim: MLP width; None = `out_dim`.
    """

    def __init__(self, stage_channels: list[int], stage_indices: list[int], out_dim: int, pixel_shuffle: int = 1,
                 hidden_dim: int | None = None) -> None:
        super().__init__()
        if len(stage_channels) != len(stage_indices):
            raise ValueError(f"{len(stage_channels)} stage widths for {len(stage_indices)} stage indices")
        if pixel_shuffle < 1:
            raise ValueError(f"pixel_shuffle must be >= 1, got {pixel_shuffle}")
        self.stage_indices = list(stage_indices)
        self.scale = pixel_shuffle
        s2 = pixel_shuffle * pixel_shuffle
        self.projectors = nn.ModuleList(
            MLPProjector(c * s2, hidden_dim or out_dim, out_dim) for c in stage_channels)

    def num_tokens(self, grids: list[tuple[int, int]]) -> int:
        """Tokens produced for the given grids of the selected stages."""
        s = self.scale
        return sum(-(-h // s) * -(-w // s) for h, w in grids)

    def forward(self, stages: list[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor:
        """Encoder stage tokens [(B, N_i, C_i)] with grids [(h_i, w_i)] -> (B, sum of N_i', D)."""
        out = []
        for projector, index in zip(self.projectors, self.stage_indices):
            tokens, _ = pixel_shuffle(stages[index], grids[index], self.scale)
            out.append(projector(tokens))
        return torch.cat(out, dim=1)
