"""Write random checkpoints: tiny InternVL2, Swin and Swin V2 in Hugging Face format (the default), or one
InternVL folder in OpenGVLab's original layout or transformers' layout, at toy or InternVL2.5-1B size.

    python scripts/make_tiny_checkpoints.py --out checkpoints/tiny [--seed 0]
    python scripts/make_tiny_checkpoints.py --out DIR --layout original [--llm qwen2|internlm2] [--preset tiny]
    python scripts/make_tiny_checkpoints.py --out DIR --layout original --preset internvl2.5-1b   # ~1.9 GB bf16
    python scripts/make_tiny_checkpoints.py --out DIR --layout hf --preset internvl2.5-1b
    python scripts/make_tiny_checkpoints.py --out DIR --layout original --preset internvl2.5-78b --config-only

The default folders are the embedded default of the demo and the tests, loaded through the same
`from_pretrained` path as real InternVL2.5-1B / Swin-B / Swin V2-B folders. The others are written
tensor by tensor, so a full-size folder never needs the whole model in memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from models.tiny import PRESETS, write_hf_internvl, write_original_internvl, write_tiny_checkpoints  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path,
                        help="folder to write internvl2/, swin/, swinv2/ into (default layout and preset), else the "
                             "InternVL folder itself")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=["hf", "original"], default="hf",
                        help="transformers' layout (default) or OpenGVLab's original internvl_chat layout")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--llm", choices=["qwen2", "internlm2"], default="qwen2",
                        help="the LLM of an original-layout folder (the hf layout has Qwen2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="weights of the single-folder layouts (the default folders keep float32)")
    parser.add_argument("--shard-mib", type=float, default=None,
                        help="shard the weights (with model.safetensors.index.json); default one file")
    parser.add_argument("--config-only", action="store_true",
                        help="an original-layout folder without weights (config, tokenizer): for --dry-run plans")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    dtype = DTYPES[args.dtype]
    if args.layout == "original":
        path = write_original_internvl(args.out, llm=args.llm, preset=args.preset, seed=args.seed, dtype=dtype,
                                       shard_mib=args.shard_mib, weights=not args.config_only)
        print(f"internvl ({args.preset}, original layout, {args.llm}): {path}")
    elif args.config_only:
        parser.error("--config-only needs --layout original")
    elif args.llm != "qwen2":
        parser.error("--llm internlm2 needs --layout original (transformers' InternVL layout here has Qwen2)")
    elif args.preset != "tiny":
        path = write_hf_internvl(args.out, preset=args.preset, seed=args.seed, dtype=dtype, shard_mib=args.shard_mib)
        print(f"internvl ({args.preset}, hf layout): {path}")
    else:
        for name, path in write_tiny_checkpoints(args.out, args.seed).items():
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
