"""Lossless self-speculation (`kv="verify"`) against `model.generate` over several prompts, batch 1.

For each setting (draft layer, draft budget, adaptive or not) and each prompt: one warm-up, then
``--repeats`` alternated (`model.generate`, `EarlyExit.generate`) pairs (``generate_speed.paired``);
the prompt's speed is the inverse of the median pair time ratio and the setting's speed the median
over prompts. Every output is checked to equal `model.generate`'s (greedy). Prints one JSON line
per setting and, with ``--json``, writes them all.

Usage:
    python benchmarks/verify_speed.py --model DIR --settings 2:4 2:8:adaptive 4:4 6:4 \\
        --json docs/results/verify_ref256_layerskip_600.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from generate_speed import paired

import deltaexit as dx
from deltaexit.generation import Verify

DATA = Path("../shared/data/wikitext-2/test.txt")


def parse_setting(text: str) -> tuple[int, int, bool]:
    """``"LAYER:BUDGET"`` or ``"LAYER:BUDGET:adaptive"``."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "adaptive"):
        raise argparse.ArgumentTypeError(f"setting {text!r}: use LAYER:BUDGET or LAYER:BUDGET:adaptive")
    return int(parts[0]), int(parts[1]), len(parts) == 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF directory, or v1/v2 for a shipped reference")
    ap.add_argument("--text", type=Path, default=DATA, help="prompts: lines of this file longer than 200 characters")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", type=parse_setting, nargs="+", default=[parse_setting("2:4")])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model in ("v1", "v2"):
        model, tok = dx.load_reference(args.model)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    with open(args.text, encoding="utf-8") as f:
        lines = [line for line in f if len(line) > 200][: args.prompts]
    prompts = [tok(line, return_tensors="pt").input_ids[:, : args.prompt_len] for line in lines]
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    rows = []
    for layer, budget, adaptive in args.settings:
        ee = dx.EarlyExit(
            model, "delta-norm", float("-inf"), kv=Verify(num_draft=budget, adaptive=adaptive), min_exit_layer=layer,
        )  # fmt: skip
        speeds, accepted, drafted, identical = [], 0, 0, True
        for ids in prompts:
            with torch.no_grad():
                full = model.generate(ids, **kw)  # warm-up, and the reference output
                ee.generate(ids, **kw)
                time_ratio, _, _, out = paired(
                    lambda clock, ids=ids: model.generate(ids, streamer=clock, **kw),
                    lambda clock, ids=ids, ee=ee: ee.generate(ids, return_dict_in_generate=True, streamer=clock, **kw),
                    args.repeats,
                )
            identical &= bool(torch.equal(out.sequences, full))
            speeds.append(1.0 / time_ratio)
            accepted += out.stats.accepted
            drafted += out.stats.drafted
        row = {
            "min_exit_layer": layer,
            "num_draft": budget,
            "adaptive_draft": adaptive,
            "median_speed": statistics.median(speeds),
            "per_prompt": [round(x, 3) for x in speeds],
            "accepted": accepted,
            "drafted": drafted,
            "identical": identical,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        result = {
            "model": args.model,
            "prompts": f"first {args.prompt_len} tokens of the first {args.prompts} lines of {args.text} longer "
            "than 200 characters",
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "timing": f"per prompt: median of {args.repeats} alternated (model.generate, verify) pairs",
            "rows": rows,
        }
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
