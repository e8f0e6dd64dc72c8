"""Full-size inference: the receipt counter against the InternVL-native way, on random weights at real shapes.

    python scripts/benchmark_fullsize.py [--shape internvl2.5-1b] [--batch-sizes 1 8] [--image-size 448]
                                         [--repeats 3] [--threads N]
                                         [--flop-shapes internvl2.5-1b internvl2.5-8b internvl2.5-26b]

Timed (float32 on --device, default cpu; median of --repeats calls after one untimed warm-up call):
  (a) our counter with `internvit`: InternVL2.5's InternViT-300M, pixel shuffle, InternVL's projector,
      the Qwen2 LLM over the question tokens only, gated cross-attention, head -- through
      `ReceiptCounter.predict` on preprocessed tensors, so with the question-state cache as users get it;
  (b) our counter with Swin-B (embed 128, depths 2-2-18-2, window 7) instead of the ViT, the same way;
  (b, no cache) the same model with `question_cache = None`: the LLM reruns for every batch, as before;
  (c) the InternVL-native way: transformers' `InternVLForConditionalGeneration` with the image tokens
      (256 per 448 px image) spliced into the prompt, `logits_to_keep=1`, and the three class answers
      ("0", "1", "2") scored from that one forward pass (softmax over their logits). The prompt holds
      --native-text-tokens text tokens around the image tokens (default 24: chat markers, the question and
      the answer instruction, no system prompt), about 280 tokens per image.
"LLM share" is the time spent inside the LLM's forward (hooks on `model.language` / the native
language model) over the total of the timed calls; "LLM runs" counts its forwards in the timed calls.

Counted (no weights, no timing: models built on the meta device, FLOPs per image at batch 1 counted op
by op by `torch.utils.flop_counter`): the same three ways at each --flop-shapes entry, split into the
vision tower + projector, the LLM and (ours) fusion + head. Ours runs the LLM over the question's
tokens once per distinct question while it is frozen ("cached": none per image); the native way runs
it over ~280 tokens for every image, which is where the 8B and 26B LLMs dominate its cost.

Shapes are the published configs: InternVL2.5-1B = InternViT-300M-448px + Qwen2.5-0.5B (hidden 896,
24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151674); -8B = InternViT-300M + InternLM2.5-7B (4096,
32 layers, 32 / 8 heads, MLP 14336, vocab 92553); -26B = InternViT-6B-448px (3200, 45 layers, 25 heads,
MLP 12800, QK norm, RMSNorm) + InternLM2.5-20B (6144, 48 layers, 48 / 8 heads, MLP 16384). InternLM2's
layers are Llama's (GQA attention, SwiGLU MLP, RMSNorm), so they are built as transformers' Llama, as
transformers' own InternVL conversion does. The question is tokenized by the project's tiny tokenizer
(8 tokens, as many as Qwen2's for the default question). At full shape the models are built one at a
time (about 4 GB each in float32); at the rates the issue measured on 2 threads (0.13-0.61 images/s)
the default run takes about ten minutes on the project's 2 cores: give it the whole machine.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import (AutoConfig, AutoModel, InternVLConfig, InternVLForConditionalGeneration,  # noqa: E402
                          PretrainedConfig)

from config import load_config  # noqa: E402
from models.encoders import encoder_names, get_encoder_class  # noqa: E402
from models.inference import ReceiptCounter  # noqa: E402
from models.internvl2 import InternVL2MultimodalModel  # noqa: E402
from models.measure import (ForwardTimer, count_flops, machine_info, markdown_table, median_seconds,  # noqa: E402
                            quiet_and_threaded)
from models.tiny import build_tokenizer  # noqa: E402

INTERNVIT_300M = get_encoder_class("internvit").recipe.real_config  # the ViT of InternVL2.5-1B and -8B
INTERNVIT_6B = dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
                    patch_size=[14, 14], norm_type="rms_norm", use_qk_norm=True)
QWEN2_5_0_5B = dict(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
INTERNLM2_5_7B = dict(vocab_size=92553, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
INTERNLM2_5_20B = dict(vocab_size=92553, hidden_size=6144, intermediate_size=16384, num_hidden_layers=48,
                       num_attention_heads=48, num_key_value_heads=8, tie_word_embeddings=False)
_TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=[14, 14])
_TINY_TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)


@dataclass(frozen=True)
class Shapes:
    """The configs of one InternVL size: its ViT and its LLM (a transformers model type and fields).

    Another encoder takes its adapter's `recipe.real_config` (Swin-B for swin), or `recipe.tiny_config`
    at the toy sizes.
    """

    vision: dict[str, Any]
    text_type: str
    text: dict[str, Any]
    tiny: bool = False


SHAPES = {
    "internvl2.5-1b": Shapes(INTERNVIT_300M, "qwen2", QWEN2_5_0_5B),
    "internvl2.5-8b": Shapes(INTERNVIT_300M, "llama", INTERNLM2_5_7B),
    "internvl2.5-26b": Shapes(INTERNVIT_6B, "llama", INTERNLM2_5_20B),
    # toy sizes, for the smoke test (image side 56: a 4x4 patch grid, 4 image tokens)
    "tiny": Shapes(_TINY_VIT, "qwen2", _TINY_TEXT, tiny=True),
    "tiny-llama": Shapes(_TINY_VIT, "llama", {**_TINY_TEXT, "tie_word_embeddings": False}, tiny=True),
}
ANSWERS = 3  # the class answers "0", "1", "2" the native way scores


# ---------------------------------------------------------------------------------------- models
def text_config(shapes: Shapes) -> PretrainedConfig:
    return AutoConfig.for_model(shapes.text_type, **shapes.text)


def build_counter(shapes: Shapes, encoder: str, image_size: tuple[int, int]) -> InternVL2MultimodalModel:
    """Our receipt counter at `shapes`, random weights (on the default device: call under `torch.device`)."""
    config = load_config(ROOT / "config" / "base.yaml", [
        f"model.vision.encoder={encoder}", "model.vision.checkpoint=null", "model.vision.fallback=null",
        f"model.vision.image_size=[{image_size[0]}, {image_size[1]}]",
        f"model.projector.pixel_shuffle={get_encoder_class(encoder).recipe.pixel_shuffle}"]).model
    vision = get_encoder_class(encoder).build(None, vision_config(shapes, encoder, image_size), image_size)
    language = AutoModel.from_config(text_config(shapes))
    return InternVL2MultimodalModel(config, vision, language, build_tokenizer()).eval()


def vision_config(shapes: Shapes, encoder: str, image_size: tuple[int, int]) -> dict[str, Any]:
    """InternVL's own tower takes the shapes' ViT (at `image_size`); any other encoder its recipe's config."""
    cls = get_encoder_class(encoder)
    if cls.in_language_checkpoint:
        return {**shapes.vision, "image_size": list(image_size)}
    return dict(cls.recipe.tiny_config if shapes.tiny else cls.recipe.real_config)


