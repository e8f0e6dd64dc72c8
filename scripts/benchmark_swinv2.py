"""Speed and memory of the in-house Swin V2 against transformers' Swinv2Model (same weights).

Prints a Markdown table. Not a test: it measures, it does not fail on a slow machine.

Method:
- both models are built from one seeded random transformers model (the in-house one through
  `from_transformers`), float32, `torch.set_num_threads(--threads)`, drop path off;
- each case is timed in `--processes` fresh child processes: a child builds both models, warms
  them up and alternates them (the order flips every repeat), printing each model's median of
  `--repeats`; the table gives each model's median over the children and the median of the
  children's speed-ups (each child's transformers time over its in-house time), with their range.
  A process's allocator state and memory layout move a timing by several per cent and stay put for
  its whole life, so repeats in one process cannot average them out (models/measure.py); eval runs
  under `torch.no_grad()` for both;
- a train step is zero_grad + forward + mean-square loss of `last_hidden_state` + backward;
- peak memory of a train step is the growth of the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs) over its resident set just before the step, measured in a fresh child process
  per model (so neither sees the other's freed memory), after one warm-up step, with glibc's mmap
  threshold pinned so freed activations go back to the OS; median of `--memory-repeats` children;
- FLOPs are counted once with `torch.utils.flop_counter.FlopCounterMode` on transformers' model
  (matmuls and the convolution, i.e. the same math for both) and divided by each median time; the
  machine's float32 matmul rate is the median of 2048x2048 GEMMs on the same threads.

Usage:
    python scripts/benchmark_swinv2.py                 # full: batch 8, 5 processes x 5 repeats, 3 memory children
    python scripts/benchmark_swinv2.py --processes 1 --repeats 3 --memory-repeats 1 --cases eval_w8
    python scripts/benchmark_swinv2.py --backends --device cuda --dtype bfloat16   # the GPU check
    python scripts/benchmark_swinv2.py --chunk-mib 12 16 24 none    # the CPU sub-batch sweep (fresh processes too)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.measure import (MALLOC_PIN_ENV, alternate_timings, count_flops, json_from_child,  # noqa: E402
                            matmul_gflops, peak_memory_mib)
from models.swinv2 import from_transformers  # noqa: E402

TINY_SHAPE = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], image_size=256)


@dataclass(frozen=True)
class Case:
    """One row: what is run, at which window, and the speed-up the issue asks for."""

    name: str
    mode: str  # "eval" or "train"
    window: int
    target: float


CASES = {
    "eval_w8": Case("eval forward, 256x256, window 8", "eval", 8, 1.2),
    "eval_w16": Case("eval forward, 256x256, window 16", "eval", 16, 1.5),
    "train_w8": Case("train step (fwd+bwd), 256x256, window 8", "train", 8, 1.05),
}


def build_models(window: int, seed: int = 0, shape: dict | None = None,
                 chunk_mib: float | str | None = "auto") -> tuple[nn.Module, nn.Module]:
    """(transformers Swinv2Model, in-house model) with identical random weights (`TINY_SHAPE` unless
    `shape`); `chunk_mib` is the in-house model's sub-batch size (`SwinV2Config.chunk_mib`)."""
    from transformers import Swinv2Config, Swinv2Model

    torch.manual_seed(seed)
    hf = Swinv2Model(Swinv2Config(window_size=window, drop_path_rate=0.0, **(shape or TINY_SHAPE)))
    return hf, from_transformers(hf, chunk_mib=chunk_mib)


def make_step(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """A closure running one eval forward or one train step of `model` on `x`."""
    if mode == "eval":
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model(x)
        return step
    model.train()

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).last_hidden_state.pow(2).mean().backward()
    return train_step


# -- peak memory of one train step, in a fresh child process -----------------------------------------

def memory_child(impl: str, window: int, batch: int, threads: int) -> None:
    """Print the peak-RSS growth (MiB) of one train step of `impl`; run as a separate process."""
    torch.set_num_threads(threads)
    hf, ours = build_models(window)
    model = hf if impl == "transformers" else ours
    del hf, ours
    gc.collect()
    x = torch.randn(batch, 3, 256, 256)
    step = make_step(model, x, "train")
    step()  # warm-up: one-time kernels and caches
    model.zero_grad(set_to_none=True)
    gc.collect()
    print(json.dumps({"peak_mib": peak_memory_mib(step, torch.device("cpu"))}))


def peak_memory(impl: str, window: int, batch: int, threads: int) -> float:
    command = [sys.executable, __file__, "--memory-child", impl, "--window", str(window),
               "--batch", str(batch), "--threads", str(threads)]
    return json_from_child(command, env={**os.environ, **MALLOC_PIN_ENV})["peak_mib"]


# -- timing of one case, in fresh child processes ---------------------------------------------------

