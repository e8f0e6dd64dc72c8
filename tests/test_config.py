from pathlib import Path

import pytest
import yaml

from config import ConfigError, load_config, save_config, to_dict

REPO = Path(__file__).parents[1]


def test_experiment_file_inherits_base_and_overrides_apply(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"vision": {"encoder": "swin"}, "num_classes": 3},
                                                        "seed": 1}))
    (tmp_path / "exp.yaml").write_text("base: base.yaml\nmodel:\n  vision:\n    encoder: swinv2\n")
    cfg = load_config(tmp_path / "exp.yaml", ["train.stages.0.lr=3e-4", "model.vision.image_size=[448, 896]",
                                              "model.vision.fallback=null", "output_dir=2024"])
    assert cfg.model.vision.encoder == "swinv2"
    assert cfg.seed == 1 and cfg.model.num_classes == 3
    assert cfg.train.stages[0].lr == pytest.approx(3e-4)
    assert cfg.model.vision.image_size == [448, 896]
    assert cfg.model.vision.fallback is None
    assert cfg.output_dir == "2024"


@pytest.mark.parametrize("override, message", [
    ("model.vison.encoder=swin", "model.vison: unknown key; did you mean model.vision?"),
    ("model.vision.encodr=swin", "model.vision.encodr: unknown key; did you mean model.vision.encoder?"),
    ("train.stages.0.epochs=abc", "train.stages.0.epochs: expected int, got 'abc'"),
    ("model.vision.resize=crop", "model.vision.resize: expected one of ['pad', 'resize'], got 'crop'"),
    ("train.stages.4.lr=1", "train.stages.4: list index out of range"),
    ("model.num_classes", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "config" / "base.yaml", [override])
    assert message in str(e.value)


def test_unknown_key_in_file_names_full_path(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  stages:\n    - name: a\n      lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.stages\.0\.lrr: unknown key; did you mean train\.stages\.0\.lr\?"):
        load_config(tmp_path / "bad.yaml")


def test_wrong_type_in_file_names_key_type_and_value(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  fusion:\n    num_blocks: two\n")
    with pytest.raises(ConfigError, match=r"model\.fusion\.num_blocks: expected int, got 'two' \(str\)"):
        load_config(tmp_path / "bad.yaml")


def test_circular_base_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_every_shipped_config_loads_and_round_trips(name, tmp_path):
    cfg = load_config(REPO / "config" / name)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert to_dict(cfg)["model"]["vision"]["encoder"] == cfg.model.vision.encoder
