"""Early exit on a model that is not exit-trained: default settings and the ``dx.tune`` choice against
``model.generate`` (JSON on stdout).

Rows, timed in one run and alternated (``deltaexit.timing.alternated``: one warm-up call each, then ``--repeats``
rounds in which every held-out prompt runs every row, in a rotated order), batch 1, greedy: ``model.generate``;
``dx.EarlyExit(model, kv=K)`` with every other setting at its default (measure ``softmax-max``, threshold ``-inf``
under ``verify`` and the measure's example threshold under the lossy policies, back-off on) for each ``K`` in
``--policies``; and the lossless setting ``dx.tune(model, calibration_prompts, tolerance=0)`` chooses on separate
calibration prompts (``model.generate`` itself when nothing beat it). Per row: speed (``model.generate`` time / row
time over the prompts: median over rounds, min, max, IQR), agreement with ``model.generate``'s output, mean exit
layer, new tokens per prompt, and the back-off counters (``backoffs``, ``backoff_steps``, ``probe_steps``,
``retries``). ``--backoff-warmup N ...`` adds, for each lossy policy, rows with the default settings but a back-off
that judges after ``N`` tokens (``Backoff(signal="cost", warmup=N, window=2N)``); ``--previous-backoff`` adds, for
each lossy policy, a row with the back-off that was its default before the cost model's prior
(``Backoff(signal="cost", warmup=32, window=32, prior=False)``: 32 tokens before the first judgement, half of a
64-token call); ``--fixed-exit E ...`` adds, for each lossy policy, rows that exit every token after block ``E``
(``threshold=-inf, min_exit_layer=E``, default back-off; with the previous one too under ``--previous-backoff``);
``--min-new-tokens 64`` makes every timed call generate 64 tokens (the models often stop at EOS
after a few; ``dx.tune`` still times natural lengths); ``--no-tune`` skips ``dx.tune``.

Usage:
    python benchmarks/untrained_models.py --model v1 --data ../shared/data/wikitext-2/test.txt \\
        --calibration-data ../shared/data/wikitext-2/valid.txt --json docs/results/untrained_v1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_timing import add_common_args, emit, load_model, read_prompts, row_entry

import deltaexit as dx
from deltaexit.generation.backoff import Backoff
from deltaexit.jsonable import json_clean
from deltaexit.threads import torch_threads
from deltaexit.timing import alternated, generate_row

COUNTERS = ("backoffs", "backoff_steps", "probe_steps", "retries", "drafted", "accepted", "ngram_accepted")


def calibration_prompts(tok: Any, args: argparse.Namespace) -> list[torch.Tensor]:
    """``--tune-prompts`` prompts from ``--calibration-data`` (1-D), disjoint from the timed ones."""
    prompts, _ = read_prompts(tok, args.calibration_data, args.tune_prompts, args.prompt_len)
    return [p[0] for p in prompts]


def stats_entry(outputs: list[Any]) -> dict[str, Any]:
    """Mean exit layer and summed counters of a row's warm-up outputs (EarlyExitOutput)."""
    stats = [o.stats for o in outputs]
    tokens = sum(s.tokens for s in stats)
    entry: dict[str, Any] = {"mean_exit_layer": sum(s.mean_exit_layer * s.tokens for s in stats) / max(tokens, 1)}
    entry["new_tokens_per_prompt"] = [s.tokens for s in stats]
    for name in COUNTERS:
        entry[name] = sum(getattr(s, name) for s in stats)
    return entry


