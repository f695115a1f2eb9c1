"""Early-exit generate() speed against model.generate in the same run (JSON on stdout).

For each batch size, KV policy and exit setting: tokens/s as a ratio to ``model.generate`` (greedy, same
prompts, median of ``--repeats``), mean exit layer, the blocks-implied speed-up, the share of that speed-up
reached, and agreement with the full model's greedy output (plus the oracle's mean layer on those tokens when
``--oracle``). Exit settings: ``never`` (threshold inf: pure machinery overhead), ``fixed-E`` (a constant
measure that passes at layer E: a controlled exit depth for the speed-up check) and every registered measure
named in ``--measures`` with ``--threshold``.

Example:
    python benchmarks/generate_speed.py --layers 12 --hidden 768 --new-tokens 32 > out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

import deltaexit as dx
from deltaexit.generation import EarlyExit
from deltaexit.measures.base import ConfidenceMeasure, available_measures, get_measure
from deltaexit.testing import tiny_model


class FixedScore(ConfidenceMeasure):
    """Scores 1 everywhere: with min_exit_layer=E every token exits after block E."""

    name = "bench-fixed"

    def score(self, state):
        return torch.ones(state.h_out.shape[:-1], device=state.h_out.device)


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def oracle_mean_layer(model, sequences, prompt_len):
    """Mean saturation layer (first layer from which the lens top-1 stays the final top-1) on generated tokens."""
    lens = dx.Lens.from_model(model)
    with torch.no_grad():
        hs = model(sequences, output_hidden_states=True).hidden_states  # L+1, last one normed
        layers = len(hs) - 1
        final = model(sequences).logits.argmax(-1)
        top = torch.stack([lens(h).argmax(-1) for h in hs[1:layers]] + [final])  # [L, B, T]
    ok = top == final[None]
    # saturation layer: 1 + index of the last layer that disagrees
    disagree = (~ok).flip(0).int().argmax(0)
    any_dis = (~ok).any(0)
    sat = torch.where(any_dis, layers - disagree + 1, torch.ones_like(disagree))
    sat = sat.clamp(max=layers)
    return float(sat[:, prompt_len - 1 : -1].float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--model", default=None, help="local model directory instead of a random config")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--policies", nargs="+", default=["verify", "propagate", "recompute"])
    ap.add_argument("--fixed-exits", type=int, nargs="*", default=[3, 6])
    ap.add_argument("--measures", nargs="*", default=["delta-norm", "softmax-max", "delta-mlp"])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--oracle", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    else:
        model = tiny_model(
            args.arch,
            num_layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            vocab=args.vocab,
            max_position_embeddings=1024,
        )
    num_layers = dx.find_structure(model).num_layers
    vocab = model.config.vocab_size
    settings = [("never", FixedScore(), math.inf, 1)]
    settings += [(f"fixed-{e}", FixedScore(), 0.5, e) for e in args.fixed_exits]
    for name in args.measures:
        if name in available_measures():
            try:
                settings.append((name, get_measure(name), args.threshold, 1))
            except Exception as exc:  # a measure that needs fitting
                print(json.dumps({"skipped_measure": name, "reason": str(exc)}))
    results = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, vocab, (batch, args.prompt_len), generator=g)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **kw)  # warm-up
            base_t, ref = timed(lambda ids=ids, kw=kw: model.generate(ids, **kw), args.repeats)
        oracle = oracle_mean_layer(model, ref, args.prompt_len) if args.oracle else None
        for label, measure, threshold, min_exit in settings:
            for kv in args.policies:
                ee = EarlyExit(model, measure, threshold, kv, min_exit_layer=min_exit)
                ee.generate(ids, **kw)
                t, out = timed(
                    lambda ee=ee, ids=ids, kw=kw: ee.generate(ids, return_dict_in_generate=True, **kw), args.repeats
                )
                s = out.stats
                speed = base_t / t
                row = {
                    "batch": batch,
                    "policy": kv,
                    "exit": label,
                    "threshold": threshold,
                    "min_exit_layer": min_exit,
                    "time_ratio": t / base_t,
                    "tokens_per_s_ratio": speed,
                    "mean_exit_layer": s.mean_exit_layer,
                    "blocks_run": s.blocks_run,
                    "full_depth_blocks": s.full_depth_blocks,
                    "implied_speedup": s.implied_speedup,
                    "share_of_implied_speedup": speed / s.implied_speedup if s.implied_speedup else None,
                    "agreement": float(
                        (out.sequences[:, args.prompt_len :] == ref[:, args.prompt_len :]).float().mean()
                    ),
                    "identical": bool(torch.equal(out.sequences, ref)),
                    "accepted": s.accepted,
                    "drafted": s.drafted,
                    "kv_only_calls": s.kv_only_calls,
                    "oracle_mean_layer": oracle,
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    summary = {
        "model": args.model or f"random {args.arch} {num_layers}x{args.hidden} vocab {vocab}",
        "num_layers": num_layers,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
