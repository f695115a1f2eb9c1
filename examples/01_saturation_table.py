"""Trace a model and print its saturation table.

Runs the shipped reference model (``dx.load_reference("v1")``, no network) over a piece of the
shipped text sample, captures every block's residual delta and the logit lens's top-3, and prints
per layer: the share of tokens whose top-1 is already final ("saturated"), the share that saturate
at exactly that layer, the top-1 change rate to the next layer and the mean ‖delta‖. The last line
is the oracle ceiling: the block compute a perfect, free exit predictor would save.

Run:
    python examples/01_saturation_table.py            # 1,024 tokens
    python examples/01_saturation_table.py --quick    # 256 tokens (CI)
    python examples/01_saturation_table.py --model path/to/hf-model --text my.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltaexit as dx
from deltaexit.samples import sample_text


def load(name: str):
    """A shipped reference ("v1", "v2") or any HF causal-LM directory."""
    if name in ("v1", "v2"):
        return dx.load_reference(name)
    return AutoModelForCausalLM.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="v1", help="v1, v2 or an HF model directory")
    parser.add_argument("--text", help="a UTF-8 text file (default: the shipped sample)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="256 tokens")
    args = parser.parse_args()
    tokens = 256 if args.quick else args.tokens

    model, tokenizer = load(args.model)
    text = Path(args.text).read_text(encoding="utf-8") if args.text else sample_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0, :tokens]
    window = min(128, ids.numel())
    ids = ids[: ids.numel() // window * window].reshape(-1, window)  # independent windows, one per row

    with torch.no_grad(), dx.collect(model, capture=("delta",), topk=3) as trace:
        model(input_ids=ids)
    lens = dx.Lens.from_model(model)
    sat = dx.saturation(trace, lens)
    delta_norm = trace.delta.float().norm(dim=-1).flatten(1).mean(dim=1)  # [layers]

    print(f"{sat.num_tokens} tokens, {sat.num_layers} layers")
    print(f"{'layer':>5} {'saturated':>9} {'exits here':>10} {'changes next':>12} {'mean |delta|':>12}")
    for row, norm in zip(sat.per_layer(), delta_norm.tolist()):
        change = f"{row['change_rate']:.3f}" if "change_rate" in row else "-"
        print(f"{row['layer']:>5} {row['saturated']:>9.3f} {row['exits_here']:>10.3f} {change:>12} {norm:>12.2f}")
    print(f"oracle: mean saturation layer {sat.oracle_mean_layer:.2f} of {sat.num_layers}, "
          f"compute saved {sat.oracle_compute_saved:.1%}")  # fmt: skip
    ranks = sat.topk_mean_layers()
    if ranks:
        fixed = ", ".join(f"r{i + 1}={v:.2f}" for i, v in enumerate(ranks))
        print(f"mean layer from which rank r is fixed for good: {fixed}")


if __name__ == "__main__":
    main()
