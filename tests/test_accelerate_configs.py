"""Every file in config/accelerate/ is one `accelerate launch --config_file` accepts, and wraps our layers."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType, PrecisionType

from models.build import build_model
from models.encoders import encoder_names
from tests.conftest import make_config
from train.sharding import SHARDED_LAYERS

CONFIGS = sorted((Path(__file__).parents[1] / "config" / "accelerate").glob("*.yaml"))


def test_there_are_configs_for_each_setup():
    assert {p.name for p in CONFIGS} >= {"single_gpu_bf16.yaml", "multi_gpu_ddp.yaml", "fsdp.yaml", "fsdp2.yaml",
                                         "deepspeed_zero2.yaml"}


@pytest.mark.parametrize("path", [p for p in CONFIGS if "fsdp" in p.name], ids=lambda p: p.name)
def test_fsdp_configs_wrap_the_layers_the_trainer_shards(path: Path):
    """accelerate's FSDP units are the ones `train.sharding: fsdp2` makes, so the CPU tests shard alike."""
    fsdp = load_config_from_file(str(path)).fsdp_config
    assert tuple(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) == SHARDED_LAYERS
    assert fsdp["fsdp_version"] == (2 if path.name == "fsdp2.yaml" else 1)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_as_accelerate_reads_it(path: Path):
    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type in set(DistributedType) and config.mixed_precision in set(PrecisionType)
    assert config.num_processes >= 1 and config.num_machines >= 1 and not config.use_cpu
    # Every plugin key must be an option of `accelerate launch` (a misspelt key would be ignored silently).
    plugin = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    argv = [a for key, value in plugin.items() for a in (f"--{key}", str(value))] + ["train.py"]
    parsed = vars(launch_command_parser().parse_args(argv))
    assert all(key in parsed for key in plugin)


@pytest.mark.parametrize("path", [p for p in CONFIGS if "fsdp" in p.name], ids=lambda p: p.name)
def test_fsdp_wraps_the_llm_and_every_encoder_layer(path: Path, tiny_checkpoints):
    """The wrap list names the LLM's decoder layer and the layer class of every registered encoder."""
    wrap = set(load_config_from_file(str(path)).fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    for encoder in encoder_names():
        model = build_model(make_config(tiny_checkpoints, encoder).model)
        llm = {type(m).__name__ for m in model.language.modules()}
        vision = {type(m).__name__ for m in model.vision.modules()}
        assert wrap & llm == {"Qwen2DecoderLayer"}, encoder
        assert wrap & vision, f"{path.name} wraps no layer of the {encoder} encoder ({sorted(vision)})"
