"""Early-exit generate() speed against model.generate and its peers in the same run (JSON on stdout).

For each batch size, KV policy and exit setting: tokens/s as a ratio to ``model.generate`` (greedy, same
prompts), mean exit layer, the blocks-implied speed-up, the share of that speed-up reached, and agreement with
the full model's greedy output (plus the oracle's mean layer on those tokens when ``--oracle``). Exit settings:
``never`` (threshold inf: pure machinery overhead), ``fixed-E`` (a constant measure that passes at layer E: a
controlled exit depth for the speed-up check) and every registered measure named in ``--measures`` with
``--threshold``. Peers in the same rounds: transformers' LayerSkip (``assistant_early_exit=E`` for each fixed
``E``, ``num_assistant_tokens=--num-draft``) and prompt lookup (``prompt_lookup_num_tokens``); where one does not
run (batch > 1, a cache it cannot crop) its error text is recorded instead.

Timing: ``deltaexit.timing.alternated``, one warm-up call per row, then ``--repeats`` rounds in which every
batch runs every row in a rotated order; each speed is the median over rounds with its min, max and IQR.

Example:
    python benchmarks/generate_speed.py --layers 12 --hidden 768 --new-tokens 32 > out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields
from typing import Any

import torch
from bench_timing import BASE, add_common_args, data_lines, load_model, row_entry

import deltaexit as dx
from deltaexit.generation import CostModel, EarlyExit, GenerationStats, KVPolicy, Propagate, Recompute, Verify
from deltaexit.io import atomic_write_json
from deltaexit.jsonable import json_clean
from deltaexit.measures.base import available_measures, get_measure
from deltaexit.testing import ConstantScore, tiny_model
from deltaexit.threads import torch_threads
from deltaexit.timing import Row, Timing, alternated, generate_row, peer_rows


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


def policy_of(kv: str, args: argparse.Namespace) -> KVPolicy:
    """The KV policy named ``kv`` with this run's settings (draft budget, adaptive drafts, query skip)."""
    if kv == "verify":
        return Verify(num_draft=args.num_draft, adaptive=args.adaptive_draft)
    if kv == "propagate":
        return Propagate(query_skip=not args.no_query_skip)
    if kv == "recompute":
        return Recompute()
    raise ValueError(f"unknown --policies entry {kv!r}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: the tiny config's, heads/2)")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default: the tiny config's, 2*hidden)")
    ap.add_argument(
        "--model", default=None, help="local model directory or a shipped reference name, instead of a random config"
    )
    ap.add_argument("--num-draft", type=int, default=4, help="verify: most drafts per round")
    ap.add_argument("--adaptive-draft", action="store_true", help="verify: Verify(adaptive=True)")
    ap.add_argument(
        "--no-query-skip",
        action="store_true",
        default=os.environ.get("DELTAEXIT_NO_QSKIP", "").strip() not in ("", "0"),
        help="propagate: run the query projection in K/V-only calls too, Propagate(query_skip=False) "
        "(default from DELTAEXIT_NO_QSKIP=1)",
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--policies", nargs="+", default=["verify", "propagate", "recompute"])
    ap.add_argument("--fixed-exits", type=int, nargs="*", default=[3, 6])
    ap.add_argument("--measures", nargs="*", default=["softmax-max", "delta-norm", "state-cosine", "delta-mlp"])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--no-layerskip", action="store_true", help="no assistant_early_exit rows")
    ap.add_argument("--oracle", action="store_true")
    add_common_args(ap, prompts=1, new_tokens=32)
    return ap.parse_args()


def build_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``(model, tokenizer or None, description)``: ``--model``, else a random ``tiny_model`` config."""
    if args.model:
        model, tokenizer = load_model(args.model)
        return model, tokenizer, args.model
    model = tiny_model(
        args.arch,
        num_layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        vocab=args.vocab,
        max_position_embeddings=1024,
        **({"num_key_value_heads": args.kv_heads} if args.kv_heads else {}),
        **({"intermediate_size": args.intermediate} if args.intermediate else {}),
    )
    desc = (
        f"random {args.arch} {args.layers}x{args.hidden} vocab {args.vocab}, "
        f"{getattr(model.config, 'num_key_value_heads', args.heads)}/{args.heads} kv heads, "
        f"FFN {getattr(model.config, 'intermediate_size', '?')}"
    )
    return model, None, desc


def batch_inputs(args: argparse.Namespace, tokenizer: Any, vocab: int, batch: int) -> list[torch.Tensor]:
    """``--prompts`` batches of ``batch`` prompts: text from ``--data`` with a tokenizer, else random ids."""
    if tokenizer is not None:
        lines, _ = data_lines(args.data, batch * args.prompts, min_chars=8 * args.prompt_len)
        ids = [tokenizer(line, return_tensors="pt").input_ids[0, : args.prompt_len] for line in lines]
        return [torch.stack(ids[i * batch : (i + 1) * batch]) for i in range(args.prompts)]
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(3, vocab, (batch, args.prompt_len), generator=g) for _ in range(args.prompts)]


def exit_settings(args: argparse.Namespace) -> list[tuple[str, Any, float, int]]:
    """``(label, measure, threshold, min_exit_layer)`` for ``never``, each ``fixed-E`` and each measure."""
    settings: list[tuple[str, Any, float, int]] = [("never", ConstantScore(), math.inf, 1)]
    settings += [(f"fixed-{e}", ConstantScore(), 0.5, e) for e in args.fixed_exits]
    for name in args.measures:
        if name in available_measures():
            try:
                settings.append((name, get_measure(name), args.threshold, 1))
            except Exception as exc:  # a measure that needs fitting
                print(json.dumps({"skipped_measure": name, "reason": str(exc)}), file=sys.stderr)
    return settings


def pooled(stats: list[GenerationStats]) -> GenerationStats:
    """One :class:`GenerationStats` for several calls: counters summed, the mean exit layer token-weighted."""
    counters = {f.name: sum(getattr(s, f.name) for s in stats) for f in fields(GenerationStats) if f.type == "int"}
    counters["num_layers"] = stats[0].num_layers
    tokens = max(1, counters["tokens"])
    mean_exit = sum(s.mean_exit_layer * s.tokens for s in stats if s.tokens) / tokens
    frac = stats[0].measure_block_fraction
    return GenerationStats(policy=stats[0].policy, measure_block_fraction=frac, mean_exit_layer=mean_exit, **counters)


def dx_entry(timing: Timing, name: str, inputs: list[torch.Tensor], cost: CostModel) -> dict[str, Any]:
    """``row_entry``'s figures plus the early-exit counters and the speed-up ceilings they imply."""
    entry = row_entry(timing, name, inputs)
    if "error" in entry:
        return entry
    s = pooled([o.stats for o in timing.outputs[name]])
    speed, decode = entry["speed"]["median"], entry["decode_speed"]["median"]
    implied = s.implied_speedup_with_measure
    return entry | {
        "tokens_per_s_ratio": speed,
        "time_ratio": 1.0 / speed,
        "decode_tokens_per_s_ratio": decode,
        "mean_exit_layer": s.mean_exit_layer,
        "blocks_run": s.blocks_run,
        "full_depth_blocks": s.full_depth_blocks,
        "implied_speedup": s.implied_speedup,
        "measure_block_fraction": s.measure_block_fraction,
        "implied_speedup_with_measure": implied,
        # the target's figure: wall-clock speed-up / (L / blocks per token, measure cost included)
        "share_of_implied_speedup": speed / implied if implied else None,
        # FLOP cost model that also counts the LM head once per token and propagate's K/V-only calls
        # (q/k/v projections): what a perfect implementation could reach
        "cost_model_speedup": cost.speedup_of(s),
        # over the decode steps only (from the first generated token on): the steps the implied speed-up counts
        "decode_share_of_implied_speedup": decode / implied if implied else None,
        "accepted": s.accepted,
        "drafted": s.drafted,
        "kv_only_calls": s.kv_only_calls,
    }


def run_batch(model: Any, args: argparse.Namespace, inputs: list[torch.Tensor], cost: CostModel) -> list[dict]:
    """Every row (peers and each exit setting x policy) on ``inputs``, alternated; one entry per row."""
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    layerskip = [] if args.no_layerskip else [(e, args.num_draft) for e in args.fixed_exits]
    rows: dict[str, Row] = peer_rows(model, kw, layerskip=layerskip, prompt_lookup=args.prompt_lookup or None)
    meta = {}
    for label, measure, threshold, min_exit in exit_settings(args):
        for kv in args.policies:
            ee = EarlyExit(model, measure, threshold, policy_of(kv, args), min_exit_layer=min_exit)
            name = f"{kv} {label}"
            rows[name] = generate_row(ee, {**kw, "return_dict_in_generate": True})
            meta[name] = {"policy": kv, "exit": label, "threshold": threshold, "min_exit_layer": min_exit}
    timing = alternated(rows, inputs, repeats=args.repeats)
    oracle = None
    if args.oracle:
        refs = timing.outputs[BASE]
        oracle = sum(oracle_mean_layer(model, r, args.prompt_len) for r in refs) / len(refs)
    entries = []
    for name in rows:
        entry = dx_entry(timing, name, inputs, cost) if name in meta else row_entry(timing, name, inputs)
        entry = {"batch": inputs[0].shape[0], **meta.get(name, {"policy": name}), **entry, "oracle_mean_layer": oracle}
        entries.append(entry)
        print(json.dumps(json_clean(entry)), file=sys.stderr, flush=True)
    return entries


def main() -> None:
    args = parse_args()
    with torch_threads(args.threads):
        model, tokenizer, desc = build_model(args)
        num_layers = dx.find_structure(model).num_layers
        vocab = model.config.vocab_size
        context = args.prompt_len + args.new_tokens // 2
        cost = CostModel.from_model(model, context=context, query_skip=not args.no_query_skip)
        results = []
        for batch in args.batches:
            results += run_batch(model, args, batch_inputs(args, tokenizer, vocab, batch), cost)
    summary = {
        "model": desc,
        "num_layers": num_layers,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "prompts": args.prompts,
        "data": str(args.data) if tokenizer is not None else "random token ids",
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "timing": "alternated rounds (deltaexit.timing); speed = model.generate time / row time over the batches, "
        "median over rounds with min/max/IQR",
        "num_draft": args.num_draft,
        "adaptive_draft": args.adaptive_draft,
        "head_block_equivalents": cost.head_blocks,
        "kv_only_block_equivalents": cost.kv_only_blocks,
        "query_skip": not args.no_query_skip,  # K/V-only calls skip a separate q projection (--no-query-skip: off)
        "results": results,
    }
    summary = json_clean(summary)
    if args.json:
        atomic_write_json(args.json, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
