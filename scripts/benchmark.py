"""Scaling benchmark: how each vision encoder's cost grows with image size, and whole-model throughput.

    python scripts/benchmark.py                                   # every registered encoder, every size
    python scripts/benchmark.py --encoders swin internvit --sizes 224 448 --repeats 2 --no-model
    python scripts/benchmark.py --json outputs/benchmark.json --threads 1

Two tables, printed as Markdown (and written with `--json PATH`):

1. **Encoders** -- each registered encoder built *at random* from its adapter's
   `recipe.benchmark_config` (comparable width, depth and parameter count, see below; `--tiny` takes
   `recipe.tiny_config` instead, for a smoke run), batch `--batch` (default 1) of random pixels, at every
   `--sizes` entry (a side `S` means S x S; `HxW` is height x width, so the default `1344x448` is a
   tall receipt): forward time (median of `--repeats` after one untimed warm-up), multiply-add FLOPs
   counted by `torch.utils.flop_counter`, output tokens (`encoder.num_tokens`), peak memory, and the
   growth of time and FLOPs relative to the encoder's smallest square size next to the growth in pixels.
2. **Whole model** -- the receipt counter (`models.build.build_model`) with the same matched encoder and
   the tiny InternVL2 LLM (`models.tiny`), batch `--model-batch`: one training step (forward, backward,
   AdamW step over the recipe's vision stage: projector, fusion, head and the whole encoder, frozen
   through the project's own `train.trainability.apply_stage`) and one inference forward
   (`torch.inference_mode`), as images/s, plus the visual tokens per image (`model.num_image_tokens`).

"Matched" (each adapter's `recipe.benchmark_config` in models/encoders/) means: the same number of
transformer blocks (12), a similar parameter count (InternViT 5.6 M: width 192 = ViT-Ti, 3 heads,
MLP 768, patch 14 as InternViT; Swin / Swin V2 6.9 M: embed 48, depths 2-2-6-2 = Swin-T's layout at
half its width, heads 2-4-8-16, patch 4, window 7) and a similar cost at 224 px. The ViT keeps its position table at InternViT's native 448 px and interpolates it
for other sizes, as the real model does. The ViT's attention is global (cost ~ tokens^2), Swin's is
windowed (cost ~ tokens), which is what the growth columns show.

Peak memory (CPU): the growth of the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) over its resident set just before the measured call, after a warm-up call,
with glibc's mmap threshold pinned at 64 KiB so freed activations go back to the OS instead of hiding
in the heap. It is what the call needs on top of the already-loaded model. On CUDA it is
`torch.cuda.max_memory_allocated` over the call, minus the memory allocated before it.

Timings are wall-clock on `torch.set_num_threads(--threads)`; concurrently running processes inflate
them badly (and 2 threads on 2 busy cores spin), so every table records the load average before and
after. Nothing here is a test: it measures and never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from config import load_config  # noqa: E402
from config.schema import StageConfig  # noqa: E402
from models.build import build_model  # noqa: E402
from models.encoders import EncoderUnavailableError, VisionEncoder, encoder_names, get_encoder_class  # noqa: E402
from models.internvl2 import InternVL2MultimodalModel  # noqa: E402
from models.measure import (count_flops, machine_info, markdown_table, median_seconds, parse_size,  # noqa: E402
                            peak_memory_mib, pin_malloc_to_mmap, quiet_and_threaded, size_label)
from models.tiny import write_tiny_checkpoints  # noqa: E402
from train.trainability import apply_stage  # noqa: E402

VISION_STAGE = ["projector", "fusion", "head", "vision.all"]  # what the recipe's vision stage trains
DEFAULT_SIZES = ["224", "448", "896", "1344", "1344x448"]


# -------------------------------------------------------------------------------------- encoders
@dataclass
class EncoderRow:
    """One encoder at one input size."""

    encoder: str
    input: str
    height: int
    width: int
    megapixels: float
    tokens: int
    params_m: float
    gflops: float
    forward_ms: float
    peak_mib: float | None
    pixels_x: float = 1.0  # pixels relative to the encoder's first row
    time_x: float = 1.0
    flops_x: float = 1.0


def matched_config(name: str, tiny: bool = False) -> dict[str, Any]:
    """The random-init backbone config `name`'s adapter declares for benchmarks (`tiny`: its unit-test one)."""
    recipe = get_encoder_class(name).recipe
    return dict(recipe.tiny_config if tiny else recipe.benchmark_config)


def build_matched_encoder(name: str, size: tuple[int, int], tiny: bool = False) -> VisionEncoder:
    """The registry's adapter for `name`, at random from its matched config, in eval mode."""
    return get_encoder_class(name).build(None, matched_config(name, tiny), size).eval()


