"""In-house Swin V2 behaviour: mask cache correctness, checkpointing, stochastic depth, introspection."""

from __future__ import annotations

import re

import pytest
import torch

from models.swinv2 import SwinTransformerV2, SwinV2Config
from models.swinv2.model import (_MKLDNN_LINEAR, Mlp, PatchEmbed, SwinV2Block, _ScaledCosineQKV, linear,
                                 relative_position_index, scaled_dot_product_attention, shift_region_mask,
                                 window_partition, window_reverse)

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


def test_eval_cache_is_reused_and_matches_uncached() -> None:
    model = randomized().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = model(x).last_hidden_state
        cached = [m._mask_cache for m in model.modules() if isinstance(m, SwinV2Block)]
        assert all(len(c) == 1 for c in cached)
        again = model(x).last_hidden_state
    model.train()
    fresh = model(x).last_hidden_state  # training path never uses the cache
    assert torch.equal(first, again)
    assert torch.allclose(first, fresh, atol=1e-5)  # fused vs autograd kernel rounding
    assert all(len(c) == 0 for c in cached)  # train() dropped it


def test_loading_weights_in_eval_invalidates_the_cache() -> None:
    model, other = randomized(seed=0).eval(), randomized(seed=1).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(x).last_hidden_state, other(x).last_hidden_state)


def test_optimizer_step_in_eval_invalidates_the_cache() -> None:
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


def test_cache_follows_input_shape() -> None:
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


def test_cpu_attention_with_trainable_mask_matches_sdpa_and_its_gradients() -> None:
    """The CPU training kernel (probabilities kept, four-GEMM backward) against autograd through SDPA."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 16, 8, requires_grad=True) for _ in range(3))
    mask = (torch.randn(1, 4, 16, 16) * 2).requires_grad_()
    grad = torch.randn(3, 4, 16, 8)
    ours = scaled_dot_product_attention(torch.stack((q, k, v)), mask, dropout=0.0)
    assert ours.grad_fn.name() == "_CpuAttentionWithMaskGradBackward"
    ours_grads = torch.autograd.grad(ours, (q, k, v, mask), grad)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    ref_grads = torch.autograd.grad(ref, (q, k, v, mask), grad)
    assert torch.allclose(ours, ref, atol=1e-5)
    for name, a, b in zip("qkv", ours_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5), name
    assert ours_grads[3].shape == mask.shape and torch.allclose(ours_grads[3], ref_grads[3], atol=1e-5)


@pytest.mark.parametrize("dim", [0, 3])
def test_scaled_cosine_qkv_backward_matches_autograd(dim: int) -> None:
    """Hand-written backward of the q/k normalisation against autograd on the plain formula."""
    torch.manual_seed(0)
    # the projection's output is token-major (B, nW, N, 3, h, d); head-major is a permuted view of it
    projected = torch.randn(2, 4, 7, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    log_scale = torch.randn(5, 1, 1, dtype=torch.float64, requires_grad=True)
    def qkv() -> torch.Tensor:
        return projected.permute(3, 0, 1, 4, 2, 5) if dim == 0 else projected

    def scale() -> torch.Tensor:  # heads on dim -3 (head-major) or -2 (token-major)
        return log_scale.exp() if dim == 0 else log_scale.exp().view(-1, 1)

    grad = torch.randn(qkv().shape, dtype=torch.float64)
    view = qkv()
    layouts = []
    view.register_hook(lambda g: layouts.append(g.stride()))
    ours = _ScaledCosineQKV.apply(view, scale(), dim)
    ours_grads = torch.autograd.grad(ours, (projected, log_scale), grad)
    assert layouts == [view.stride()]  # the gradient comes back in the input's layout: no copy to it
    q, k, v = qkv().unbind(dim)
    ref = torch.stack((torch.nn.functional.normalize(q, dim=-1) * scale(), torch.nn.functional.normalize(k, dim=-1),
                       v), dim=dim)
    ref_grads = torch.autograd.grad(ref, (projected, log_scale), grad)
    assert torch.allclose(ours, ref)
    for a, b in zip(ours_grads, ref_grads):
        assert torch.allclose(a, b)


def _linear_kernel(out: torch.Tensor) -> str:
    """Name of the autograd node that produced `linear`'s output (under its reshape, if any)."""
    node = out.grad_fn
    return node.next_functions[0][0].name() if node.name() == "ViewBackward0" else node.name()


def test_onednn_linear_is_found_wherever_torch_has_onednn() -> None:
    """The two tests below skip without the oneDNN op; this one makes sure that a torch whose op set
    changed (a renamed or removed `mkldnn._linear_pointwise`) fails here instead of silently skipping
    them and losing the faster training path."""
    assert _MKLDNN_LINEAR == torch.backends.mkldnn.is_available()


