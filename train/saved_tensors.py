"""Counting what autograd keeps for backward: the activation memory of a training step.

`SavedTensorCounter` is a `torch.autograd.graph.saved_tensors_hooks` pair that adds up the bytes of
every tensor an op saves for its backward while the counter is active. The same forward counted
on the meta device (no storage, shapes only) gives the activation estimate of `train.plan`; counted
on real tensors it shows what gradient checkpointing saves (tests/test_plan.py).

What is counted once, and what not at all:
    - a tensor saved by several ops (an op's output is often saved by the op that made it and by the
      next one) counts once;
    - a view (a transpose, a reshape that needs no copy, an expand) counts as the tensor it views,
      which is what holds the memory: a 1-element tensor expanded to a big shape costs 1 element;
    - parameters and buffers (and views of them, such as the `weight.t()` a Linear saves) are not
      activations: they are in memory anyway, counted as weights.
Inside a gradient-checkpointed region torch's own hooks take over and nothing is saved; what the
checkpoint holds to recompute from (each region's inputs) is not seen here either. A region's input
is usually the previous region's output, so this leaves out one (B, N, C) tensor per region.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch


class SavedTensorCounter(torch.autograd.graph.saved_tensors_hooks):
    """Bytes saved for backward while active (`with SavedTensorCounter(model.parameters()) as c: ...`).

    Args:
        exclude: tensors that are not activations (the model's parameters and buffers).

    Attributes:
        bytes_by_dtype: saved bytes per dtype, each storage once.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__(self._pack, self._unpack)
        self._excluded = {id(t) for t in exclude}
        self._held: dict[int, torch.Tensor] = {}  # id -> the tensor, held so an id is never reused meanwhile
        self.bytes_by_dtype: dict[torch.dtype, int] = defaultdict(int)

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        owner = tensor._base if tensor._base is not None else tensor  # a view's memory is its base's
        key = id(owner)
        if key not in self._excluded and key not in self._held:
            self._held[key] = owner
            self.bytes_by_dtype[owner.dtype] += owner.untyped_storage().nbytes()
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> "SavedTensorCounter":
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._held.clear()  # the counts stay; the tensors are the autograd graph's again


def model_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """`module`'s parameters and buffers: what `SavedTensorCounter` should not count as activations."""
    return [*module.parameters(), *module.buffers()]