def measure_encoder(name: str, size: tuple[int, int], batch: int, repeats: int, device: torch.device,
                    tiny: bool = False) -> EncoderRow:
    """Forward cost of the matched `name` encoder on a (batch, 3, H, W) random input."""
    encoder = build_matched_encoder(name, size, tiny).to(device)
    pixels = torch.randn(batch, 3, *size, device=device)

    @torch.inference_mode()
    def forward() -> None:
        encoder(pixels)

    flops = count_flops(forward)
    peak = peak_memory_mib(forward, device)
    seconds = median_seconds(forward, repeats, device)
    return EncoderRow(encoder=name, input=size_label(size), height=size[0], width=size[1],
                      megapixels=size[0] * size[1] / 1e6, tokens=encoder.num_tokens(size),
                      params_m=sum(p.numel() for p in encoder.parameters()) / 1e6, gflops=flops / batch / 1e9,
                      forward_ms=1000 * seconds / batch, peak_mib=peak)


def add_growth(rows: list[EncoderRow]) -> None:
    """Fill pixels_x / time_x / flops_x relative to each encoder's first row (the smallest size asked)."""
    first: dict[str, EncoderRow] = {}
    for row in rows:
        ref = first.setdefault(row.encoder, row)
        row.pixels_x = row.megapixels / ref.megapixels
        row.time_x = row.forward_ms / ref.forward_ms
        row.flops_x = row.gflops / ref.gflops


def encoder_table(rows: list[EncoderRow]) -> str:
    headers = ["encoder", "input HxW", "tokens out", "params (M)", "GFLOPs/img", "forward ms/img",
               "peak MiB", "pixels ×", "time ×", "FLOPs ×"]
    body = [[r.encoder, r.input, r.tokens, f"{r.params_m:.1f}", f"{r.gflops:.2f}", f"{r.forward_ms:.1f}",
             None if r.peak_mib is None else f"{r.peak_mib:.0f}", f"{r.pixels_x:.0f}", f"{r.time_x:.1f}",
             f"{r.flops_x:.1f}"] for r in rows]
    return markdown_table(headers, body)


# ----------------------------------------------------------------------------------- whole model
@dataclass
class ModelRow:
    """The whole receipt counter with one matched encoder at one input size."""

    encoder: str
    input: str
    visual_tokens: int
    batch: int
    train_step_ms: float
    train_images_per_s: float
    infer_images_per_s: float
    train_peak_mib: float | None
    infer_peak_mib: float | None


def build_matched_model(name: str, size: tuple[int, int], language_checkpoint: Path, tiny: bool = False
                        ) -> InternVL2MultimodalModel:
    """The receipt counter with the matched `name` encoder (random) and the tiny InternVL2 LLM."""
    config = load_config(ROOT / "config" / "base.yaml", [
        f"model.vision.encoder={name}", "model.vision.checkpoint=null", "model.vision.fallback=null",
        f"model.vision.image_size=[{size[0]}, {size[1]}]", f"model.language.checkpoint={language_checkpoint}",
        f"model.projector.pixel_shuffle={get_encoder_class(name).recipe.pixel_shuffle}"])
    config.model.vision.config = matched_config(name, tiny)
    return build_model(config.model)


