"""The one measurement toolbox every benchmark script uses: timing, FLOPs, memory, tables, machine info.

Timing (`alternate_timings`, `median_seconds`, `seconds_per_call`, `ForwardTimer`): wall-clock
`time.perf_counter`, warm-up calls untimed, several candidates alternated in one process with the
order flipped every repeat (so a slow spell of a shared machine hits all of them), medians reported;
on CUDA the device is synchronised around every timed call.

Fresh processes (`json_from_child`): a CPU process's allocator state (glibc's dynamic mmap threshold
and heap trimming decide whether a large tensor is page-faulted in afresh), address-space layout and
caches move its timings by several per cent, and they stay put for the life of the process, so
repeats inside one process never average them out. As pyperf does, a benchmark samples them by
timing in several fresh processes and reporting the median over processes.

FLOPs (`count_flops`): `torch.utils.flop_counter.FlopCounterMode`, 2 per multiply-add, with CPU fused
attention counted too (torch counts only the CUDA kernels).

Memory (`peak_memory_mib`, `reset_peak_memory` / `peak_memory_since_reset_mib`, `rss_mib`): on CPU the growth of the process's resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs) over its resident set just before the call; pin
glibc's mmap threshold first (`pin_malloc_to_mmap`) so freed activations go back to the OS instead of
hiding in the heap. On CUDA `torch.cuda.max_memory_allocated` over the call, minus what was allocated
before it. The trainer uses the reset / since-reset pair for each stage's peak (absolute, not growth).

Reporting: `markdown_table`, `machine_info` (what a timing depends on, load average included),
`parse_size` / `size_label` for "448" and "1344x448" sizes. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.utils import logging as hf_logging

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# The same pin for a child process, through glibc's environment tunables (and no trimming delay).
MALLOC_PIN_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# ------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate_timings(steps: dict[str, Callable[[], Any]], repeats: int, warmup: int = 0,
                      device: torch.device | None = None) -> dict[str, float]:
    """Median seconds per call of each step, the steps run alternately (order flipped every repeat).

    Args:
        steps: name -> a no-argument call.
        repeats: timed calls per step.
        warmup: untimed rounds of every step first.
        device: synchronised around each timed call when it is a CUDA device.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def json_from_child(command: Sequence[str], env: dict[str, str] | None = None) -> Any:
    """Run `command` in a fresh process and return the JSON value on the last line of its stdout.

    Raises:
        RuntimeError: the process failed or printed no JSON; the message has its exit status and
            the last line of its stderr.
    """
    done = subprocess.run(list(command), capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{' '.join(command)}: exit status {done.returncode}: {last}")
    return json.loads(lines[-1])


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device | None = None) -> float:
    """Median wall time of `repeats` calls of `fn` (the caller warms up first)."""
    return alternate_timings({"fn": fn}, repeats, 0, device)["fn"]


def seconds_per_call(fn: Callable[[Any], Any], inputs: Sequence[Any]) -> list[float]:
    """Wall seconds of `fn(x)` for every `x` in `inputs`, in order (the caller warms up first)."""
    seconds = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        seconds.append(time.perf_counter() - start)
    return seconds


def percentile(values: Sequence[float], q: int) -> float:
    """The q-th percentile (inclusive method; exact for small samples), the value itself for one sample."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


class ForwardTimer:
    """Wall time and count of a module's forwards, from a pre- and a post-forward hook."""

    def __init__(self, module: nn.Module) -> None:
        self.seconds, self.calls, self._start = 0.0, 0, 0.0
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, module: nn.Module, args: Any) -> None:
        self._start = time.perf_counter()

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """The machine's measured float32 GEMM rate (GFLOP/s) on `threads` threads: median of size^3 GEMMs."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats) / 1e9


# ------------------------------------------------------------------------------------------- FLOPs
def _cpu_attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                         out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of CPU fused attention: Q K^T and P V, (B, heads, L, D)."""
    b, heads, q_len, dim = query_shape
    return 2 * b * heads * q_len * key_shape[-2] * (dim + value_shape[-1])


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 per multiply-add) of one call of `fn`, counted per op by torch; the call also warms up."""
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------ memory
def pin_malloc_to_mmap() -> None:
    """Make glibc return freed large blocks to the OS, so the resident set tracks live memory."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    except (OSError, AttributeError):  # not glibc: peak numbers then include reused heap
        pass


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, ...); None when the process or the field is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of one process in MiB (0 once it has gone)."""
    return (status_kib("VmRSS", pid) or 0) / 1024


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (empty when it has gone)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's peak statistics, or the CPU process's VmHWM; False if it cannot be reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    except OSError:
        return False
    return True


def peak_memory_since_reset_mib(device: torch.device) -> float | None:
    """The peak since `reset_peak_memory`: `torch.cuda.max_memory_allocated` on CUDA, else peak RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = status_kib("VmHWM")
    return None if peak is None else peak / 1024


def peak_memory_kind(device: torch.device) -> str:
    """What `peak_memory_since_reset_mib` measures on `device`, in words."""
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Extra memory one call of `fn` needs at its peak, in MiB (see the module docstring); None if unknown."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = status_kib("VmRSS")
    if not reset_peak_memory(device) or before is None:
        return None
    fn()
    peak = peak_memory_since_reset_mib(device)
    if peak is None:
        return None
    return peak - (before / 2**20 if device.type == "cuda" else before / 1024)


# --------------------------------------------------------------------------------------- reporting
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats are printed as given (format them before), None as an en dash.

    Line breaks inside a value become spaces and "|" is escaped, so a row always stays one row.
    """
    def cell(value: Any) -> str:
        return "–" if value is None else " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info(threads: int) -> dict[str, Any]:
    """What a timing depends on: CPU, cores, torch, threads, and the load average right now."""
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def quiet_and_threaded(threads: int | None) -> None:
    """What every benchmark does first: no transformers logging or progress bars; `threads` torch threads."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)


def parse_size(text: str) -> tuple[int, int]:
    """"448" -> (448, 448); "1344x448" -> (height 1344, width 448)."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"size {text!r}: expected S or HxW, e.g. 448 or 1344x448")


def size_label(size: tuple[int, int]) -> str:
    """(448, 448) -> "448"; (1344, 448) -> "1344x448"."""
    return f"{size[0]}" if size[0] == size[1] else f"{size[0]}x{size[1]}"
