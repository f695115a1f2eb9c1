"""Is the offline bound of ``kv="tolerant"``'s disagreement an upper bound on real generation? (JSON on stdout)

On ``--prompts`` prompts of ``--data``: one :func:`deltaexit.calibration.tolerant.tolerance_table` (greedy
continuations, batch 1), then real ``Tolerant(ratio=r)`` generation drafting from block ``--exit-layer`` for each
``--ratios`` value. Per ratio: the mean real token disagreement with ``model.generate`` (the ``"textual"`` loss),
the share of prompts whose text changed, the mean offline bound Learn-then-Test calibrates on, and whether the
bound held on every prompt.

Usage:
    python benchmarks/tolerant_bound.py --model v3 --data ../shared/data/wikitext-2/valid.txt --prompts 60
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from bench_timing import add_common_args, load_model, read_prompts

import deltaexit as dx
from deltaexit.calibration.losses import token_disagreement
from deltaexit.calibration.tolerant import tolerance_table
from deltaexit.generation import Tolerant
from deltaexit.io import atomic_write_json
from deltaexit.jsonable import json_clean
from deltaexit.threads import torch_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="v3")
    ap.add_argument("--exit-layer", type=int, default=1)
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.99, 0.95, 0.9, 0.5])
    add_common_args(ap, prompts=60)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    prompts, label = read_prompts(tok, args.data, args.prompts, args.prompt_len)
    items = [p[0] for p in prompts]
    n = args.new_tokens
    rows = []
    with torch_threads(args.threads), torch.no_grad():
        table = tolerance_table(model, items, max_new_tokens=n)
        for ratio in args.ratios:
            policy = Tolerant(num_draft=args.num_draft, ratio=ratio)
            ee = dx.EarlyExit(model, "delta-norm", -math.inf, policy, min_exit_layer=args.exit_layer)
            outs = []
            for p in items:
                new = ee.generate(p[None], max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or 0)
                new = new[0, p.numel() :]
                outs.append(torch.cat([new, torch.zeros(n - new.numel(), dtype=new.dtype)]))
            real = token_disagreement(torch.stack(outs), table.continuations, table.mask)
            bound = table.losses(ratio, [args.exit_layer])
            rows.append(
                {
                    "ratio": ratio,
                    "real_disagreement": float(real.mean()),
                    "prompts_changed": float((real > 0).to(torch.float64).mean()),
                    "offline_bound": float(bound.mean()),
                    "bound_held_on_every_prompt": bool((real <= bound + 1e-12).all()),
                }
            )
    result = json_clean(
        {"model": args.model, "prompts": label, "new_tokens": n, "exit_layer": args.exit_layer, "rows": rows}
    )
    if args.json:
        atomic_write_json(args.json, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
