"""Calibrate an early-exit threshold with a statistical guarantee (Learn-then-Test).

Splits prompts from the shipped sample into a calibration set and a held-out set. ``dx.calibrate``
picks the most aggressive softmax-max threshold such that, with probability >= 1 - epsilon over
the calibration draw, at most a share delta of early-exit continuations (``kv="recompute"``)
differ anywhere from the full model's greedy continuation (``loss="sequence"``). The held-out
prompts then check the calibrated ``EarlyExit`` against ``model.generate``: the share of differing
continuations should be at most about delta (the guarantee is on the expectation, so a small
held-out set wobbles around it).

``backend="offline"`` reads the exits off one full forward per prompt and is fast; for
``kv="recompute"`` and ``loss="sequence"`` it is exact (the same losses as real generation).
``backend="generate"`` runs the real generation for every tested threshold (any policy, any loss;
slower). ``loss="textual"`` (share of differing tokens) is the other common choice.

Run:
    python examples/04_calibrate_threshold.py
    python examples/04_calibrate_threshold.py --quick                 # fewer prompts (CI)
    python examples/04_calibrate_threshold.py --delta 0.05 --backend generate
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import deltaexit as dx
from deltaexit.samples import sample_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="v2", help="shipped reference: v1 or v2")
    parser.add_argument("--delta", type=float, default=0.2, help="tolerated share of differing continuations")
    parser.add_argument("--loss", choices=["sequence", "textual"], default="sequence")
    parser.add_argument("--epsilon", type=float, default=0.1, help="probability that the guarantee fails")
    parser.add_argument("--backend", choices=["offline", "generate"], default="offline")
    parser.add_argument("--prompts", type=int, default=300, help="calibration prompts (then 50 held out)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="120 calibration prompts, 20 held out, 8 tokens")
    args = parser.parse_args()
    n_cal, n_test, new_tokens = (120, 20, 8) if args.quick else (args.prompts, 50, args.new_tokens)

    model, tokenizer = dx.load_reference(args.model)
    prompts = sample_prompts(n_cal + n_test, words=10)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(prompts), generator=generator).tolist()  # an i.i.d.-like split
    calibration = [prompts[i] for i in order[:n_cal]]
    held_out = [prompts[i] for i in order[n_cal:]]

    result = dx.calibrate(
        model,
        calibration,
        tokenizer=tokenizer,
        measure="softmax-max",
        kv="recompute",
        delta=args.delta,
        epsilon=args.epsilon,
        loss=args.loss,
        backend=args.backend,
        max_new_tokens=new_tokens,
        min_exit_layer=2,
    )
    print(result.summary())

    with tempfile.TemporaryDirectory() as tmp:  # a result is saved and loaded like a model
        result.save(tmp)
        result = dx.CalibrationResult.load(tmp)
    ee = result.early_exit(model)
    tokenizer.padding_side = "left"
    enc = tokenizer(held_out, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        full = model.generate(**enc, **kw)[:, enc.input_ids.shape[1] :]
        out = ee.generate(**enc, return_dict_in_generate=True, **kw)
    new = out.sequences[:, enc.input_ids.shape[1] :]
    real = full != tokenizer.pad_token_id
    differs = ((new != full) & real).any(dim=1).float().mean() if args.loss == "sequence" else None
    token_share = float(((new != full) & real).sum() / real.sum())
    measured = float(differs) if differs is not None else token_share
    print(f"held-out: {len(held_out)} prompts, {args.loss} loss {measured:.3f} (delta {args.delta}), "
          f"differing tokens {token_share:.3f}, "
          f"mean exit layer {out.stats.mean_exit_layer:.2f} of {out.stats.num_layers}")  # fmt: skip


if __name__ == "__main__":
    main()
