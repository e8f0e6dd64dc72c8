"""Gradient checkpointing (the stage option `gradient_checkpointing`) really checkpoints, for every encoder.

With it on, a stage training the encoder saves far fewer bytes for backward (counted by
`train.saved_tensors.SavedTensorCounter`, the counter behind the dry run's activation estimate)
and gets the same gradients; an adapter whose `set_grad_checkpointing` did nothing fails here.
"""

from __future__ import annotations

import pytest
import torch

from config.schema import StageConfig
from models.build import build_model
from models.encoders import encoder_names
from tests.conftest import make_config
from train.saved_tensors import SavedTensorCounter, model_tensors
from train.trainability import apply_stage

STAGE = StageConfig(name="encoder", trainable=["vision.all", "projector", "fusion", "head"])


def saved_bytes_and_grads(model, pixels: torch.Tensor, labels: torch.Tensor, checkpointing: bool
                          ) -> tuple[int, dict[str, torch.Tensor]]:
    """One training forward + backward: bytes saved for backward and every gradient."""
    model.vision.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    with SavedTensorCounter(model_tensors(model)) as counter:
        loss = model(pixels, labels=labels).loss
    loss.backward()
    return counter.bytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", encoder_names())
def test_checkpointing_cuts_saved_activations_and_keeps_gradients(name, tiny_checkpoints):
    model = build_model(make_config(tiny_checkpoints, name).model).train()
    apply_stage(model, STAGE, model.parameter_groups(), [f"vision.{g}" for g in model.vision.depth_groups])
    pixels, labels = torch.randn(2, 3, *model.preprocessing.size), torch.tensor([0, 2])
    plain, ref = saved_bytes_and_grads(model, pixels, labels, checkpointing=False)
    checkpointed, grads = saved_bytes_and_grads(model, pixels, labels, checkpointing=True)
    assert checkpointed < 0.6 * plain, f"{name}: {checkpointed:,} bytes saved with checkpointing, {plain:,} without"
    assert grads.keys() == ref.keys() and any(n.startswith("vision.") for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {n}: {m}")
