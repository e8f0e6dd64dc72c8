"""docs/architecture.md's claim: adding an encoder is one adapter file plus one registry line.

The example adapter and registry line are taken from the page itself, registered, and put through
the registry-wide encoder and model tests (in a child pytest, so their parametrization sees the new
name), the benchmark smoke run and the encoder comparison's plan."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.encoders import encoder_names, get_encoder_class, registry
from tests.conftest import REPO, load_script

DOC = REPO / "docs" / "architecture.md"
MODULE = "architecture_example_encoder"  # where the test puts the page's models/encoders/<file>.py


def doc_block(marker: str) -> str:
    """The ```python block right after `<!-- marker -->` in the page."""
    match = re.search(rf"<!-- {re.escape(marker)}[^>]*-->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"{DOC}: no python block after <!-- {marker} -->"
    return match.group(1)


def example_entry() -> tuple[str, str]:
    """(registry name, class name) from the page's registry line `"name": "models.encoders.file:Class",`."""
    match = re.fullmatch(r'\s*"(\w+)": "models\.encoders\.\w+:(\w+)",\s*', doc_block("example registry line"))
    assert match, "the registry line is not one ENCODERS entry"
    return match.group(1), match.group(2)


@pytest.fixture()
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The page's adapter written as a module and registered with the page's line; returns its name."""
    (tmp_path / f"{MODULE}.py").write_text(doc_block("example adapter"))
    monkeypatch.syspath_prepend(str(tmp_path))
    name, cls = example_entry()
    monkeypatch.setitem(registry.ENCODERS, name, f"{MODULE}:{cls}")
    return name


PLUGIN = '''
from models.encoders import registry


def pytest_configure(config):
    registry.ENCODERS[{name!r}] = {target!r}
'''


def test_the_registry_wide_tests_pass_on_the_example(example: str, tmp_path: Path) -> None:
    (tmp_path / "register_example.py").write_text(PLUGIN.format(name=example, target=registry.ENCODERS[example]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "register_example", "-k", example,
                           "tests/test_encoders.py", "tests/test_model.py"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", done.stdout).group(1))
    assert passed >= 15 and "failed" not in done.stdout  # every parametrized contract test ran on it


def test_benchmarks_and_the_comparison_pick_the_example_up(example: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    assert example in encoder_names()
    recipe = get_encoder_class(example).recipe
    benchmark = load_script("benchmark")
    threads = torch.get_num_threads()
    try:
        assert benchmark.main(["--tiny", "--encoders", example, "--sizes", "224", "--repeats", "1",
                               "--model-sizes", "224", "--model-batch", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert f"| {example} | 224 |" in printed and "note:" not in printed

    fullsize = load_script("benchmark_fullsize")
    vision, llm, rest = fullsize.counter_flops(fullsize.SHAPES["tiny"], example, (56, 56), torch.device("meta"))
    assert vision > 0 and llm > 0 and rest > 0

    compare = load_script("compare_encoders")
    (plan,) = compare.encoder_plans([example], [], tmp_path)
    assert plan.requested_encoder == example and compare.budget_differences([plan] + compare.encoder_plans(
        ["swin"], [], tmp_path)) == []
    expected = None if recipe.tiny_checkpoint is None else f"checkpoints/tiny/{recipe.tiny_checkpoint}"
    assert plan.config.model.vision.checkpoint == expected
    if recipe.tiny_checkpoint is None:
        assert plan.config.model.vision.config == recipe.tiny_config
