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
import os
import statistics
import time

import torch
from transformers.generation.streamers import BaseStreamer

import deltaexit as dx
from deltaexit.generation import CostModel, EarlyExit, KVPolicy, Propagate, Recompute, Verify
from deltaexit.measures.base import available_measures, get_measure
from deltaexit.testing import ConstantScore, tiny_model


class DecodeClock(BaseStreamer):
    """A streamer that notes when the first generated token arrives (the prompt's forward is done)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt, the second the token from the prompt's forward
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def paired(base_fn, fn, repeats):
    """Alternate ``base_fn`` and ``fn`` (each called with a streamer); medians of the per-pair time ratios.

    Returns ``(whole-call time ratio, decode time ratio, median base time, last result)``. The decode time runs
    from the first generated token (the prompt's full-depth forward, which early exit cannot shorten, is done)
    to the return: the steps that ``stats.implied_speedup`` counts.
    """
    ratios, decode_ratios, base_times, result = [], [], [], None
    for _ in range(repeats):
        base_clock, clock = DecodeClock(), DecodeClock()
        t0 = time.perf_counter()
        base_fn(base_clock)
        t1 = time.perf_counter()
        result = fn(clock)
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
        if base_clock.first is not None and clock.first is not None:
            decode_ratios.append((t2 - clock.first) / (t1 - base_clock.first))
        base_times.append(t1 - t0)
    decode = statistics.median(decode_ratios) if decode_ratios else float("nan")
    return statistics.median(ratios), decode, statistics.median(base_times), result


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: the tiny config's, heads/2)")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default: the tiny config's, 2*hidden)")
    ap.add_argument(
        "--model",
        default=None,
        help="local model directory, or v1/v2 for a shipped reference, instead of a random config",
    )
    ap.add_argument(
        "--text", default=None, help="prompts from this text file (one paragraph a line; needs a tokenizer)"
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
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--policies", nargs="+", default=["verify", "propagate", "recompute"])
    ap.add_argument("--fixed-exits", type=int, nargs="*", default=[3, 6])
    ap.add_argument("--measures", nargs="*", default=["softmax-max", "delta-norm", "state-cosine", "delta-mlp"])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--oracle", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = None
    if args.model in ("v1", "v2"):
        model, tokenizer = dx.load_reference(args.model)
    elif args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
        if args.text:
            tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    else:
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
    num_layers = dx.find_structure(model).num_layers
    vocab = model.config.vocab_size
    settings = [("never", ConstantScore(), math.inf, 1)]
    settings += [(f"fixed-{e}", ConstantScore(), 0.5, e) for e in args.fixed_exits]
    for name in args.measures:
        if name in available_measures():
            try:
                settings.append((name, get_measure(name), args.threshold, 1))
            except Exception as exc:  # a measure that needs fitting
                print(json.dumps({"skipped_measure": name, "reason": str(exc)}))
    cost = CostModel.from_model(
        model, context=args.prompt_len + args.new_tokens // 2, query_skip=not args.no_query_skip
    )
    head_blocks, kv_only_blocks = cost.head_blocks, cost.kv_only_blocks
    results = []
    for batch in args.batches:
        if args.text and tokenizer is not None:
            with open(args.text, encoding="utf-8") as f:
                lines = [line for line in f if len(line) > 8 * args.prompt_len][
                    : batch * (1 + args.batches.index(batch))
                ]
            ids = torch.stack([tokenizer(line, return_tensors="pt").input_ids[0, : args.prompt_len] for line in lines])
            ids = ids[-batch:]
        else:
            g = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, vocab, (batch, args.prompt_len), generator=g)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **kw)  # warm-up
            ref = model.generate(ids, **kw)
        oracle = oracle_mean_layer(model, ref, args.prompt_len) if args.oracle else None
        for label, measure, threshold, min_exit in settings:
            for kv in args.policies:
                ee = EarlyExit(model, measure, threshold, policy_of(kv, args), min_exit_layer=min_exit)
                ee.generate(ids, **kw)
                with torch.no_grad():
                    time_ratio, decode_ratio, base_t, out = paired(
                        lambda clock, ids=ids, kw=kw: model.generate(ids, streamer=clock, **kw),
                        lambda clock, ee=ee, ids=ids, kw=kw: ee.generate(
                            ids, return_dict_in_generate=True, streamer=clock, **kw
                        ),
                        args.repeats,
                    )
                s = out.stats
                speed = 1.0 / time_ratio
                decode_speed = 1.0 / decode_ratio
                row = {
                    "batch": batch,
                    "policy": kv,
                    "exit": label,
                    "threshold": threshold,
                    "min_exit_layer": min_exit,
                    "time_ratio": time_ratio,
                    "generate_s": base_t,
                    "tokens_per_s_ratio": speed,
                    "mean_exit_layer": s.mean_exit_layer,
                    "blocks_run": s.blocks_run,
                    "full_depth_blocks": s.full_depth_blocks,
                    "implied_speedup": s.implied_speedup,
                    "measure_block_fraction": s.measure_block_fraction,
                    "implied_speedup_with_measure": s.implied_speedup_with_measure,
                    # the target's figure: wall-clock speed-up / (L / blocks per token, measure cost included)
                    "share_of_implied_speedup": speed / s.implied_speedup_with_measure
                    if s.implied_speedup_with_measure
                    else None,
                    # FLOP cost model that also counts the LM head once per token and propagate's K/V-only calls
                    # (q/k/v projections): what a perfect implementation could reach
                    "cost_model_speedup": cost.speedup_of(s),
                    # the same over the decode steps only (from the first generated token on): the steps the
                    # implied speed-up counts; the prompt's forward is the same full-depth pass on both sides
                    "decode_time_ratio": decode_ratio,
                    "decode_tokens_per_s_ratio": decode_speed,
                    "decode_share_of_implied_speedup": decode_speed / s.implied_speedup_with_measure
                    if s.implied_speedup_with_measure
                    else None,
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
        "model": args.model
        or (
            f"random {args.arch} {num_layers}x{args.hidden} vocab {vocab}, "
            f"{getattr(model.config, 'num_key_value_heads', args.heads)}/{args.heads} kv heads, "
            f"FFN {getattr(model.config, 'intermediate_size', '?')}"
        ),
        "num_layers": num_layers,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "num_draft": args.num_draft,
        "adaptive_draft": args.adaptive_draft,
        "head_block_equivalents": head_blocks,
        "kv_only_block_equivalents": kv_only_blocks,
        "query_skip": not args.no_query_skip,  # K/V-only calls skip a separate q projection (--no-query-skip: off)
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
