"""In-house Swin V2 behaviour: weights updates seen at once, sub-batches, checkpointing, stochastic depth, introspection."""

from __future__ import annotations

import re

import pytest
import torch

from models.swinv2 import SwinTransformerV2, SwinV2Config
from models.swinv2.model import (CPU_CHUNK_MIB, SwinV2Block, relative_position_index, shift_region_mask,
                                 sub_batch_mib, window_partition, window_reverse)

CFG = SwinV2Config(img_size=(64, 64), patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4),
                   window_size=4, pretrained_window_sizes=(0, 0, 0), drop_path_rate=0.0)


def randomized(cfg: SwinV2Config = CFG, seed: int = 0) -> SwinTransformerV2:
    torch.manual_seed(seed)
    model = SwinTransformerV2(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def cpb_params(model: SwinTransformerV2) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "cpb_mlp" in n]


def test_window_partition_round_trip() -> None:
    x = torch.randn(2, 8, 12, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2, 6, 16, 5)
    assert torch.equal(windows[0, 1], x[0, :4, 4:8].reshape(16, 5))  # row-major over windows
    assert torch.equal(window_reverse(windows, 4, 8, 12), x)


def test_shift_mask_blocks_only_cross_region_pairs() -> None:
    mask = shift_region_mask(8, 8, 4, 2, -100.0)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds one region
    assert (mask[3] != 0).any() and (mask[3].diagonal() == 0).all()
    assert relative_position_index(3).max() == (2 * 3 - 1) ** 2 - 1


def test_output_shapes_and_feature_info() -> None:
    model = randomized().eval()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        out = model(x)
    info = model.feature_info
    assert [i["num_chs"] for i in info] == [16, 32, 64]
    assert [i["reduction"] for i in info] == [4, 8, 16]
    for stage, (tokens, grid) in enumerate(zip(out.stage_outputs, out.stage_grids)):
        assert grid == model.grid_size((70, 90), stage)
        assert tokens.shape == (2, grid[0] * grid[1], info[stage]["num_chs"])
    assert out.last_hidden_state.shape == (2, 5 * 6, 64)
    assert torch.allclose(out.pooler_output, out.last_hidden_state.mean(1))
    assert torch.isfinite(out.last_hidden_state).all()


def test_every_parameter_gets_a_gradient() -> None:
    model = randomized().train()
    model(torch.randn(2, 3, 64, 64)).last_hidden_state.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_eval_and_train_outputs_agree_without_dropout() -> None:
    model = randomized().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = model(x).last_hidden_state
        again = model(x).last_hidden_state
    model.train()
    fresh = model(x).last_hidden_state  # the CPU training attention kernel
    assert torch.equal(first, again)
    assert torch.allclose(first, fresh, atol=1e-5)  # fused vs kernel rounding


def test_loading_weights_in_eval_is_seen_at_once() -> None:
    model, other = randomized(seed=0).eval(), randomized(seed=1).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(x).last_hidden_state, other(x).last_hidden_state)


def test_optimizer_step_in_eval_is_seen_at_once() -> None:
    model = randomized().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x).last_hidden_state
    optimizer = torch.optim.SGD(cpb_params(model), lr=1.0)
    model(x).last_hidden_state.pow(2).sum().backward()  # eval mode, grad enabled: bias must get gradients
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cpb_params(model))
    optimizer.step()
    with torch.no_grad():
        after = model(x).last_hidden_state
        reference = SwinTransformerV2(CFG).eval()
        reference.load_state_dict(model.state_dict())
        assert not torch.allclose(before, after)
        assert torch.equal(after, reference(x).last_hidden_state)


def test_token_index_cache_follows_input_shape() -> None:
    model = randomized().eval()
    with torch.no_grad():
        for shape in [(64, 64), (48, 80), (64, 64)]:
            x = torch.randn(1, 3, *shape)
            uncached = SwinTransformerV2(CFG).eval()
            uncached.load_state_dict(model.state_dict())
            assert torch.equal(model(x).last_hidden_state, uncached(x).last_hidden_state)


def test_gradient_checkpointing_gives_same_outputs_and_grads() -> None:
    model = randomized().train()
    x = torch.randn(2, 3, 64, 64)
    model(x).last_hidden_state.sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).last_hidden_state.sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[name], atol=1e-6), name


