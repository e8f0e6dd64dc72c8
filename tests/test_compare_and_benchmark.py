"""The pure parts of scripts/compare_encoders.py and the benchmark scripts: tables, fallback marking,
budget checks, token counts, and tiny benchmark runs end to end over the registry. No timing is asserted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from models.build import build_model
from models.encoders import encoder_names, get_encoder_class
from models.measure import markdown_table, parse_size, size_label
from tests.conftest import load_script, make_config

ROOT = Path(__file__).resolve().parents[1]


compare = load_script("compare_encoders")
benchmark = load_script("benchmark")


def ok_row(**changes: object) -> dict:
    row = {"config": "swin", "requested_encoder": "swin", "encoder": "swin", "status": "ok", "fallback": None,
           "test_accuracy": 0.5, "test_macro_f1": 0.4, "test_ece": 0.1, "trainable_parameters": 442_610,
           "total_parameters": 2_541_490, "visual_tokens": 49, "train_images_per_s": 9.25,
           "infer_images_per_s": 30.0, "latency_ms_p50": 12.34, "train_peak_rss_mib": 800.4,
           "infer_peak_rss_mib": 500.0, "train_wall_s": 100.0, "measure_wall_s": 20.0}
    row.update(changes)
    return row


# ---------------------------------------------------------------------------------------- tables
def test_markdown_table_shape_and_escaping() -> None:
    text = markdown_table(["a", "b"], [[1, None], ["x|y", 2.5]])
    lines = text.splitlines()
    assert lines[0] == "| a | b |"
    assert lines[1] == "|---|---|"
    assert lines[2] == "| 1 | – |"
    assert lines[3] == "| x\\|y | 2.5 |"
    assert markdown_table(["a"], [["two\nlines"]]).splitlines()[2] == "| two lines |"


def test_compare_row_cells_follow_headers() -> None:
    cells = compare.table_cells(ok_row())
    assert len(cells) == len(compare.HEADERS)
    named = dict(zip(compare.HEADERS, cells))
    assert named["encoder used"] == "swin"
    assert named["trainable params"] == "443k" and named["total params"] == "2.54M"
    assert named["visual tokens"] == 49 and named["run wall s"] == "120"


def test_failed_row_fills_the_table_and_warns() -> None:
    row = {"config": "x", "requested_encoder": "nope", "encoder": None, "status": "FAILED: training exit 1",
           "fallback": None}
    text = compare.render([row, ok_row()])
    assert "**FAILED: training exit 1**" in text
    assert "WARNING: x: FAILED" in text
    assert all(line.count("|") == len(compare.HEADERS) + 1 for line in text.splitlines() if line.startswith("|"))


# -------------------------------------------------------------------------------------- fallback
def test_fallback_note_none_when_the_requested_encoder_ran() -> None:
    record = {"encoder": "swin", "requested_encoder": "swin", "fallback_cause": None}
    assert compare.fallback_note("swin", record, record) is None


@pytest.mark.parametrize("record", [
    {"encoder": "internvit", "requested_encoder": "swin", "fallback_cause": "weights missing"},
    {"encoder": "internvit"},  # an older record without a cause still differs
    {"encoder": "swin", "fallback_cause": "recorded cause with the right name is still suspicious"},
])
def test_fallback_note_flags_any_record_that_did_not_run_the_request(record: dict) -> None:
    good = {"encoder": "swin"}
    note = compare.fallback_note("swin", good, record)
    assert note is not None and note.startswith("FALLBACK") and "'swin'" in note


def test_fallback_row_is_marked_loudly_in_table_and_warning() -> None:
    row = ok_row(encoder="internvit", fallback="FALLBACK: ran 'internvit', config asked for 'swin' (weights missing)")
    text = compare.render([row])
    table_line = next(line for line in text.splitlines() if line.startswith("| swin"))
    assert "**FALLBACK: ran 'internvit'" in table_line
    assert "WARNING: swin did not run its encoder. FALLBACK: ran 'internvit'" in text and "not swin ones" in text


def test_a_long_multiline_fallback_cause_keeps_the_row_on_one_line() -> None:
    cause = "cannot read checkpoints/x: We couldn't connect.\nCheck your internet connection " + "x" * 300
    row = ok_row(encoder="internvit", fallback=compare.fallback_note("swin", {"encoder": "internvit",
                                                                             "fallback_cause": cause}))
    lines = compare.render([row]).splitlines()
    (table_line,) = [line for line in lines if line.startswith("| swin")]
    assert table_line.count("|") == len(compare.HEADERS) + 1 and "…" in table_line
    warning = next(line for line in lines if line.startswith("**WARNING"))
    assert "Check your internet connection" in warning and "x" * 300 in warning


# ---------------------------------------------------------------------------------------- budget
def test_budget_differences_ignore_vision_and_output_dir(tmp_path: Path) -> None:
    plans = compare.encoder_plans(["internvit", "swin"], [], tmp_path)
    assert [p.requested_encoder for p in plans] == ["internvit", "swin"]
    assert compare.budget_differences(plans) == []
    assert plans[0].run_dir == tmp_path / "runs" / "internvit"
    assert f"output_dir={tmp_path / 'runs' / 'internvit'}" in plans[0].overrides


def test_budget_differences_name_a_changed_epoch_count(tmp_path: Path) -> None:
    plans = compare.encoder_plans(["swin"], [], tmp_path) + compare.encoder_plans(
        ["internvit"], ["train.stages.1.epochs=9"], tmp_path)
    diffs = compare.budget_differences(plans)
    assert len(diffs) == 1 and diffs[0].startswith("train.stages.1.epochs:") and "internvit=9" in diffs[0]


def test_main_refuses_an_unfair_comparison(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(f"base: {compare.BUDGET}\nseed: 1\n")
    code = compare.main(["--configs", str(compare.BUDGET), str(other), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "seed: budget=0, other=1" in capsys.readouterr().err


def test_every_registered_encoder_is_compared_on_the_checkpoint_its_recipe_names(tmp_path: Path) -> None:
    plans = compare.encoder_plans(encoder_names(), [], tmp_path)
    assert [p.requested_encoder for p in plans] == [p.name for p in plans] == encoder_names()
    assert compare.budget_differences(plans) == []
    for plan in plans:
        folder = get_encoder_class(plan.name).recipe.tiny_checkpoint
        assert plan.config.model.vision.checkpoint == f"checkpoints/tiny/{folder}"
        assert plan.config.model.vision.fallback != plan.name  # never "falls back" to itself


def test_trained_images_count_epochs_and_max_steps(tmp_path: Path) -> None:
    config = compare.encoder_plans(["swin"], ["train.stages.0.max_steps=2"], tmp_path)[0].config
    later_epochs = sum(stage.epochs for stage in config.train.stages[1:])
    assert compare.trained_images(config, num_train=100) == 2 * 16 + later_epochs * 100


# ---------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("encoder", encoder_names())
def test_model_token_column_agrees_with_num_image_tokens(tiny_checkpoints: dict[str, Path], encoder: str) -> None:
    size = (224, 224)
    row = benchmark.measure_model(encoder, size, batch=1, repeats=1, device=torch.device("cpu"),
                                  language_checkpoint=tiny_checkpoints["internvl2"], tiny=True)
    model = benchmark.build_matched_model(encoder, size, tiny_checkpoints["internvl2"], tiny=True)
    assert row.visual_tokens == model.num_image_tokens(size) > 0
    assert row.train_step_ms > 0 and row.infer_images_per_s > 0
    if encoder in ("internvit", "swinv2"):
        assert row.visual_tokens == (64 if encoder == "internvit" else 28 * 28)  # 16x16 ViT grid, 2x2 shuffle


def test_measure_export_tokens_equal_num_image_tokens(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image
    model = build_model(make_config(tiny_checkpoints, "swin").model)
    folder = model.save_pretrained(tmp_path / "export")
    (tmp_path / "img").mkdir()
    rows = ["file_name,label"]
    for i in range(3):
        Image.new("RGB", (300, 260), (i * 60, 100, 200)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"{i}.png,{i}")
    (tmp_path / "img" / "metadata.csv").write_text("\n".join(rows) + "\n")
    result = compare.measure_export(folder, str(tmp_path / "img" / "metadata.csv"), batch_size=2, latency_images=2,
                                    device="cpu")
    assert result["visual_tokens"] == model.num_image_tokens() == 49
    assert result["encoder"] == "swin" and result["requested_encoder"] == "swin"
    assert result["test"]["num_samples"] == 3 and 0.0 <= result["test"]["ece"] <= 1.0
    assert result["total_parameters"] == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- benchmark
def test_parse_size() -> None:
    assert parse_size("448") == (448, 448)
    assert parse_size("1344x448") == (1344, 448)
    assert size_label((1344, 448)) == "1344x448"


def test_growth_is_relative_to_each_encoders_first_row() -> None:
    rows = [benchmark.EncoderRow("a", "224", 224, 224, 0.05, 49, 1.0, 2.0, 10.0, None),
            benchmark.EncoderRow("a", "448", 448, 448, 0.2, 196, 1.0, 8.0, 50.0, None)]
    benchmark.add_growth(rows)
    assert rows[1].pixels_x == pytest.approx(4.0) and rows[1].time_x == pytest.approx(5.0)
    assert rows[1].flops_x == pytest.approx(4.0) and rows[0].time_x == 1.0


def test_every_registered_encoder_is_benchmarked_or_named_as_skipped() -> None:
    names, notes = benchmark.select_encoders(None)
    assert set(names) | {n.split(":")[0] for n in notes} == set(encoder_names())


def test_benchmark_runs_one_tiny_case_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert benchmark.main(["--tiny", "--encoders", "swinv2", "--sizes", "64", "--repeats", "1", "--model-sizes",
                               "64", "--model-batch", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert set(report) >= {"command", "before", "after", "encoders", "model", "matched_configs", "notes"}
    assert report["tiny"] and report["matched_configs"]["swinv2"] == get_encoder_class("swinv2").recipe.tiny_config
    (enc,), (whole,) = report["encoders"], report["model"]
    assert set(enc) == {"encoder", "input", "height", "width", "megapixels", "tokens", "params_m", "gflops",
                        "forward_ms", "peak_mib", "pixels_x", "time_x", "flops_x"}
    assert enc["encoder"] == "swinv2" and enc["tokens"] == 8 * 8 and enc["gflops"] > 0
    assert set(whole) == {"encoder", "input", "visual_tokens", "batch", "train_step_ms", "train_images_per_s",
                          "infer_images_per_s", "train_peak_mib", "infer_peak_mib"}
    assert whole["visual_tokens"] == 8 * 8  # 64 px / patch 4 = 16, one merge -> 8 x 8, no pixel shuffle
    printed = capsys.readouterr().out
    assert "| swinv2 | 64 | 64 |" in printed and "load average" in printed


def test_a_size_swin_refuses_becomes_a_note(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    try:
        assert benchmark.main(["--encoders", "swin", "--sizes", "64", "--repeats", "1", "--no-model"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "note: swin at 64: skipped" in printed and "window_size" in printed


# ------------------------------------------------------------------- Swin V2 SDPA-backend table
def test_swinv2_backend_table_runs_each_backend_and_matches_the_eager_output() -> None:
    """The GPU check's table, run on CPU in float32: every backend CPU has reproduces transformers'
    eager output (parity); the one it lacks is a row with torch's reason, not a crash."""
    swinv2_bench = load_script("benchmark_swinv2")
    shape = dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], image_size=64)
    rows = swinv2_bench.backend_rows("cpu", torch.float32, window=8, batch=2, repeats=1, warmup=0, shape=shape)
    assert [(r[0], r[1]) for r in rows] == [
        (mode, name) for mode in ("eval", "train")
        for name in ("transformers (eager)", "in-house, SDPA flash", "in-house, SDPA efficient", "in-house, SDPA math")]
    by_name = {(r[0], r[1]): r for r in rows}
    assert by_name[("eval", "in-house, SDPA efficient")][2].startswith("not run: No viable backend")
    for name in ("transformers (eager)", "in-house, SDPA flash", "in-house, SDPA math"):
        mode, _, ms, speedup, diff, _ = by_name[("eval", name)]
        assert float(ms) > 0 and speedup.endswith("x")
        assert float(diff) <= 1e-4, (name, diff)
    assert float(by_name[("train", "in-house, SDPA math")][2]) > 0


