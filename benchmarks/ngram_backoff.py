"""N-gram drafts and back-off in lossless ``verify``, against ``model.generate`` and prompt-lookup decoding.

Batch 1, one thread, WikiText test prompts. For each prompt: one warm-up of every row, then ``--repeats``
alternated rounds (``model.generate``, then every row in turn); a row's speed on a prompt is the median over
rounds of ``time(model.generate) / time(row)``, and its figure the median over prompts with the 25th/75th
percentiles. Every output is checked to equal ``model.generate``'s (greedy). Prints one JSON object.

Rows: ``verify`` (early-exit drafts only: ``threshold=-inf`` at ``min_exit_layer=E``, ``num_draft=4``,
``ngram=0``), ``verify+ngram`` (the same with n-gram drafts, ``Verify``'s defaults), the same two with
``backoff=False``, and ``prompt-lookup`` (``model.generate(prompt_lookup_num_tokens=3)``).

Usage:
    PYTHONPATH=src python benchmarks/ngram_backoff.py --model v2 --exit-layer 2 \\
        --json docs/results/ngram_backoff_v2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.verify import Verify
from deltaexit.reference import available_references, load_reference
from deltaexit.threads import torch_threads

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"
if not DATA.is_file():  # a user's clone: the sample the package ships
    from deltaexit.samples import sample_path

    DATA = sample_path()


def quartiles(values: list[float]) -> dict[str, float]:
    """Median and 25th/75th percentiles."""
    if len(values) < 2:
        return {"median": values[0], "q25": values[0], "q75": values[0]}
    q = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2]}


def rows_of(model: Any, exit_layer: int, kw: dict[str, Any]) -> dict[str, Any]:
    """Each row: a function of the prompt ids returning (sequences, stats or None)."""

    def early(policy: Verify, backoff: bool):
        ee = EarlyExit(model, "delta-norm", float("-inf"), policy, min_exit_layer=exit_layer, backoff=backoff)

        def run(ids):
            out = ee.generate(ids, return_dict_in_generate=True, **kw)
            return out.sequences, out.stats

        return run

    return {
        "verify": early(Verify(num_draft=4, ngram=0), True),
        "verify+ngram": early(Verify(num_draft=4), True),
        "verify+ngram (ngram_min=2)": early(Verify(num_draft=4, ngram_min=2), True),
        "verify (no backoff)": early(Verify(num_draft=4, ngram=0), False),
        "verify+ngram (no backoff)": early(Verify(num_draft=4), False),
        "prompt-lookup": lambda ids: (model.generate(ids, prompt_lookup_num_tokens=3, **kw), None),
    }


def timed(fn, ids):
    t0 = time.perf_counter()
    result = fn(ids)
    return time.perf_counter() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="shipped reference name (default: v3 if shipped, else v2)")
    ap.add_argument("--exit-layer", type=int, default=2)
    ap.add_argument("--text", type=Path, default=DATA)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    name = args.model or ("v3" if "v3" in available_references() else "v2")
    model, tok = load_reference(name)
    with open(args.text, encoding="utf-8") as f:
        lines = [line for line in f if len(line) > 600][: args.prompts]
    prompts = [tok(line, return_tensors="pt").input_ids[:, : args.prompt_len] for line in lines]
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    per_prompt: dict[str, list[float]] = {}
    totals: dict[str, dict[str, int]] = {}
    identical: dict[str, bool] = {}
    with torch_threads(1), torch.no_grad():
        rows = rows_of(model, args.exit_layer, kw)
        for ids in prompts:
            ref = model.generate(ids, **kw)
            for fn in rows.values():
                fn(ids)  # warm-up
            ratios: dict[str, list[float]] = {r: [] for r in rows}
            for _ in range(args.repeats):
                base, _ = timed(lambda i: model.generate(i, **kw), ids)
                for r, fn in rows.items():
                    t, (seq, stats) = timed(fn, ids)
                    identical[r] = identical.get(r, True) and bool(torch.equal(seq, ref))
                    ratios[r].append(base / t)
                    if stats is not None:
                        acc = totals.setdefault(r, {})
                        for key in ("drafted", "accepted", "ngram_drafted", "ngram_accepted", "backoffs",
                                    "backoff_steps", "retries", "tokens"):  # fmt: skip
                            acc[key] = acc.get(key, 0) + getattr(stats, key)
            for r, v in ratios.items():
                per_prompt.setdefault(r, []).append(statistics.median(v))
    result = {
        "model": name,
        "exit_layer": args.exit_layer,
        "prompts": len(prompts),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": 1,
        "identical_to_generate": identical,
        "speed_vs_generate": {r: quartiles(v) for r, v in per_prompt.items()},
        "per_prompt": per_prompt,
        "counts": totals,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
