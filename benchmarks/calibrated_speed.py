"""Calibrated early exit at a token-disagreement tolerance δ: ``dx.tune(model, prompts, tolerance=δ)`` on
calibration prompts, then timed on held-out prompts against ``model.generate`` (JSON on stdout).

1. ``dx.tune`` on ``--calibration-prompts`` prompts of ``--calibration-data`` (default: as many as
   Learn-then-Test needs for δ, the number its error message gives). For δ > 0 it calibrates ``recompute``
   (softmax-max threshold) and ``kv="tolerant"`` (the draft-acceptance ratio, at each ``--tolerant-layers``) by
   Learn-then-Test, and times them with the lossless ``verify`` grid; the record of each calibration (certified
   value, the empirical risk of every candidate) is kept.
2. On ``--prompts`` held-out prompts of ``--data``, rows timed in one run and alternated
   (``deltaexit.timing.alternated``): ``model.generate``; prompt lookup (``prompt_lookup_num_tokens``); the tuned
   choice; lossless ``verify`` drafting from block 1 (``--verify``); and ``tolerant`` at each ``--ratios`` value
   (uncalibrated, for the speed/disagreement trade-off). Per row: speed (median over rounds, min, max, IQR),
   realised disagreement with ``model.generate`` (share of new tokens that differ, position by position), mean exit
   layer and draft counters.

Usage:
    python benchmarks/calibrated_speed.py --model v3 --data ../shared/data/wikitext-2/test.txt \\
        --calibration-data ../shared/data/wikitext-2/valid.txt --tolerance 0.01 --json docs/results/calibrated_v3.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_timing import add_common_args, emit, load_model, read_prompts, row_entry

import deltaexit as dx
from deltaexit.generation import Tolerant, Verify
from deltaexit.jsonable import json_clean
from deltaexit.threads import torch_threads
from deltaexit.timing import alternated, generate_row, peer_rows
from deltaexit.tuning import TuneConfig, prompts_required

COUNTERS = ("drafted", "accepted", "ngram_accepted", "backoffs", "backoff_steps")


def stats_entry(outputs: list[Any]) -> dict[str, Any]:
    """Mean exit layer and summed counters of a row's warm-up outputs (EarlyExitOutput)."""
    stats = [o.stats for o in outputs]
    tokens = sum(s.tokens for s in stats)
    entry: dict[str, Any] = {"mean_exit_layer": sum(s.mean_exit_layer * s.tokens for s in stats) / max(tokens, 1)}
    return entry | {name: sum(getattr(s, name) for s in stats) for name in COUNTERS}


def tune_on_calibration(model: Any, tok: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``dx.tune`` at ``--tolerance`` on the calibration prompts; the result and a JSON record."""
    cfg = TuneConfig(
        tolerance=args.tolerance, max_new_tokens=args.new_tokens, exit_layers=tuple(args.exit_layers),
        tolerant_exit_layers=tuple(args.tolerant_layers), progress=not args.quiet, budget_s=args.tune_budget,
    )  # fmt: skip
    num = args.calibration_prompts or prompts_required(cfg)
    prompts, label = read_prompts(tok, args.calibration_data, num, args.prompt_len)
    started = time.perf_counter()
    tuned = dx.tune(model, [p[0] for p in prompts], config=cfg)
    record = {
        "prompts": label,
        "prompts_required": prompts_required(cfg),
        "seconds": time.perf_counter() - started,
        "chosen": tuned.chosen.name if tuned.chosen is not None else "model.generate",
        "speedup_on_calibration": tuned.speedup,
        "realised_disagreement_on_calibration": tuned.realised_disagreement,
        "calibration": [{k: v for k, v in r.items() if k != "summary"} for r in tuned.calibration],
        "results": [r.to_dict() for r in tuned.results],
    }
    return tuned, record


def held_out_rows(model: Any, tuned: Any, kw: dict[str, Any], args: argparse.Namespace) -> tuple[dict, dict]:
    """The timed rows (name -> row) and the early-exit objects behind them."""
    rows = peer_rows(model, kw, prompt_lookup=args.prompt_lookup or None)
    early: dict[str, Any] = {}
    if tuned.chosen is not None:
        early[f"tuned (tolerance {args.tolerance}): {tuned.chosen.name}"] = tuned.early_exit(model)
    layer, budget = args.verify
    early[f"verify E={layer} num_draft={budget}"] = dx.EarlyExit(
        model, "delta-norm", -math.inf, Verify(num_draft=budget), min_exit_layer=layer
    )
    for ratio in args.ratios:
        policy = Tolerant(num_draft=budget, ratio=ratio)
        early[f"tolerant E={layer} num_draft={budget} ratio={ratio} (uncalibrated)"] = dx.EarlyExit(
            model, "delta-norm", -math.inf, policy, min_exit_layer=layer
        )
    for name, ee in early.items():
        rows[name] = generate_row(ee, {**kw, "return_dict_in_generate": True})
    return rows, early


def run(args: argparse.Namespace) -> dict:
    """Tune on the calibration prompts, time on the held-out ones; the JSON-ready result."""
    model, tok = load_model(args.model)
    prompts, label = read_prompts(tok, args.data, args.prompts, args.prompt_len)
    kw = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id or 0}
    with torch_threads(args.threads):
        tuned, tune_record = tune_on_calibration(model, tok, args)
        print(json.dumps(json_clean({k: tune_record[k] for k in ("chosen", "calibration")})), file=sys.stderr)
        rows, early = held_out_rows(model, tuned, kw, args)
        timing = alternated(rows, prompts, repeats=args.repeats)
    entries = []
    for name in rows:
        entry = row_entry(timing, name, prompts)
        if "error" not in entry:
            entry["realised_disagreement"] = 1.0 - entry["agreement"]
            if name in early:
                entry |= {"early_exit": repr(early[name])} | stats_entry(timing.outputs[name])
        entries.append(entry)
        print(json.dumps(json_clean(entry)), file=sys.stderr, flush=True)
    return {
        "model": args.model,
        "tolerance": args.tolerance,
        "held_out_prompts": label,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "torch": torch.__version__,
        "tune": tune_record,
        "timing": f"{args.repeats} alternated rounds (each: every held-out prompt, every row, rotated order) after "
        "one warm-up; speed = model.generate time / row time over all prompts, median over rounds with min/max/IQR",
        "rows": entries,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="v3", help="HF directory, or a shipped reference name (v1, v2, v3)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="tolerated token disagreement δ")
    ap.add_argument("--calibration-data", type=Path, default=None, help="calibration text (default: --data)")
    ap.add_argument("--calibration-prompts", type=int, default=None, help="default: what Learn-then-Test needs")
    ap.add_argument("--exit-layers", type=int, nargs="+", default=[1, 2, 3], help="tune's fixed verify exit layers")
    ap.add_argument("--tolerant-layers", type=int, nargs="+", default=[1, 2], help="tune's tolerant exit layers")
    ap.add_argument("--tune-budget", type=float, default=None, help="dx.tune's budget_s (default: none)")
    ap.add_argument("--verify", type=int, nargs=2, default=[1, 4], metavar=("E", "K"), help="verify row E and K")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.9, 0.5], help="uncalibrated tolerant rows")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    add_common_args(ap)
    args = ap.parse_args()
    if args.calibration_data is None:
        args.calibration_data = args.data
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