def timing_child(case: str, batch: int, threads: int, repeats: int, warmup: int,
                 chunk_mib: float | str | None = "auto") -> None:
    """Print both models' median seconds for `case` as JSON; run as a separate process."""
    torch.set_num_threads(threads)
    mode, window = CASES[case].mode, CASES[case].window
    hf, ours = build_models(window, chunk_mib=chunk_mib)
    x = torch.randn(batch, 3, 256, 256)
    steps = {"transformers": make_step(hf, x, mode), "inhouse": make_step(ours, x, mode)}
    print(json.dumps(alternate_timings(steps, repeats, warmup)))


def time_in_child(case: str, args: argparse.Namespace, chunk_mib: float | str | None = "auto") -> dict[str, float]:
    """{"transformers": s, "inhouse": s} for `case`, timed in one fresh child process."""
    command = [sys.executable, __file__, "--timing-child", case, "--child-chunk-mib", str(chunk_mib).lower(),
               "--batch", str(args.batch), "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup)]
    return json_from_child(command)


def speedup_summary(runs: list[dict[str, float]]) -> tuple[float, float, float]:
    """(median, lowest, highest) of the children's own speed-ups (transformers time / in-house time)."""
    speedups = sorted(run["transformers"] / run["inhouse"] for run in runs)
    return statistics.median(speedups), speedups[0], speedups[-1]


# -- SDPA backends on a GPU ---------------------------------------------------------------------------

BACKENDS = ("flash", "efficient", "math")


def backend_rows(device: str, dtype: torch.dtype, window: int, batch: int, repeats: int, warmup: int,
                 shape: dict | None = None) -> list[list[str]]:
    """Eval forward and train step of transformers' eager Swinv2Model and of the in-house model under
    each SDPA backend, in `dtype` on `device`, same weights.

    Each row: mode, model, median ms, speed-up over the eager reference, max |difference| of the eval
    output from the float32 eager output (eval rows only), peak allocated memory in MiB over the
    step's starting allocation (CUDA only). A backend that cannot run the model (the flash kernels take
    no additive mask, and Swin V2 always needs one for its position bias) gets a row saying why
    instead of a time.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}
    hf, ours = build_models(window, shape=shape)
    side = (shape or TINY_SHAPE)["image_size"]
    x = torch.randn(batch, 3, side, side, device=device)
    hf.to(device).eval()
    ours.to(device)
    with torch.no_grad():
        reference = hf(x).last_hidden_state.float()
    hf.to(dtype)
    ours.to(dtype)
    x = x.to(dtype)
    cuda = torch.device(device).type == "cuda"
    candidates = {"transformers (eager)": (hf, None)} | {f"in-house, SDPA {b}": (ours, kernels[b]) for b in BACKENDS}

    def under(backend: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            if backend is None:
                out = fn()
            else:
                with sdpa_kernel(backend):
                    out = fn()
            if cuda:
                torch.cuda.synchronize()
            return out
        return run

    rows = []
    for mode in ("eval", "train"):
        steps, notes = {}, {}
        for name, (model, backend) in candidates.items():
            step = under(backend, make_step(model, x, mode))
            try:
                step()
            except RuntimeError as err:  # e.g. the backend refused these inputs: torch says why
                notes[name] = f"not run: {str(err).strip().split('. ')[0][:160]}"
                continue
            steps[name] = step
        times = alternate_timings(steps, repeats, warmup) if steps else {}
        base = times.get("transformers (eager)")
        for name, (model, backend) in candidates.items():
            if name in notes:
                rows.append([mode, name, notes[name], "", "", ""])
                continue
            diff = ""
            if mode == "eval":
                model.eval()
                with torch.no_grad():
                    out = under(backend, lambda: model(x).last_hidden_state)()
                diff = f"{(out.float() - reference).abs().max().item():.2e}"
            peak = f"{peak_memory_mib(steps[name], torch.device(device)):.0f}" if cuda else ""
            speedup = f"{base / times[name]:.2f}x" if base else ""
            rows.append([mode, name, f"{1e3 * times[name]:.1f}", speedup, diff, peak])
    return rows


# -- sub-batch sweep -----------------------------------------------------------------------------------

def chunk_rows(case: str, sizes: list[float | None], args: argparse.Namespace) -> list[str]:
    """One row per `chunk_mib` value: the in-house model's median time and its speed-up over
    transformers (median over `args.processes` fresh children per size, with their range). The sizes
    take turns child by child, so a slow spell of the machine hits each of them."""
    runs: dict[float | None, list[dict[str, float]]] = {mib: [] for mib in sizes}
    for _ in range(args.processes):
        for mib in sizes:
            runs[mib].append(time_in_child(case, args, chunk_mib=mib))
    rows = []
    for mib in sizes:
        median, low, high = speedup_summary(runs[mib])
        inhouse = statistics.median(run["inhouse"] for run in runs[mib])
        rows.append(f"| {CASES[case].name} | {mib} | {inhouse:.3f} | **{median:.3f}x** | {low:.2f}-{high:.2f}x |")
    return rows


def chunk_size(text: str) -> float | None:
    """A `--chunk-mib` value: a positive number of MiB, or "none" (whole batches)."""
    if text.lower() == "none":
        return None
    try:
        mib = float(text)
    except ValueError:
        mib = 0.0
    if not (0 < mib < math.inf):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of MiB or 'none'")
    return mib


def child_chunk(text: str) -> float | str | None:
    """The child's `chunk_mib`: "auto", "none" or a positive number of MiB."""
    return "auto" if text == "auto" else chunk_size(text)


def print_chunk_table(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {args.threads} threads, float32, swinv2-tiny shape, batch {args.batch}, "
          f"{args.processes} fresh processes per size x median of {args.repeats}; chunk_mib None = no sub-batches\n")
    print("| case | chunk_mib | in-house (s) | speed-up over transformers | per-process range |")
    print("|---|---|---|---|---|")
    for case in ("eval_w8", "train_w8"):
        for row in chunk_rows(case, args.chunk_mib, args):
            print(row, flush=True)


# -- report --------------------------------------------------------------------------------------------

def run_case(name: str, args: argparse.Namespace, peak: float) -> list[str]:
    case = CASES[name]
    hf, _ = build_models(case.window)
    flops = count_flops(make_step(hf, torch.randn(args.batch, 3, 256, 256), case.mode))
    del hf
    runs = [time_in_child(name, args) for _ in range(args.processes)]
    t = {impl: statistics.median(run[impl] for run in runs) for impl in ("transformers", "inhouse")}
    speedup, low, high = speedup_summary(runs)
    gflops = {k: flops / v / 1e9 for k, v in t.items()}
    rows = [f"| {case.name} | {t['transformers']:.3f} | {t['inhouse']:.3f} | **{speedup:.3f}x** | "
            f"{low:.2f}-{high:.2f}x | >= {case.target}x | {'yes' if speedup >= case.target else 'NO'} | "
            f"{gflops['transformers']:.1f} / {gflops['inhouse']:.1f} | "
            f"{100 * gflops['transformers'] / peak:.0f}% / {100 * gflops['inhouse'] / peak:.0f}% |"]
    if case.mode == "train" and args.memory_repeats > 0:
        mem = {impl: statistics.median(peak_memory(impl, case.window, args.batch, args.threads)
                                       for _ in range(args.memory_repeats))
               for impl in ("transformers", "inhouse")}
        ratio = mem["inhouse"] / mem["transformers"]
        rows.append(f"| ↳ peak RSS growth of that train step (MiB) | {mem['transformers']:.0f} | "
                    f"{mem['inhouse']:.0f} | {ratio:.2f}x | | <= 1.0x | {'yes' if ratio <= 1.0 else 'NO'} | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--processes", type=int, default=5,
                        help="fresh child processes per case (median over them)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model in each process (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-repeats", type=int, default=3, help="child processes per model; 0 skips")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--backends", action="store_true",
                        help="instead: the SDPA-backend table (flash, efficient, math against transformers' "
                             "eager attention) on --device in --dtype, window 8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the --backends table")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the --backends table")
    parser.add_argument("--chunk-mib", nargs="+", metavar="MIB", type=chunk_size,
                        help="instead: eval and train times of the in-house model at each sub-batch size "
                             "(SwinV2Config.chunk_mib; 'none' = whole batches), against transformers, "
                             "--processes fresh children per size")
    parser.add_argument("--memory-child", choices=["transformers", "inhouse"], help=argparse.SUPPRESS)
    parser.add_argument("--timing-child", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--child-chunk-mib", type=child_chunk, default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.window, args.batch, args.threads)
        return
    if args.timing_child:
        timing_child(args.timing_child, args.batch, args.threads, args.repeats, args.warmup, args.child_chunk_mib)
        return

    torch.set_num_threads(args.threads)
    if args.backends:
        print_backend_table(args)
        return
    if args.chunk_mib:
        print_chunk_table(args)
        return
    peak = matmul_gflops(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, swinv2-tiny shape "
          f"(embed 96, depths 2-2-6-2, heads 3-6-12-24), batch {args.batch}, {args.processes} fresh processes "
          f"x median of {args.repeats} repeats, measured float32 matmul: {peak:.1f} GFLOP/s\n")
    print("| case | transformers (s) | in-house (s) | speed-up | per-process range | target | met "
          "| GFLOP/s (hf / in-house) | of matmul peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        for row in run_case(name, args, peak):
            print(row, flush=True)


def print_backend_table(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"torch {torch.__version__}, {name}, {args.dtype}, swinv2-tiny shape, 256x256 window 8, "
          f"batch {args.batch}, median of {args.repeats}; max |diff| is the eval output against the "
          f"float32 eager output\n")
    if device.type == "cpu":
        print("(on CPU a train step with a trainable position bias uses the project's own attention "
              "function whatever the backend)\n")
    print("| mode | model | ms | speed-up vs eager | max abs diff vs fp32 | peak MiB |")
    print("|---|---|---|---|---|---|")
    for row in backend_rows(args.device, getattr(torch, args.dtype), 8, args.batch, args.repeats, args.warmup):
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