def run(args: argparse.Namespace) -> dict:
    """Tune, then time every row; the JSON-ready result."""
    model, tok = load_model(args.model)
    prompts, label = read_prompts(tok, args.data, args.prompts, args.prompt_len)
    kw = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id or 0}
    if args.min_new_tokens:  # every timed call makes this many tokens (EOS held back), as model.generate does
        kw["min_new_tokens"] = args.min_new_tokens
    with torch_threads(args.threads):
        started = time.perf_counter()
        tuned = None
        if not args.no_tune:
            tuned = dx.tune(
                model, calibration_prompts(tok, args), tolerance=0.0, max_new_tokens=args.new_tokens,
                timing_prompts=args.tune_prompts, budget_s=args.tune_budget, progress=False,
            )  # fmt: skip
        tune_s = time.perf_counter() - started
        rows = {"model.generate": generate_row(model, kw)}
        early: dict[str, Any] = {f"{k} (defaults)": dx.EarlyExit(model, kv=k) for k in args.policies}
        for k in (k for k in args.policies if k != "verify"):
            for n in args.backoff_warmup:
                backoff = Backoff(signal="cost", warmup=n, window=2 * n)
                early[f"{k} (defaults but backoff warmup={n} window={2 * n})"] = dx.EarlyExit(
                    model, kv=k, backoff=backoff
                )
            for e in args.fixed_exit:  # exits that pay where the head is light (v3): the back-off must keep them
                fixed = {"threshold": float("-inf"), "min_exit_layer": e, "kv": k}
                early[f"{k} E={e} threshold=-inf"] = dx.EarlyExit(model, **fixed)
                if args.previous_backoff:
                    early[f"{k} E={e} threshold=-inf, previous backoff"] = dx.EarlyExit(
                        model, **fixed, backoff=Backoff(signal="cost", warmup=32, window=32, prior=False)
                    )
            if args.previous_backoff:  # what the lossy default was before the prior and the short warm-up
                early[f"{k} (defaults but previous backoff warmup=32 window=32 prior=False)"] = dx.EarlyExit(
                    model, kv=k, backoff=Backoff(signal="cost", warmup=32, window=32, prior=False)
                )
        if tuned is not None and tuned.chosen is not None:
            early[f"tuned: {tuned.chosen.name}"] = tuned.early_exit(model)
        for name, ee in early.items():
            rows[name] = generate_row(ee, {**kw, "return_dict_in_generate": True})
        timing = alternated(rows, prompts, repeats=args.repeats)
    entries = []
    for name in rows:
        entry = row_entry(timing, name, prompts)
        if name in early and "error" not in entry:
            entry |= {"early_exit": repr(early[name])} | stats_entry(timing.outputs[name])
        entries.append(entry)
        print(json.dumps(json_clean(entry)), file=sys.stderr, flush=True)
    return {
        "model": args.model,
        "prompts": label,
        "calibration_prompts": f"{args.tune_prompts} prompts from {args.calibration_data}",
        "new_tokens": args.new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "threads": args.threads,
        "torch": torch.__version__,
        "tune": None
        if tuned is None
        else {
            "chosen": tuned.chosen.name if tuned.chosen else "model.generate",
            "seconds": tune_s,
            "result": tuned.to_dict(),
        },
        "timing": f"{args.repeats} alternated rounds (each: every prompt, every row, rotated order) after one "
        "warm-up; speed = model.generate time / row time over all prompts, median over rounds with min/max/IQR",
        "rows": entries,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="v1", help="HF directory, or a shipped reference name (v1, v2, v3)")
    ap.add_argument("--policies", nargs="+", default=["verify", "propagate", "recompute"])
    ap.add_argument(
        "--calibration-data", type=Path, default=None, help="text the tuner's prompts come from (default: --data)"
    )
    ap.add_argument("--tune-prompts", type=int, default=8, help="calibration prompts dx.tune times")
    ap.add_argument("--min-new-tokens", type=int, default=0, help="min_new_tokens of the timed calls (0: none)")
    ap.add_argument("--backoff-warmup", type=int, nargs="*", default=[], help="extra back-off warm-up rows")
    ap.add_argument(
        "--previous-backoff", action="store_true", help="add rows with the lossy policies' earlier default back-off"
    )
    ap.add_argument(
        "--fixed-exit", type=int, nargs="*", default=[], help="add lossy rows exiting every token after block E"
    )
    ap.add_argument("--no-tune", action="store_true", help="skip dx.tune (no tuned row)")
    ap.add_argument("--tune-budget", type=float, default=None, help="dx.tune's budget_s (default: none)")
    add_common_args(ap)
    args = ap.parse_args()
    if args.calibration_data is None:
        args.calibration_data = args.data
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