@pytest.mark.skipif(not _MKLDNN_LINEAR, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("frozen", [False, True])
def test_linear_with_bias_in_the_gemm_matches_f_linear_and_its_gradients(frozen: bool) -> None:
    """CPU float32 training runs the oneDNN linear; values and every gradient are F.linear's. A frozen
    weight (adapters, a frozen encoder) gets no gradient and its input is not kept for one."""
    torch.manual_seed(0)
    weight = torch.randn(24, 16, requires_grad=not frozen)
    bias = torch.randn(24, requires_grad=True)
    x = torch.randn(2, 5, 3, 32)[..., :16].requires_grad_()  # rows 32 apart: a strided 2-D view reaches oneDNN
    grad = torch.randn(2, 5, 3, 24)
    ours = linear(x, weight, bias)
    assert _linear_kernel(ours) == "_BiasEpilogueLinearBackward"
    assert (ours.grad_fn.next_functions[0][0].saved_tensors[0] is None) == frozen
    inputs = (x, bias) if frozen else (x, weight, bias)
    ours_grads = torch.autograd.grad(ours, inputs, grad)
    ref = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    for a, b in zip(ours_grads, torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["no_grad", "no_bias", "float64", "onednn_off"])
def test_linear_stays_on_f_linear_outside_cpu_float32_training(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    if case == "onednn_off":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    dtype = torch.float64 if case == "float64" else torch.float32
    weight = torch.randn(24, 16, dtype=dtype, requires_grad=True)
    bias = None if case == "no_bias" else torch.randn(24, dtype=dtype)
    x = torch.randn(4, 16, dtype=dtype)
    with torch.set_grad_enabled(case != "no_grad"):
        out = linear(x, weight, bias)
    assert torch.equal(out, torch.nn.functional.linear(x, weight, bias))
    assert out.grad_fn is None if case == "no_grad" else _linear_kernel(out) in ("AddmmBackward0", "MmBackward0")


@pytest.mark.parametrize("size", [(32, 48), (30, 45)])
def test_patch_embedding_gemm_matches_the_convolution(size: tuple[int, int]) -> None:
    """The GEMM over flattened patches against the convolution it replaces, padding included."""
    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=4, in_chans=3, dim=16)
    x = torch.randn(2, 3, *size)
    ours = embed(x)
    pad_b, pad_r = (-size[0]) % 4, (-size[1]) % 4
    ref = embed.norm(embed.proj(torch.nn.functional.pad(x, (0, pad_r, 0, pad_b))).permute(0, 2, 3, 1))
    assert ours.shape == (2, -(-size[0] // 4), -(-size[1] // 4), 16)
    assert torch.allclose(ours, ref, atol=1e-5)
    weights = (embed.proj.weight, embed.proj.bias)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, weights, grad), torch.autograd.grad(ref, weights, grad)):
        assert torch.allclose(a, b, atol=1e-4)


def test_patch_embedding_runs_a_hooked_projection_as_a_module() -> None:
    """A forward hook on the projection (as feature extractors and adapters install) is honoured."""
    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=4, in_chans=3, dim=16)
    x = torch.randn(1, 3, 16, 16)
    plain = embed(x)
    embed.proj.register_forward_hook(lambda module, args, out: out + torch.arange(16.0).view(1, -1, 1, 1))
    hooked = embed(x)
    assert torch.allclose(hooked, embed.norm((embed.proj(x)).permute(0, 2, 3, 1)), atol=1e-5)
    assert not torch.allclose(hooked, plain, atol=1e-3)


def test_forward_hooks_see_outputs_that_later_in_place_work_leaves_alone() -> None:
    """Inference scales qkv and adds residuals in place; a hook that keeps those outputs must not
    see them change afterwards, and the model's output must not change either."""
    model = randomized().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    block = model.layers[0].blocks[0]  # unshifted: the token-major, in-place q/k normalisation
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


def _node_names(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes `out` depends on."""
    names, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.skipif(not _MKLDNN_LINEAR, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("act, frozen_fc1", [("gelu", False), ("gelu_new", False), ("gelu", True)])
def test_mlp_runs_as_one_node_in_cpu_training_with_the_modules_gradients(act: str, frozen_fc1: bool) -> None:
    torch.manual_seed(0)
    mlp = Mlp(8, 32, act)
    mlp.fc1.requires_grad_(not frozen_fc1)
    x = torch.randn(2, 5, 8, requires_grad=True)
    params = [p for p in mlp.parameters() if p.requires_grad]
    grad = torch.randn(2, 5, 8)
    out = mlp(x)
    assert "_GeluMlpBackward" in _node_names(out)
    ref = mlp.fc2(mlp.act(mlp.fc1(x)))
    assert "_GeluMlpBackward" not in _node_names(ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out, [x, *params], grad), torch.autograd.grad(ref, [x, *params], grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_mlp_with_a_hook_on_a_part_runs_part_by_part() -> None:
    """A hook on fc1, the activation or fc2 must see that part's output: no fused node then."""
    torch.manual_seed(0)
    mlp = Mlp(8, 32)
    seen = []
    mlp.act.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    out = mlp(torch.randn(2, 5, 8, requires_grad=True))
    assert seen == [(2, 5, 32)]
    assert "_GeluMlpBackward" not in _node_names(out)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
def test_mlp_activates_in_place_only_without_gradient(act: str) -> None:
    torch.manual_seed(0)
    mlp = Mlp(8, 32, act)
    x = torch.randn(2, 5, 8)
    reference = mlp.fc2(mlp.act(mlp.fc1(x)))
    buffers: dict[str, torch.Tensor] = {}
    mlp.fc1.register_forward_hook(lambda module, args, out: buffers.update(fc1=out))
    mlp.fc2.register_forward_pre_hook(lambda module, args: buffers.update(fc2=args[0]))
    with torch.no_grad():
        out = mlp(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    assert buffers["fc2"].data_ptr() == buffers["fc1"].data_ptr()  # activated in place
    # With autograd recording, the pre-activation is kept and the gradient is the reference's.
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(mlp(x).sum(), x)
    assert buffers["fc2"].data_ptr() != buffers["fc1"].data_ptr()
    (expected,) = torch.autograd.grad(mlp.fc2(mlp.act(mlp.fc1(x))).sum(), x)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_chunk_mib_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_mib must be a positive number of MiB or None, got 0"):
        SwinV2Config(chunk_mib=0)


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