def test_swinv2_speedups_are_the_median_over_fresh_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case is timed in --processes child processes (never in the parent), and the row's
    speed-up is the median of the children's own speed-ups, printed with their range."""
    swinv2_bench = load_script("benchmark_swinv2")
    children: list[dict[str, float]] = []
    real = swinv2_bench.json_from_child

    def spy(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
        assert "--timing-child" in command and command[command.index("--timing-child") + 1] == "eval_w8"
        children.append(real(command, env))
        return children[-1]

    monkeypatch.setattr(swinv2_bench, "json_from_child", spy)
    args = argparse.Namespace(batch=1, threads=1, repeats=1, warmup=0, processes=2, memory_repeats=0)
    threads = torch.get_num_threads()
    try:
        rows = swinv2_bench.run_case("eval_w8", args, peak=100.0)
    finally:
        torch.set_num_threads(threads)
    assert len(children) == 2 and all(set(c) == {"transformers", "inhouse"} for c in children)
    speedups = sorted(c["transformers"] / c["inhouse"] for c in children)
    cells = rows[0].split(" | ")
    assert cells[3] == f"**{(speedups[0] + speedups[1]) / 2:.3f}x**"
    assert cells[4] == f"{speedups[0]:.2f}-{speedups[1]:.2f}x"


def test_swinv2_benchmark_models_run_the_sub_batch_size_they_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a timing child builds for each --chunk-mib size really runs its stages on sub-batches of
    that size (stage 0 of this shape holds 1/16 MiB of MLP activation per image)."""
    from models.swinv2.model import SwinV2Stage

    swinv2_bench = load_script("benchmark_swinv2")
    seen: list[int] = []
    forward = SwinV2Stage._forward
    monkeypatch.setattr(SwinV2Stage, "_forward", lambda self, x, masks: seen.append(x.shape[0]) or forward(self, x, masks))
    shape = dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], image_size=64)
    x = torch.randn(2, 3, 64, 64)
    for mib, expected in ((1 / 16, 1), (None, 2)):
        seen.clear()
        _, ours = swinv2_bench.build_models(8, shape=shape, chunk_mib=mib)
        swinv2_bench.make_step(ours, x, "eval")()
        assert seen[0] == expected, (mib, seen)


def test_swinv2_chunk_sweep_times_each_size_in_its_own_fresh_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep runs one child per size and process, the sizes taking turns, and each row reports
    that size's children."""
    swinv2_bench = load_script("benchmark_swinv2")
    commands: list[list[str]] = []

    def fake_child(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
        commands.append(command)
        size = command[command.index("--child-chunk-mib") + 1]
        return {"transformers": 1.0, "inhouse": {"0.0625": 0.5, "none": 0.8}[size] * len(commands)}

    monkeypatch.setattr(swinv2_bench, "json_from_child", fake_child)
    args = argparse.Namespace(batch=1, threads=1, repeats=1, warmup=0, processes=2)
    rows = swinv2_bench.chunk_rows("eval_w8", [1 / 16, None], args)
    sizes = [c[c.index("--child-chunk-mib") + 1] for c in commands]
    assert sizes == ["0.0625", "none", "0.0625", "none"]
    assert all(c[c.index("--timing-child") + 1] == "eval_w8" for c in commands)
    # 1/16 MiB: in-house 0.5 and 1.5 s (speed-ups 2 and 2/3); none: 1.6 and 3.2 s (0.625 and 0.3125)
    assert rows[0].split(" | ")[1:] == ["0.0625", "1.000", f"**{(2 + 2 / 3) / 2:.3f}x**", "0.67-2.00x |"]
    assert rows[1].split(" | ")[1:] == ["None", "2.400", f"**{(0.625 + 0.3125) / 2:.3f}x**", "0.31-0.62x |"]
    assert swinv2_bench.child_chunk("auto") == "auto" and swinv2_bench.child_chunk("none") is None


def test_swinv2_chunk_sweep_refuses_a_size_that_is_not_positive() -> None:
    swinv2_bench = load_script("benchmark_swinv2")
    assert swinv2_bench.chunk_size("none") is None and swinv2_bench.chunk_size("24") == 24.0
    for bad in ("0", "-8", "big", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{bad}' is not a positive number of MiB"):
            swinv2_bench.chunk_size(bad)


# ---------------------------------------------------------------------------- full-size benchmark
fullsize = load_script("benchmark_fullsize")


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_fullsize_benchmark_runs_at_tiny_shapes(capsys: pytest.CaptureFixture) -> None:
    assert fullsize.main(["--shape", "tiny", "--batch-sizes", "1", "2", "--image-size", "56", "--repeats", "2",
                          "--flop-shapes", "tiny", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    timed = {(r[0], r[1], r[2]): r for r in _table_rows(out, "ours") + _table_rows(out, "InternVL-native")}
    assert len(timed) == 4 * 2  # (a), (b), (b) without the cache, (c), at two batch sizes
    for batch in ("1", "2"):
        assert timed[("ours", "internvit", batch)][5] == timed[("ours", "swin", batch)][5] == "0"  # cached
        assert timed[("ours, no cache", "swin", batch)][5] == timed[("InternVL-native", "internvit", batch)][5] == "2"
        assert timed[("InternVL-native", "internvit", batch)][7] == "**1.00x**"
    flops = _table_rows(out, "tiny")
    assert [r[:2] for r in flops] == [[s, w] for s in ("tiny", "tiny-llama")
                                      for w in ("ours (internvit)", "ours (swin)", "InternVL-native")]


def test_fullsize_flops_on_the_meta_device_equal_flops_on_real_tensors() -> None:
    shapes, size = fullsize.SHAPES["tiny"], (56, 56)
    for encoder in ("internvit", "swin"):
        assert fullsize.counter_flops(shapes, encoder, size, torch.device("meta")) == \
            fullsize.counter_flops(shapes, encoder, size, torch.device("cpu"))
    meta = fullsize.native_flops(shapes, size, 24, torch.device("meta"))
    assert meta == fullsize.native_flops(shapes, size, 24, torch.device("cpu"))
    ours = fullsize.counter_flops(shapes, "internvit", size, torch.device("meta"))
    assert meta[0] == ours[0]  # the same ViT and projector shapes
    assert meta[1] > 2 * ours[1]  # the native LLM reads 4 image + 24 text tokens, ours the 8-token question
