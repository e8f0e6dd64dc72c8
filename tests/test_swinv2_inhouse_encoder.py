"""The `swinv2_inhouse` adapter keeps the `swinv2` adapter's contract and gives the same outputs."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from models.encoders import EncoderUnavailableError, get_encoder_class
from models.encoders.swin import Swinv2Encoder
from models.encoders.swinv2_inhouse import Swinv2InhouseEncoder

SIZES = [(224, 224), (224, 448), (230, 300)]


def pair(tiny, size=(224, 224)) -> tuple[Swinv2Encoder, Swinv2InhouseEncoder]:
    folder = str(tiny["swinv2"])
    return Swinv2Encoder.build(folder, {}, size), Swinv2InhouseEncoder.build(folder, {}, size)


def test_registry_resolves_the_inhouse_adapter() -> None:
    """Needs the one-line `swinv2_inhouse` entry in models/encoders/registry.py."""
    assert get_encoder_class("swinv2_inhouse") is Swinv2InhouseEncoder


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_same_checkpoint_gives_same_outputs(size, tiny_checkpoints) -> None:
    ref, ours = (e.eval() for e in pair(tiny_checkpoints, size))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert a.grid == b.grid and a.stage_grids == b.stage_grids
    assert (a.tokens - b.tokens).abs().max() < 1e-4
    for sa, sb in zip(a.stages, b.stages, strict=True):
        assert (sa - sb).abs().max() < 1e-4


def test_declared_contract_matches_swinv2(tiny_checkpoints) -> None:
    ref, ours = pair(tiny_checkpoints, (224, 448))
    assert ours.preprocessing == ref.preprocessing
    assert ours.feature_info == ref.feature_info
    assert ours.out_channels == ref.out_channels
    for stage in range(len(ref.feature_info)):
        assert ours.grid_size((230, 300), stage) == ref.grid_size((230, 300), stage)
    assert ours.depth_groups == ref.depth_groups
    ref_groups, our_groups = ref.parameter_groups(), ours.parameter_groups()
    assert set(our_groups) == set(ref_groups)
    for name in ref_groups:  # the same parameters, counted, land in every group
        count = lambda groups: sum(p.numel() for m in groups[name] for p in m.parameters())  # noqa: E731
        assert count(our_groups) == count(ref_groups), name


def test_lora_targets_name_the_same_linear_layers(tiny_checkpoints) -> None:
    ref, ours = pair(tiny_checkpoints)

    def targeted(encoder: nn.Module, targets: list[str]) -> int:
        return sum(p.numel() for n, m in encoder.named_modules() if isinstance(m, nn.Linear)
                   and any(n == t or n.endswith("." + t) for t in targets) for p in m.parameters())

    # The same weights are adapted (q, k, v fused here); the k bias does not exist in either.
    assert targeted(ours, ours.lora_target_modules) == targeted(ref, ref.lora_target_modules)


def test_lora_wraps_the_fused_qkv_and_trains(tiny_checkpoints) -> None:
    _, ours = pair(tiny_checkpoints)
    model = get_peft_model(ours, LoraConfig(r=2, target_modules=ours.lora_target_modules, init_lora_weights=False))
    wrapped = [n for n, m in model.named_modules() if n.endswith("attn.qkv") and hasattr(m, "lora_A")]
    assert wrapped
    x = torch.randn(1, 3, 224, 224)
    out = model(x).tokens
    out.pow(2).mean().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    with torch.no_grad():
        base = ours.backbone  # LoRA B is non-zero: the adapted output must differ from the base one
        with model.disable_adapter():
            plain = model(x).tokens
    assert not torch.allclose(out.detach(), plain)
    assert base is ours.backbone


def test_random_init_from_config_dict_round_trips(tiny_checkpoints) -> None:
    ref, ours = pair(tiny_checkpoints)
    rebuilt = Swinv2InhouseEncoder.from_config_dict(ours.hf_config_dict(), ours.preprocessing)
    assert set(rebuilt.state_dict()) == set(ours.state_dict())
    rebuilt.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x).tokens, ours.eval()(x).tokens)
    # The exported config is a transformers Swinv2Config dict: the swinv2 adapter can rebuild it too.
    assert Swinv2Encoder.from_config_dict(ours.hf_config_dict(), ours.preprocessing).feature_info == ref.feature_info


def test_random_init_from_overrides() -> None:
    encoder = Swinv2InhouseEncoder.build(None, dict(embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
                                                    image_size=64), (64, 64))
    out = encoder(torch.randn(1, 3, 64, 64))
    assert out.tokens.shape == (1, 8 * 8, 16)  # 64 px / patch 4 = 16, merged once: 8 x 8


def test_unavailable_checkpoints_and_configs_are_encoder_unavailable(tmp_path) -> None:
    with pytest.raises(EncoderUnavailableError):
        Swinv2InhouseEncoder.build(str(tmp_path / "missing"), {}, (224, 224))
    with pytest.raises(EncoderUnavailableError, match="unknown"):
        Swinv2InhouseEncoder.build(None, {"not_a_field": 1}, (224, 224))
    with pytest.raises(EncoderUnavailableError, match="use_absolute_embeddings"):
        Swinv2InhouseEncoder.build(None, {"use_absolute_embeddings": True}, (224, 224))


def test_grad_checkpointing_keeps_gradients(tiny_checkpoints) -> None:
    _, ours = pair(tiny_checkpoints)
    x = torch.randn(1, 3, 224, 224)
    ours.train()
    ours(x).tokens.sum().backward()
    plain = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours.set_grad_checkpointing(True)
    ours(x).tokens.sum().backward()
    for p, g in zip(ours.parameters(), plain):
        assert torch.allclose(p.grad, g, atol=1e-5)


def test_chunk_mib_is_set_from_the_vision_config(tiny_checkpoints) -> None:
    """`model.vision.config.chunk_mib` reaches the backbone (random init and checkpoint), stays out of
    the saved transformers config, and a bad value is a clear error."""
    small = dict(embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, image_size=64)
    assert Swinv2InhouseEncoder.build(None, small, (64, 64)).backbone.cfg.chunk_mib == "auto"
    encoder = Swinv2InhouseEncoder.build(None, {**small, "chunk_mib": None}, (64, 64))
    assert encoder.backbone.cfg.chunk_mib is None and all(s.chunk_mib is None for s in encoder.backbone.layers)
    assert "chunk_mib" not in encoder.hf_config_dict()
    loaded = Swinv2InhouseEncoder.build(str(tiny_checkpoints["swinv2"]), {"chunk_mib": 4}, (224, 224))
    assert loaded.backbone.cfg.chunk_mib == 4 and "chunk_mib" not in loaded.hf_config_dict()
    for checkpoint in (None, str(tiny_checkpoints["swinv2"])):
        with pytest.raises(EncoderUnavailableError, match="chunk_mib must be a positive number of MiB"):
            Swinv2InhouseEncoder.build(checkpoint, {**(small if checkpoint is None else {}), "chunk_mib": 0},
                                       (224, 224))
