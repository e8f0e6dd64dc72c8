"""The measurement module every benchmark uses (models/measure.py) and the one config diff
(config.loader.config_differences). Nothing here asserts a speed."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from config import config_differences, load_config
from config.loader import ABSENT, flatten
from models import measure

CPU = torch.device("cpu")


def test_alternate_timings_warm_up_then_flip_the_order_every_repeat() -> None:
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = measure.alternate_timings(steps, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a-b, b-a, a-b
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_median_seconds_and_seconds_per_call_time_every_call() -> None:
    seen: list[int] = []
    assert measure.median_seconds(lambda: seen.append(0), repeats=5) >= 0 and len(seen) == 5
    seconds = measure.seconds_per_call(seen.append, [1, 2, 3])
    assert len(seconds) == 3 and seen[-3:] == [1, 2, 3]


def test_json_from_child_reads_the_last_line_of_a_fresh_process() -> None:
    script = "import json, os; print('a log line'); print(json.dumps({'pid': os.getpid()}))"
    out = measure.json_from_child([sys.executable, "-c", script])
    assert isinstance(out["pid"], int) and out["pid"] != os.getpid()


def test_json_from_child_names_the_exit_status_and_the_last_error_line() -> None:
    script = "import sys; sys.stderr.write('first\\nwhat went wrong\\n'); sys.exit(3)"
    with pytest.raises(RuntimeError, match="exit status 3: what went wrong$"):
        measure.json_from_child([sys.executable, "-c", script])


def test_percentile_of_one_and_of_many() -> None:
    assert measure.percentile([0.5], 95) == 0.5
    assert measure.percentile([float(i) for i in range(1, 102)], 50) == pytest.approx(51.0)


def test_cpu_attention_flops_are_counted() -> None:
    q = torch.randn(1, 2, 16, 8)
    flops = measure.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * 2 * 16 * 16 * (8 + 8)


def test_matmul_flops_are_counted() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    assert measure.count_flops(lambda: a @ b) == 2 * 4 * 8 * 3


def test_peak_memory_sees_a_large_temporary_allocation() -> None:
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("no /proc/self/clear_refs on this system")
    measure.pin_malloc_to_mmap()
    peak = measure.peak_memory_mib(lambda: torch.ones(64 * 2**20 // 4).sum(), CPU)  # a 64 MiB tensor, touched
    assert peak is not None and peak >= 48


def test_the_peak_since_a_reset_is_absolute_and_includes_a_freed_tensor() -> None:
    measure.pin_malloc_to_mmap()
    assert measure.reset_peak_memory(CPU)
    start = measure.peak_memory_since_reset_mib(CPU)
    assert abs(start - measure.rss_mib()) < 16  # right after a reset, the peak is the resident set
    torch.ones(64 * 2**20 // 4).sum()  # a 64 MiB tensor, freed at once
    assert measure.peak_memory_since_reset_mib(CPU) - start >= 48
    assert measure.peak_memory_kind(CPU) == "peak RSS (VmHWM)"


def test_process_status_fields() -> None:
    assert measure.status_kib("VmRSS") > 0 and measure.rss_mib() > 0
    assert measure.status_kib("NoSuchField") is None and measure.rss_mib(2**22 + 1) == 0.0
    assert measure.child_pids(os.getpid()) == [] or all(p > 0 for p in measure.child_pids(os.getpid()))


def test_forward_timer_counts_forwards() -> None:
    layer = torch.nn.Linear(2, 2)
    timer = measure.ForwardTimer(layer)
    layer(torch.zeros(1, 2))
    layer(torch.zeros(1, 2))
    assert timer.calls == 2 and timer.seconds >= 0
    timer.reset()
    assert timer.calls == 0 and timer.seconds == 0


def test_machine_info_names_what_a_timing_depends_on() -> None:
    info = measure.machine_info(threads=1)
    assert set(info) == {"machine", "processor", "cpu_count", "torch", "threads", "cuda", "load_average"}
    assert info["threads"] == 1 and len(info["load_average"]) == 3


# ----------------------------------------------------------------------------------- config diffs
def test_flatten_numbers_lists_of_mappings_only() -> None:
    assert flatten({"a": {"b": 1}, "s": [{"lr": 1}, {"lr": 2}], "size": [224, 224]}) == {
        "a.b": 1, "s.0.lr": 1, "s.1.lr": 2, "size": [224, 224]}


def test_config_differences_name_each_changed_leaf() -> None:
    base = load_config(None)
    changed = load_config(None, ["seed=7", "model.vision.encoder=internvit", "train.stages.0.lr=0.5"])
    diffs = config_differences({"old": base, "new": changed})
    assert set(diffs) == {"seed", "model.vision.encoder", "train.stages.0.lr"}
    assert diffs["seed"] == {"old": base.seed, "new": 7}
    assert set(config_differences({"old": base, "new": changed}, ignore=("model.vision",))) == {
        "seed", "train.stages.0.lr"}


def test_config_differences_mark_an_absent_key() -> None:
    assert config_differences({"a": {"x": 1}, "b": {}}) == {"x": {"a": 1, "b": ABSENT}}
