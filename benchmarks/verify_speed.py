"""Lossless self-speculation (`kv="verify"`) against `model.generate` and its peers, batch 1, one JSON on stdout.

Rows, timed in the same run and alternated (``deltaexit.timing.alternated``: one warm-up call each, then
``--repeats`` rounds in which every prompt runs every row, in a rotated order): ``model.generate``; for each
setting ``E:k`` ``dx`` ``verify`` drafting ``k`` tokens from block ``E`` (threshold -inf) and transformers' own
LayerSkip, ``model.generate(..., assistant_early_exit=E, num_assistant_tokens=k)`` (its error text is recorded
where it does not run, e.g. ``IndexError`` on GPT-NeoX caches); and prompt-lookup decoding
(``prompt_lookup_num_tokens``, 3 and 10 by default: ``--prompt-lookup``, ``--more-prompt-lookup``). Each speed
is ``model.generate`` time / row time summed over the prompts, as the median over rounds with its spread (min,
max, IQR); agreement and identity are checked against ``model.generate``'s greedy output.

Usage:
    python benchmarks/verify_speed.py --model v2 --data ../shared/data/wikitext-2/test.txt \\
        --settings 2:4 3:4 4:4 --json docs/results/verify_speed_v2.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bench_timing import add_common_args, emit, load_model, read_prompts, row_entry

from deltaexit.generation import EarlyExit, Verify
from deltaexit.jsonable import json_clean
from deltaexit.threads import torch_threads
from deltaexit.timing import Row, alternated, generate_row, peer_rows


def parse_setting(text: str) -> tuple[int, int, bool, bool]:
    """``"LAYER:BUDGET"`` plus optional ``:adaptive`` and ``:nongram`` (early-exit drafts only)."""
    parts = text.split(":")
    flags = parts[2:]
    if len(parts) < 2 or any(f not in ("adaptive", "nongram") for f in flags):
        raise argparse.ArgumentTypeError(f"setting {text!r}: use LAYER:BUDGET[:adaptive][:nongram]")
    return int(parts[0]), int(parts[1]), "adaptive" in flags, "nongram" in flags


def verify_row(model, layer: int, budget: int, adaptive: bool, nongram: bool, kw: dict) -> tuple[Row, EarlyExit]:
    """``dx`` lossless self-speculation drafting ``budget`` tokens from block ``layer`` (and n-gram drafts from the
    prompt and output unless ``nongram``), as a timed row."""
    policy = Verify(num_draft=budget, adaptive=adaptive, **({"ngram": 0} if nongram else {}))
    ee = EarlyExit(model, "delta-norm", float("-inf"), kv=policy, min_exit_layer=layer)
    return generate_row(ee, {**kw, "return_dict_in_generate": True}), ee


def run(args: argparse.Namespace) -> dict:
    """Time every row; the JSON-ready result."""
    model, tok = load_model(args.model)
    prompts, label = read_prompts(tok, args.data, args.prompts, args.prompt_len)
    kw = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id or 0}
    layerskip = [] if args.no_layerskip else [(layer, budget) for layer, budget, _, _ in args.settings]
    rows = peer_rows(model, kw, layerskip=list(dict.fromkeys(layerskip)), prompt_lookup=args.prompt_lookup or None)
    for tokens in args.more_prompt_lookup:  # e.g. 10, the other value transformers' docs use
        rows[f"prompt_lookup {tokens}"] = generate_row(model, {**kw, "prompt_lookup_num_tokens": tokens})
    names = {}
    for setting in args.settings:
        name = "verify " + ":".join(str(x) for x in setting[:2]) + (":adaptive" if setting[2] else "")
        name += ":nongram" if setting[3] else ""
        rows[name], _ = verify_row(model, *setting, kw)
        names[name] = setting
    with torch_threads(args.threads):
        timing = alternated(rows, prompts, repeats=args.repeats)
    entries = []
    for name in rows:
        entry = row_entry(timing, name, prompts)
        if name in names and "error" not in entry:
            layer, budget, adaptive, nongram = names[name]
            stats = [o.stats for o in timing.outputs[name]]
            entry |= {"min_exit_layer": layer, "num_draft": budget, "adaptive_draft": adaptive, "ngram": not nongram}
            entry |= {"ngram_accepted": sum(s.ngram_accepted for s in stats)}
            entry |= {"accepted": sum(s.accepted for s in stats), "drafted": sum(s.drafted for s in stats)}
        entries.append(entry)
        print(json.dumps(json_clean(entry)), file=sys.stderr, flush=True)
    return {
        "model": args.model,
        "prompts": label,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "torch": torch.__version__,
        "timing": f"{args.repeats} alternated rounds (each: every prompt, every row, rotated order) after one "
        "warm-up; speed = model.generate time / row time over all prompts, median over rounds with min/max/IQR",
        "rows": entries,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="v2", help="HF directory, or a shipped reference name (v1, v2, ...)")
    ap.add_argument("--settings", type=parse_setting, nargs="+", default=[parse_setting("2:4")])
    ap.add_argument("--no-layerskip", action="store_true", help="no assistant_early_exit rows")
    ap.add_argument(
        "--more-prompt-lookup",
        type=int,
        nargs="*",
        default=[10],
        help="further prompt_lookup_num_tokens rows besides --prompt-lookup (default: 10; none: no values)",
    )
    add_common_args(ap)
    args = ap.parse_args()
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