def build_native(shapes: Shapes, image_size: tuple[int, int]) -> InternVLForConditionalGeneration:
    """transformers' InternVL at `shapes`, random weights; its image token is the vocabulary's last id."""
    patch = shapes.vision["patch_size"][0]
    tokens = (image_size[0] // patch // 2) * (image_size[1] // patch // 2)  # after the 0.5 pixel shuffle
    config = InternVLConfig(vision_config={**shapes.vision, "image_size": list(image_size)},
                            text_config=text_config(shapes).to_dict(), downsample_ratio=0.5,
                            image_token_id=shapes.text["vocab_size"] - 1, image_seq_length=tokens)
    return InternVLForConditionalGeneration(config).eval()


def native_prompt(model: InternVLForConditionalGeneration, batch: int, text_tokens: int) -> torch.Tensor:
    """(B, L) ids: 4 text tokens, the image tokens, the other text tokens (chat markers, question, instruction)."""
    image = torch.full((model.config.image_seq_length,), model.config.image_token_id)
    text = torch.arange(10, 10 + text_tokens)  # any ordinary ids: the cost does not depend on which
    return torch.cat([text[:4], image, text[4:]]).expand(batch, -1)


# ------------------------------------------------------------------------------------------ timing
@dataclass
class TimedRow:
    way: str
    encoder: str
    batch: int
    seconds: float  # median per call
    llm_runs: int
    llm_share: float


def time_call(call: Callable[[], Any], timer: ForwardTimer, repeats: int, device: torch.device
              ) -> tuple[float, int, float]:
    """(median seconds per call, LLM forwards in the timed calls, LLM share of their time); one warm-up first."""
    call()
    timer.reset()
    start = time.perf_counter()
    seconds = median_seconds(call, repeats, device)
    return seconds, timer.calls, timer.seconds / (time.perf_counter() - start)


def counter_rows(shapes: Shapes, encoder: str, args: argparse.Namespace, device: torch.device) -> list[TimedRow]:
    """(a) or (b) at every batch size through `ReceiptCounter.predict`; for an encoder other than InternVL's
    own tower also without the cache."""
    model = build_counter(shapes, encoder, args.image_size)
    timer = ForwardTimer(model.language)
    counter = ReceiptCounter.from_model(model, device=device)
    replaced = not get_encoder_class(encoder).in_language_checkpoint
    caches = [("ours", model.question_cache)] + ([("ours, no cache", None)] if replaced else [])
    rows = []
    for way, cache in caches:
        model.question_cache = cache
        for batch in args.batch_sizes:
            pixels = torch.randn(batch, 3, *args.image_size)
            seconds, runs, share = time_call(lambda: counter.predict(pixels, batch_size=batch), timer, args.repeats,
                                             device)
            rows.append(TimedRow(way, encoder, batch, seconds, runs, share))
            print(f"  {way} {encoder} batch {batch}: {seconds:.2f} s/call", file=sys.stderr, flush=True)
    return rows


def native_rows(shapes: Shapes, args: argparse.Namespace, device: torch.device) -> list[TimedRow]:
    """(c) at every batch size: one forward, the last position's logits over the three answers."""
    model = build_native(shapes, args.image_size).to(device)
    timer = ForwardTimer(model.model.language_model)
    answers = torch.arange(10, 10 + ANSWERS, device=device)
    rows = []
    for batch in args.batch_sizes:
        pixels = torch.randn(batch, 3, *args.image_size, device=device)
        ids = native_prompt(model, batch, args.native_text_tokens).to(device)

        @torch.inference_mode()
        def call() -> torch.Tensor:
            logits = model(pixel_values=pixels, input_ids=ids, logits_to_keep=1).logits  # (B, 1, V)
            return logits[:, -1, answers].float().softmax(-1).cpu()  # (B, 3)

        seconds, runs, share = time_call(call, timer, args.repeats, device)
        rows.append(TimedRow("InternVL-native", "internvit", batch, seconds, runs, share))
        print(f"  native batch {batch}: {seconds:.2f} s/call", file=sys.stderr, flush=True)
    return rows


def timed_table(rows: list[TimedRow]) -> str:
    native = {r.batch: r.seconds / r.batch for r in rows if r.way == "InternVL-native"}
    headers = ["way", "encoder", "batch", "images/s", "ms/image", "LLM runs in timed calls", "LLM share of time",
               "× native (images/s)"]
    body = [[r.way, r.encoder, r.batch, f"{r.batch / r.seconds:.3f}", f"{1000 * r.seconds / r.batch:.0f}", r.llm_runs,
             f"{100 * r.llm_share:.1f}%",
             f"**{native[r.batch] / (r.seconds / r.batch):.2f}x**" if r.batch in native else None] for r in rows]
    return markdown_table(headers, body)


# ------------------------------------------------------------------------------------------ FLOPs
@dataclass
class FlopRow:
    shape: str
    way: str
    vision: float  # GFLOPs per image: vision tower + projector
    llm: float  # LLM per image when it runs for every image
    rest: float  # ours: fusion + head; native: the LM head on the last position
    cached_llm: float  # LLM per image as the way runs it (ours: 0 while frozen and cached)


def counter_flops(shapes: Shapes, encoder: str, image_size: tuple[int, int], device: torch.device) -> tuple[float, ...]:
    """(vision + projector, LLM, fusion + head) FLOPs of one image through our counter, part by part.

    Counted part by part because the cache and the LLM's padding checks read tensor values, which the
    meta device has none of; the parts are exactly what `forward` chains.
    """
    with torch.device(device):
        model = build_counter(shapes, encoder, image_size)
        pixels = torch.zeros(1, 3, *image_size)
        ids, _ = model.tokenize([None], device)
        vision = count_flops(lambda: model.encode_images(pixels))
        llm = count_flops(lambda: model.language(input_ids=ids))
        text = torch.zeros(1, ids.shape[1], model.language.config.hidden_size)
        image = torch.zeros(1, model.num_image_tokens(image_size), model.language.config.hidden_size)
        rest = count_flops(lambda: model.head(model.fusion(text, image).mean(1)))
    return vision, llm, rest


def native_flops(shapes: Shapes, image_size: tuple[int, int], text_tokens: int, device: torch.device
                 ) -> tuple[float, ...]:
    """(vision + projector, LLM over the whole prompt, LM head on one position) FLOPs of one image."""
    with torch.device(device):
        model = build_native(shapes, image_size)
        pixels = torch.zeros(1, 3, *image_size)
        length = model.config.image_seq_length + text_tokens
        embeds = torch.zeros(1, length, model.config.text_config.hidden_size)
        vision = count_flops(lambda: model.model.get_image_features(pixel_values=pixels))
        llm = count_flops(lambda: model.model.language_model(inputs_embeds=embeds))
        head = count_flops(lambda: model.lm_head(embeds[:, -1:]))
    return vision, llm, head


def flop_rows(name: str, encoders: list[str], image_size: tuple[int, int], text_tokens: int, device: torch.device
              ) -> list[FlopRow]:
    shapes = SHAPES[name]
    rows = []
    for encoder in encoders:
        vision, llm, rest = counter_flops(shapes, encoder, image_size, device)
        rows.append(FlopRow(name, f"ours ({encoder})", vision / 1e9, llm / 1e9, rest / 1e9, 0.0))
    vision, llm, head = native_flops(shapes, image_size, text_tokens, device)
    rows.append(FlopRow(name, "InternVL-native", vision / 1e9, llm / 1e9, head / 1e9, llm / 1e9))
    return rows


def flop_table(rows: list[FlopRow]) -> str:
    native = {r.shape: r.vision + r.llm + r.rest for r in rows if r.way == "InternVL-native"}
    headers = ["shapes", "way", "vision + projector", "LLM (if run per image)", "fusion + head / LM head",
               "total per image, LLM per image", "total per image, as run", "native ÷ this (as run)"]
    body = []
    for r in rows:
        as_run = r.vision + r.cached_llm + r.rest
        body.append([r.shape, r.way, _gflops(r.vision), _gflops(r.llm), _gflops(r.rest),
                     _gflops(r.vision + r.llm + r.rest), _gflops(as_run), f"**{native[r.shape] / as_run:.2f}x**"])
    return markdown_table(headers, body)


def _gflops(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="internvl2.5-1b", choices=sorted(SHAPES), help="shapes of the timed models")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=448, help="square input side, px")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median reported)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the timed models")
    parser.add_argument("--native-text-tokens", type=int, default=24, help="text tokens of the native prompt")
    parser.add_argument("--flop-shapes", nargs="*", choices=sorted(SHAPES),
                        default=["internvl2.5-1b", "internvl2.5-8b", "internvl2.5-26b"])
    parser.add_argument("--encoders", nargs="+", choices=encoder_names(), default=["internvit", "swin"],
                        help="encoders of our counter (default: InternVL's ViT and Swin-B)")
    parser.add_argument("--no-timing", action="store_true", help="only the FLOP table")
    args = parser.parse_args(argv)
    args.image_size = (args.image_size, args.image_size)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_and_threaded(args.threads)
    device = torch.device(args.device)
    before = machine_info(torch.get_num_threads())
    rows: list[TimedRow] = []
    if not args.no_timing:
        torch.manual_seed(0)
        for encoder in args.encoders:
            rows += counter_rows(SHAPES[args.shape], encoder, args, device)
            gc.collect()  # one full-size model in memory at a time
        rows += native_rows(SHAPES[args.shape], args, device)
    flops = [r for name in args.flop_shapes for r in flop_rows(name, args.encoders, args.image_size,
                                                                args.native_text_tokens, torch.device("meta"))]
    after = machine_info(torch.get_num_threads())
    print(f"{before['processor']}, {before['cpu_count']} cores, torch {before['torch']}, {before['threads']} "
          f"thread(s), device {device}, float32, {args.image_size[0]} px; load average "
          f"{before['load_average'][0]} before, {after['load_average'][0]} after")
    if rows:
        print(f"\nTimed, {args.shape} shapes, random weights, median of {args.repeats} calls:\n")
        print(timed_table(rows))
    if flops:
        print(f"\nGFLOPs per image (meta device, batch 1, {args.image_size[0]} px, native prompt "
              f"{args.native_text_tokens} text tokens + the image tokens):\n")
        print(flop_table(flops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