def make_train_step(model: InternVL2MultimodalModel, batch: int, size: tuple[int, int],
                    device: torch.device) -> Callable[[], None]:
    """One optimizer step of the recipe's vision stage on random pixels and labels."""
    trainable = apply_stage(model, StageConfig(trainable=VISION_STAGE), model.parameter_groups(), [])
    optimizer = torch.optim.AdamW([t.param for t in trainable], lr=1e-4)
    pixels = torch.randn(batch, 3, *size, device=device)
    labels = torch.randint(0, model.config.num_classes, (batch,), device=device)
    ids, mask = model.tokenize([None] * batch, device)

    def step() -> None:
        model.train()
        model(pixels, ids, mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_inference(model: InternVL2MultimodalModel, batch: int, size: tuple[int, int],
                   device: torch.device) -> Callable[[], None]:
    pixels = torch.randn(batch, 3, *size, device=device)
    ids, mask = model.tokenize([None] * batch, device)

    @torch.inference_mode()
    def forward() -> None:
        model.eval()
        model(pixels, ids, mask)

    return forward


def measure_model(name: str, size: tuple[int, int], batch: int, repeats: int, device: torch.device,
                  language_checkpoint: Path, tiny: bool = False) -> ModelRow:
    """Training-step and inference throughput of the whole model with the matched `name` encoder."""
    model = build_matched_model(name, size, language_checkpoint, tiny).to(device)
    step, infer = make_train_step(model, batch, size, device), make_inference(model, batch, size, device)
    step()  # warm-up; Adam state is allocated here, so the peak below is a steady-state step
    train_peak = peak_memory_mib(step, device)
    train_s = median_seconds(step, repeats, device)
    infer()
    infer_peak = peak_memory_mib(infer, device)
    infer_s = median_seconds(infer, repeats, device)
    return ModelRow(encoder=name, input=size_label(size), visual_tokens=model.num_image_tokens(size), batch=batch,
                    train_step_ms=1000 * train_s, train_images_per_s=batch / train_s,
                    infer_images_per_s=batch / infer_s, train_peak_mib=train_peak, infer_peak_mib=infer_peak)


def model_table(rows: list[ModelRow]) -> str:
    headers = ["encoder", "input HxW", "visual tokens", "batch", "train step ms", "train img/s", "infer img/s",
               "train peak MiB", "infer peak MiB"]
    body = [[r.encoder, r.input, r.visual_tokens, r.batch, f"{r.train_step_ms:.0f}", f"{r.train_images_per_s:.1f}",
             f"{r.infer_images_per_s:.1f}", None if r.train_peak_mib is None else f"{r.train_peak_mib:.0f}",
             None if r.infer_peak_mib is None else f"{r.infer_peak_mib:.0f}"] for r in rows]
    return markdown_table(headers, body)


# ------------------------------------------------------------------------------------------- CLI
def select_encoders(requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(encoders to run, notes on registered encoders left out: their adapter cannot be imported).
    Unknown names are an error."""
    registered = encoder_names()
    unknown = sorted(set(requested or []) - set(registered))
    if unknown:
        raise SystemExit(f"unknown encoder(s) {unknown}; registered: {', '.join(registered)}")
    names, notes = [], []
    for name in requested or registered:
        try:
            get_encoder_class(name)
            names.append(name)
        except EncoderUnavailableError as e:
            notes.append(f"{name}: skipped, {e}")
    return names, notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", help="registry names (default: every registered encoder)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[parse_size(s) for s in DEFAULT_SIZES],
                        help="S or HxW (default: %(default)s)".replace("%(default)s", " ".join(DEFAULT_SIZES)))
    parser.add_argument("--batch", type=int, default=1, help="images per encoder forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set explicitly)")
    parser.add_argument("--no-encoders", action="store_true", help="skip the encoder scaling table")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model table")
    parser.add_argument("--model-sizes", nargs="+", type=parse_size, default=[(224, 224), (448, 448)])
    parser.add_argument("--model-batch", type=int, default=4, help="images per whole-model step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--tiny", action="store_true",
                        help="each adapter's tiny unit-test config instead of its matched one (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write every row and the machine record here")
    return parser.parse_args(argv)


def run_encoders(names: list[str], args: argparse.Namespace, device: torch.device, notes: list[str]
                 ) -> list[EncoderRow]:
    """Every (encoder, size) case; a size an encoder refuses (swin below its window) becomes a note."""
    rows = []
    for name in names:
        for size in args.sizes:
            try:
                rows.append(measure_encoder(name, size, args.batch, args.repeats, device, args.tiny))
            except ValueError as e:
                notes.append(f"{name} at {size_label(size)}: skipped, {e}")
                continue
            print(f"  {name} {size_label(size)}: {rows[-1].forward_ms:.1f} ms", file=sys.stderr, flush=True)
    add_growth(rows)
    return rows


def run_models(names: list[str], args: argparse.Namespace, device: torch.device, notes: list[str]
               ) -> list[ModelRow]:
    """Every (encoder, size) whole-model case, on the tiny InternVL2 LLM written to a temporary folder."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        language = write_tiny_checkpoints(Path(tmp), seed=0)["internvl2"]
        for name in names:
            for size in args.model_sizes:
                try:
                    rows.append(measure_model(name, size, args.model_batch, args.repeats, device, language,
                                              args.tiny))
                except ValueError as e:
                    notes.append(f"model with {name} at {size_label(size)}: skipped, {e}")
                    continue
                print(f"  model {name} {size_label(size)}: {rows[-1].train_step_ms:.0f} ms/step",
                      file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_and_threaded(args.threads)
    pin_malloc_to_mmap()
    device = torch.device(args.device)
    names, notes = select_encoders(args.encoders)
    report: dict[str, Any] = {"command": " ".join(["python scripts/benchmark.py", *(argv or sys.argv[1:])]),
                              "before": machine_info(torch.get_num_threads()), "notes": notes,
                              "encoder_batch": args.batch, "repeats": args.repeats,
                              "tiny": args.tiny, "matched_configs": {n: matched_config(n, args.tiny) for n in names}}
    encoders = [] if args.no_encoders else run_encoders(names, args, device, notes)
    models = [] if args.no_model else run_models(names, args, device, notes)
    report.update(after=machine_info(torch.get_num_threads()), encoders=[asdict(r) for r in encoders],
                  model=[asdict(r) for r in models])
    print(render(report, encoders, models))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def render(report: dict[str, Any], encoders: list[EncoderRow], models: list[ModelRow]) -> str:
    """The printed report: machine line, the two tables, notes."""
    before, after = report["before"], report["after"]
    parts = [f"{before['processor']}, {before['cpu_count']} cores, torch {before['torch']}, "
             f"{before['threads']} thread(s), device {before['cuda'] or 'cpu'}; load average "
             f"{before['load_average'][0]} before, {after['load_average'][0]} after"]
    if encoders:
        parts += [f"\nEncoders (matched configs, batch {report['encoder_batch']}, median of "
                  f"{report['repeats']}):\n", encoder_table(encoders)]
    if models:
        parts += ["\nWhole model (matched encoder + tiny InternVL2 LLM):\n", model_table(models)]
    parts += [f"\nnote: {n}" for n in report["notes"]]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
