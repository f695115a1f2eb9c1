"""``deltaexit demo``: a saturation summary on the embedded default model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the demo on the embedded default model")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import deltaexit as dx
    from deltaexit.testing import tiny_model

    model = tiny_model("llama", num_layers=6, hidden=64, vocab=256, seed=args.seed)
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(args.seed))
    with dx.collect(model, ("delta",), topk=3) as trace:
        model(input_ids=ids)
    sat = dx.saturation(trace)
    print(
        f"deltaexit {dx.__version__} demo: tiny random llama, "
        f"{sat.num_layers} layers, {sat.num_tokens} tokens"
    )
    print(f"{'layer':>5} {'saturated':>10} {'change->next':>13} {'|delta|':>9}")
    norms = trace.delta.float().norm(dim=-1).flatten(1).mean(1)
    for row, norm in zip(sat.per_layer(), norms.tolist()):
        change = f"{row['change_rate']:.3f}" if "change_rate" in row else "-"
        print(f"{row['layer']:>5} {row['saturated']:>10.3f} {change:>13} {norm:>9.3f}")
    print(
        f"oracle: mean saturation layer {sat.oracle_mean_layer:.2f}/{sat.num_layers}, "
        f"compute a perfect predictor saves {sat.oracle_compute_saved:.1%}"
    )
    print(f"top-k ranks saturate at mean layers {[round(x, 2) for x in sat.topk_mean_layers() or []]}")
    return 0
