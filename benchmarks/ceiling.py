"""The FLOP ceiling of early exit on real model shapes (JSON on stdout): no weights, no download.

For each configuration (built on the ``meta`` device from its published sizes) and each exit depth, the speed-up
a perfect implementation reaches (``deltaexit.generation.CostModel``: blocks, the LM head once per token on both
sides, ``propagate``'s K/V-only calls) and its share of ``L / blocks run``. This is the cap on the issue's
"wall-clock >= 85% of L / blocks run" for any implementation; the measured benchmark is ``generate_speed.py``.

Example:
    python benchmarks/ceiling.py --context 512 > ceiling.json
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM

from deltaexit.generation import CostModel
from deltaexit.testing import tiny_config

# Published sizes: (model_type, hidden, layers, heads, kv_heads, ffn, vocab, tied embeddings).
SHAPES: dict[str, tuple[str, int, int, int, int, int, int, bool]] = {
    "gpt2-124M": ("gpt2", 768, 12, 12, 12, 3072, 50257, True),
    "llama-3.2-1B": ("llama", 2048, 16, 32, 8, 8192, 128256, True),
    "llama-2-7B": ("llama", 4096, 32, 32, 32, 11008, 32000, False),
    "mistral-7B": ("mistral", 4096, 32, 32, 8, 14336, 32768, False),
    "llama-3-8B": ("llama", 4096, 32, 32, 8, 14336, 128256, False),
    "qwen2.5-7B": ("qwen2", 3584, 28, 28, 4, 18944, 152064, False),
    "llama-2-70B": ("llama", 8192, 80, 64, 8, 28672, 32000, False),
    "random-12x768 (generate_speed default)": ("llama", 768, 12, 12, 6, 1536, 32000, False),
    "random-12x2048 GQA (generate_speed, vocab 32000)": ("llama", 2048, 12, 16, 4, 5632, 32000, False),
}


def build(shape: tuple[str, int, int, int, int, int, int, bool]) -> torch.nn.Module:
    model_type, hidden, layers, heads, kv_heads, ffn, vocab, tied = shape
    sizes = {"n_inner": ffn} if model_type == "gpt2" else {"num_key_value_heads": kv_heads, "intermediate_size": ffn}
    cfg = tiny_config(
        model_type, num_layers=layers, hidden=hidden, heads=heads, vocab=vocab, tie_word_embeddings=tied, **sizes
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=512, help="context length for the attention FLOPs")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="exit depth / L")
    args = ap.parse_args()
    rows = []
    for name, shape in SHAPES.items():
        cost = CostModel.from_model(build(shape), context=args.context)
        row = {"model": name, **cost.to_dict(), "exits": []}
        for depth in args.depths:
            n = max(1.0, round(depth * cost.num_layers))
            row["exits"].append(
                {
                    "depth": depth,
                    "blocks_per_token": n,
                    "implied": cost.num_layers / n,
                    "propagate_ceiling": cost.speedup(n),
                    "propagate_share_ceiling": cost.share_ceiling(n),
                    "recompute_share_ceiling": cost.share_ceiling(n, kv="recompute"),
                }
            )
        rows.append(row)
    print(json.dumps({"context": args.context, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