@pytest.mark.parametrize("chunk_mib, parts", [(0.0625, 5), (0.14, 3), (1000.0, 1)])
def test_sub_batches_give_the_whole_batch_result(chunk_mib: float, parts: int) -> None:
    """Stage 0's MLP activation is 16x16 tokens x 64 channels x 4 bytes = 1/16 MiB per image."""
    whole = randomized(SwinV2Config(**{**CFG.__dict__, "chunk_mib": None}))
    split = randomized(SwinV2Config(**{**CFG.__dict__, "chunk_mib": chunk_mib}))
    x = torch.randn(5, 3, 64, 64)
    calls = []
    split.layers[0].blocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    for mode in ("train", "eval"):
        getattr(whole, mode)(), getattr(split, mode)()
        ref, out = whole(x), split(x)
        assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5)
        for a, b in zip(out.stage_outputs, ref.stage_outputs):
            assert torch.allclose(a, b, atol=1e-5)
    assert len(calls) == 2 * parts and sum(calls) == 2 * 5
    whole.zero_grad(), split.zero_grad()
    whole.train()(x).last_hidden_state.pow(2).sum().backward()
    split.train()(x).last_hidden_state.pow(2).sum().backward()
    for (name, a), b in zip(split.named_parameters(), whole.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-5 * b.grad.abs().max(), name  # summation order only


def test_forward_hooks_see_outputs_that_later_work_leaves_alone() -> None:
    """A hook that keeps a module's output must not see it change afterwards, and the model's output
    must not change either (nothing writes in place into an output a module boundary exposes)."""
    model = randomized().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    block = model.layers[0].blocks[0]
    kept: dict[str, torch.Tensor] = {}
    copies: dict[str, torch.Tensor] = {}
    def keep(name: str):
        def hook(module, args, out):
            kept[name], copies[name] = out, out.clone()
        return hook
    for name in ("qkv", "norm1", "norm2"):
        getattr(block.attn if name == "qkv" else block, name).register_forward_hook(keep(name))
    with torch.no_grad():
        out = model(x).last_hidden_state
    assert torch.equal(out, ref)
    for name in kept:
        assert torch.equal(kept[name], copies[name]), name


def test_chunk_mib_must_be_positive() -> None:
    for bad in (0, -1.0, "16"):
        with pytest.raises(ValueError, match=f'chunk_mib must be a positive number of MiB, "auto" or None, got {bad!r}'):
            SwinV2Config(chunk_mib=bad)


def test_sub_batches_default_to_cpu_only() -> None:
    """`chunk_mib="auto"` (the default) sub-batches on CPU only; a number or None applies everywhere."""
    assert SwinV2Config().chunk_mib == "auto"
    assert sub_batch_mib("auto", torch.device("cpu")) == CPU_CHUNK_MIB == 16.0
    assert sub_batch_mib("auto", torch.device("cuda")) is None
    assert sub_batch_mib("auto", torch.device("mps")) is None
    assert sub_batch_mib(8.0, torch.device("cuda")) == 8.0
    assert sub_batch_mib(None, torch.device("cpu")) is None


def test_stochastic_depth_only_in_training() -> None:
    cfg = SwinV2Config(**{**CFG.__dict__, "drop_path_rate": 0.5})
    model = randomized(cfg)
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model(x).last_hidden_state, model(x).last_hidden_state
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(1)
        c = model(x).last_hidden_state
        torch.manual_seed(2)
        d = model(x).last_hidden_state
    assert not torch.allclose(c, d)
    probs = [blk.drop_path.prob for blk in model.modules() if isinstance(blk, SwinV2Block)]
    assert probs[0] == 0.0 and probs[-1] == pytest.approx(0.5)


def test_group_matcher_covers_every_parameter_once() -> None:
    model = randomized()
    groups = model.group_matcher()
    patterns = [groups["stem"]] + [p for p, _ in groups["blocks"]]
    for name, _ in model.named_parameters():
        assert sum(bool(re.match(p, name)) for p in patterns) == 1, name


def test_small_stage_uses_whole_map_as_window_without_shift() -> None:
    model = SwinTransformerV2(SwinV2Config(**{**CFG.__dict__, "window_size": 8}))
    assert [(s.window, s.shift) for s in model.layers] == [(8, 4), (8, 0), (4, 0)]
