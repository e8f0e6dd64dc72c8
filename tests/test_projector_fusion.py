import pytest
import torch
from transformers import InternVLConfig, InternVLModel

from models.fusion import CrossAttention, CrossAttentionFusion
from models.projector import VisionProjector, pixel_shuffle


def test_pixel_shuffle_matches_internvl_channel_order():
    config = InternVLConfig(vision_config=dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=8),
                            text_config=dict(model_type="qwen2", hidden_size=8, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=8,
                                             vocab_size=16))
    ref = InternVLModel(config).pixel_shuffle
    x = torch.randn(2, 6, 6, 8)
    ours, grid = pixel_shuffle(x.reshape(2, 36, 8), (6, 6), 2)
    assert grid == (3, 3)
    torch.testing.assert_close(ours, ref(x, 0.5).reshape(2, 9, 32), rtol=0, atol=0)


@pytest.mark.parametrize("grid, expected", [((7, 5), (4, 3)), ((1, 1), (1, 1)), ((4, 9), (2, 5))])
def test_pixel_shuffle_pads_odd_grids(grid, expected):
    tokens = torch.randn(1, grid[0] * grid[1], 4)
    out, new_grid = pixel_shuffle(tokens, grid, 2)
    assert new_grid == expected and out.shape == (1, expected[0] * expected[1], 16)
    # same as shuffling the grid zero-padded by hand to even sizes
    h, w = expected[0] * 2, expected[1] * 2
    padded = torch.zeros(1, h, w, 4)
    padded[:, :grid[0], :grid[1]] = tokens.reshape(1, *grid, 4)
    ref, _ = pixel_shuffle(padded.reshape(1, h * w, 4), (h, w), 2)
    assert torch.equal(out, ref)


def test_projector_concatenates_stages():
    proj = VisionProjector([16, 32], [-2, -1], out_dim=24, pixel_shuffle=2)
    stages = [torch.randn(2, 36, 8), torch.randn(2, 49, 16), torch.randn(2, 16, 32)]
    grids = [(6, 6), (7, 7), (4, 4)]
    out = proj(stages, grids)
    assert out.shape == (2, 16 + 4, 24) == (2, proj.num_tokens(grids[1:]), 24)


def test_projector_rejects_mismatched_widths():
    proj = VisionProjector([16], [-1], out_dim=8)
    with pytest.raises(RuntimeError):
        proj([torch.randn(1, 4, 12)], [(2, 2)])


def test_untrained_fusion_passes_text_through():
    fusion = CrossAttentionFusion(dim=16, num_blocks=2, num_heads=4)
    text, image = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    assert torch.equal(fusion(text, image), text)


def test_cross_attention_matches_reference_softmax_attention():
    attn = CrossAttention(dim=16, num_heads=4)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    q = attn.q_proj(x).view(2, 5, 4, 4).transpose(1, 2)
    k, v = attn.kv_proj(ctx).view(2, 9, 2, 4, 4).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)  # 1/sqrt(head_dim=4)
    ref = attn.o_proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x, ctx), ref, rtol=1e-5, atol=1e-6)


def test_gates_open_after_a_step_and_image_then_matters():
    fusion = CrossAttentionFusion(dim=16, num_blocks=1, num_heads=4)
    opt = torch.optim.SGD(fusion.parameters(), lr=0.5)
    text, image = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    fusion(text, image).pow(2).sum().backward()
    opt.step()
    assert fusion.blocks[0].attn_gate.alpha.item() != 0.0
    assert not torch.allclose(fusion(text, image), fusion(text, torch.randn(2, 9, 16)))
