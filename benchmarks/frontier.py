"""The speed/quality frontier of early exit against the oracle, per measure and KV policy.

For each model (reference v1 and v2 by default), on held-out prompts (WikiText-2 ``test.txt``):

* **offline sweep** (every measure): one forward over prompt + the full model's greedy
  continuation, exits read off every layer (:mod:`deltaexit.calibration.simulate`); per threshold:
  agreement of the exit token with the full model's token, mean blocks run per token, blocks
  saved. Exact for ``kv="recompute"`` up to the first disagreement; ``verify`` is lossless.
* **oracle**: each token exits at its saturation layer (the lens's top-1 is final from there on):
  agreement 1, the most blocks any exit rule can save on these tokens.
* **generation** (every measure x KV policy, when ``dx.EarlyExit`` is installed): batch-1
  ``EarlyExit.generate`` at the thresholds where the offline sweep reaches the ``--targets``
  agreements, interleaved with ``model.generate`` on the same prompts: tokens/s ratio, mean blocks
  run per token (from ``out.stats``), agreement with the full greedy continuation.

Trainable measures are fitted on ``valid.txt`` (label ``final``) before the sweep. Prints JSON,
writes ``--json`` and, with ``--plots DIR``, ``frontier_<model>_blocks.png`` (blocks saved vs
agreement, one line per measure, the oracle as a star) and ``frontier_<model>_speed.png``
(tokens/s ratio vs agreement; without generation, the speed-up the saved blocks imply, labelled so).

Usage:
    python benchmarks/frontier.py --models v1 v2 --json docs/results/frontier.json --plots docs/results
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_validity import DATA, fit_measure, load_model, load_prompts, resolve_measure

import deltaexit as dx
from deltaexit.calibration import candidate_thresholds, continuation_table, greedy_continuations
from deltaexit.calibration.risk import continuation_mask
from deltaexit.measures.base import available_measures

DEFAULT_MEASURES = (
    "softmax-max", "softmax-gap", "state-cosine", "delta-norm", "delta-ratio",
    "linear", "delta-mlp", "hdelta-mlp", "lens-mlp",
)  # fmt: skip


# -- measures -------------------------------------------------------------------------------------------
def build_measures(
    names: list[str], model: Any, tokenizer: Any, fit_tokens: int, data: Path = DATA
) -> tuple[list[Any], dict[str, str]]:
    measures, skipped = [], {}
    for name in names:
        try:
            m = resolve_measure(name)
        except KeyError as exc:
            skipped[name] = f"not registered ({exc})"
            continue
        if getattr(m, "requires_fit", False):
            try:
                t0 = time.perf_counter()
                fit_measure(m, model, tokenizer, fit_tokens, data=data)
                print(f"fitted {name} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            except Exception as exc:  # the measures API may differ; record and go on
                skipped[name] = f"fit failed: {type(exc).__name__}: {exc}"
                continue
        measures.append(m)
    return measures, skipped


# -- offline sweep ---------------------------------------------------------------------------------------
def sweep(table: Any, num: int) -> list[dict[str, float]]:
    points = []
    for c in candidate_thresholds(table, "constant", num):
        s = table.summary(c)
        points.append({"threshold": c, **s})
    return points


def best_at(points: list[dict[str, float]], agreement: float) -> dict[str, float] | None:
    ok = [p for p in points if p["agreement"] >= agreement]
    return max(ok, key=lambda p: p["blocks_saved"]) if ok else None


# -- generation ------------------------------------------------------------------------------------------
@torch.no_grad()
def generation_points(
    model: Any, prompts: list[torch.Tensor], full: torch.Tensor, measure: Any, kv: str,
    thresholds: list[float], max_new_tokens: int, repeats: int, batch: int = 1,
) -> list[dict[str, Any]]:  # fmt: skip
    """Early exit vs model.generate on the same batches of ``batch`` prompts, interleaved per batch.

    The prompts all have the same length, so a batch needs no padding; rows exit independently.
    """
    from deltaexit.calibration.simulate import pad_token_id

    pad = pad_token_id(model)
    eos = getattr(model.generation_config, "eos_token_id", None)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
    groups = [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    out = []
    for thr in thresholds:
        ee = dx.EarlyExit(model, measure=measure, threshold=thr, kv=kv)
        warm = torch.stack([prompts[i] for i in groups[0]])
        model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), **kwargs)  # warm-up, untimed
        ee.generate(warm, attention_mask=torch.ones_like(warm), **kwargs)
        t_full = t_ee = 0.0
        agree = total = 0
        blocks_run = full_blocks = 0
        for _ in range(repeats):
            for group in groups:
                ids = torch.stack([prompts[i] for i in group])
                mask = torch.ones_like(ids)
                t0 = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, **kwargs)
                t1 = time.perf_counter()
                res = ee.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
                t2 = time.perf_counter()
                t_full += t1 - t0
                t_ee += t2 - t1
                for row, i in enumerate(group):
                    new = res.sequences[row, ids.shape[1] :]
                    ref = full[i]
                    ok = continuation_mask(ref[None].clamp(min=0), eos)[0] & (ref >= 0)
                    n = min(new.numel(), ref.numel())
                    agree += int(((new[:n] == ref[:n]) & ok[:n]).sum())
                    total += int(ok.sum())
                blocks_run += res.stats.blocks_run
                full_blocks += res.stats.full_depth_blocks
        num_layers = res.stats.num_layers
        saved = 1 - blocks_run / full_blocks if full_blocks else float("nan")
        out.append({
            "threshold": thr,
            "kv": kv,
            "batch": batch,
            "agreement": agree / max(total, 1),
            "tokens_per_s_ratio": t_full / t_ee if t_ee else float("nan"),
            "blocks_saved": saved,
            "mean_blocks_per_token": num_layers * (1 - saved),
            "implied_speedup": 1 / (1 - saved) if saved < 1 else float("inf"),
        })  # fmt: skip
    return out


# -- plots -------------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    files = []
    name = Path(str(result["model_key"]).rstrip("/")).name or "model"  # a directory spec -> its last part
    oracle = result["oracle"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for m, points in result["offline"].items():
        ax.plot([p["blocks_saved"] for p in points], [p["agreement"] for p in points], label=m, lw=1.4)
    markers = {"verify": "s", "propagate": "^", "recompute": "o"}
    for g in (g for g in result.get("generation", []) if g.get("batch", 1) == 1):
        ax.scatter([g["blocks_saved"]], [g["agreement"]], marker=markers.get(g["kv"], "x"), s=18, alpha=0.7)
    ax.scatter([oracle["blocks_saved"]], [1.0], marker="*", s=180, color="black", label="oracle", zorder=5)
    ax.axhline(0.99, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("blocks saved (share of full-depth block compute)")
    ax.set_ylabel("agreement with full model's greedy token")
    ax.set_ylim(max(0.5, min(p["agreement"] for ps in result["offline"].values() for p in ps) - 0.02), 1.005)
    ax.set_title(f"{name}: blocks saved vs agreement (offline sweep)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = directory / f"frontier_{name}_blocks.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(str(path))

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    gen = [g for g in result.get("generation", []) if g.get("batch", 1) == 1]  # batch 1 in the speed plot
    if gen:
        keys = sorted({(g["measure"], g["kv"]) for g in gen})
        for m, kv in keys:
            pts = sorted((g for g in gen if g["measure"] == m and g["kv"] == kv), key=lambda g: g["agreement"])
            ax.plot(
                [g["tokens_per_s_ratio"] for g in pts],
                [g["agreement"] for g in pts],
                marker="o",
                label=f"{m} / {kv}",
            )
        ax.set_xlabel("tokens/s ratio to model.generate (batch 1, same run)")
    else:
        for m, points in result["offline"].items():
            ax.plot([1 / (1 - p["blocks_saved"]) for p in points], [p["agreement"] for p in points], label=m)
        ax.set_xlabel("speed-up implied by blocks saved (L / mean blocks; no generate measured)")
    ax.scatter([1 / (1 - oracle["blocks_saved"])], [1.0], marker="*", s=180, color="black", label="oracle (implied)")
    ax.axhline(0.99, color="grey", lw=0.6, ls="--")
    ax.set_ylabel("agreement with full model's greedy output")
    ax.set_title(f"{name}: speed vs agreement")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = directory / f"frontier_{name}_speed.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(str(path))
    return files


# -- markdown --------------------------------------------------------------------------------------------------
def markdown(out: dict[str, Any], target: float) -> str:
    """Tables for docs/frontier.md: per model, each measure at the target agreement, and generation points."""
    lines = []
    for r in out["models"].values():
        oracle = r["oracle"]
        lines += [
            f"### {r['model']}",
            "",
            f"{r['prompts']} held-out prompts x {r['max_new_tokens']} greedy tokens ({r['scored_tokens']} tokens); "
            f"{r['num_layers']} layers. Oracle: mean exit layer {oracle['mean_exit_layer']:.2f}, "
            f"blocks saved {oracle['blocks_saved']:.1%}.",
            "",
            f"| measure | blocks saved at >= {target:.0%} agreement (offline) | share of oracle's saving "
            "| mean blocks/token | implied speed-up |",
            "|---|---|---|---|---|",
        ]
        for m, v in sorted(r[f"at_agreement_{target}"].items(), key=lambda kv: -kv[1]["share_of_oracle"]):
            saved = v["blocks_saved"]
            lines.append(
                f"| {m} | {saved:.1%} | {v['share_of_oracle']:.1%} | {r['num_layers'] * (1 - saved):.2f} "
                f"| {1 / (1 - saved):.2f}x |"
            )
        lines.append(
            f"| *oracle* | {oracle['blocks_saved']:.1%} | 100% | {oracle['mean_exit_layer']:.2f} "
            f"| {1 / (1 - oracle['blocks_saved']):.2f}x |"
        )
        gen = r.get("generation") or []
        if gen:
            lines += [
                "",
                f"Generation, {r.get('generation_prompts')} prompts, interleaved with `model.generate` on the same "
                "batches:",
                "",
                "| measure | KV | batch | threshold | agreement | blocks saved | mean blocks/token | tokens/s ratio |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for g in gen:
                lines.append(
                    f"| {g['measure']} | {g['kv']} | {g.get('batch', 1)} | {g['threshold']:.4g} | {g['agreement']:.1%} "
                    f"| {g['blocks_saved']:.1%} | {g['mean_blocks_per_token']:.2f} | {g['tokens_per_s_ratio']:.2f} |"
                )
        elif r.get("generation_note"):
            lines += ["", f"*{r['generation_note']}*"]
        if r.get("measures_skipped"):
            lines += ["", f"Skipped: {r['measures_skipped']}"]
        lines.append("")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------------------
def run_model(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, tok, described = load_model(spec)
    vocab = dx.Lens.from_model(model).vocab_size
    num_layers = dx.find_structure(model).num_layers
    names = args.measures or [m for m in DEFAULT_MEASURES if m in available_measures()] or ["softmax-max", "delta-norm"]
    measures, skipped = build_measures(names, model, tok, args.fit_tokens, data=args.data)
    prompts = load_prompts(tok, vocab, args.prompts, args.prompt_tokens, seed=args.seed + 1000, data=args.data)
    full = greedy_continuations(model, prompts, args.max_new_tokens, batch_size=args.batch_size)
    offline, tables = {}, {}
    oracle = None
    for m in measures:
        table = continuation_table(model, prompts, m, full, batch_size=args.batch_size)
        tables[m.name] = table
        offline[m.name] = sweep(table, args.num_thresholds)
        oracle = oracle or table.oracle()
    assert oracle is not None, "no measure could be built"
    at99 = {}
    for m, points in offline.items():
        b = best_at(points, args.target_agreement)
        at99[m] = {
            "blocks_saved": b["blocks_saved"] if b else 0.0,
            "share_of_oracle": (b["blocks_saved"] / oracle["blocks_saved"]) if b and oracle["blocks_saved"] else 0.0,
            "threshold": b["threshold"] if b else None,
        }
    best = max(at99, key=lambda k: at99[k]["share_of_oracle"])
    result: dict[str, Any] = {
        "model_key": spec,
        "model": described,
        "num_layers": num_layers,
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "scored_tokens": next(iter(tables.values())).num_tokens,
        "measures_skipped": skipped,
        "oracle": oracle,
        "offline": offline,
        f"at_agreement_{args.target_agreement}": at99,
        "best_measure": best,
        "target_best_share_of_oracle_ge_0.8": at99[best]["share_of_oracle"] >= 0.8,
    }
    if hasattr(dx, "EarlyExit") and args.kv:
        gen = []
        gen_prompts = prompts[: args.gen_prompts]
        for m in measures:
            thresholds = []
            for a in args.targets:
                b = best_at(offline[m.name], a)
                if b and math.isfinite(b["threshold"]) and b["threshold"] not in thresholds:
                    thresholds.append(b["threshold"])
            for batch in args.gen_batches:
                for kv in args.kv:
                    try:
                        pts = generation_points(
                            model, gen_prompts, full, m, kv, thresholds, args.max_new_tokens, args.repeats, batch
                        )
                    except Exception as exc:  # record, keep going
                        key = f"{m.name}/{kv}/batch {batch}"
                        result.setdefault("generation_errors", {})[key] = f"{type(exc).__name__}: {exc}"
                        continue
                    gen += [{"measure": m.name, **p} for p in pts]
                    print(f"generated {m.name}/{kv}/batch {batch}", file=sys.stderr)
        result["generation"] = gen
        result["generation_prompts"] = len(gen_prompts)
    else:
        result["generation"] = []
        result["generation_note"] = (
            "generation not run (dx.EarlyExit missing, or --kv given no policies): speed is the implied "
            "L / mean blocks from the offline sweep"
        )
    if args.plots is not None:
        result["plots"] = plot(result, args.plots)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["v1", "v2"], help="v1, v2, HF directories, or tiny")
    p.add_argument("--measures", nargs="*", default=None, help="default: every registered built-in measure")
    p.add_argument("--kv", nargs="*", default=["verify", "propagate", "recompute"])
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-thresholds", type=int, default=96)
    p.add_argument("--target-agreement", type=float, default=0.99)
    p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.97, 0.99, 0.999])
    p.add_argument("--gen-prompts", type=int, default=8)
    p.add_argument(
        "--gen-batches", type=int, nargs="+", default=[1], help="batch sizes of the generation runs (rows exit apart)"
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--fit-tokens", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DATA, help="WikiText-2 directory (valid.txt, test.txt)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plots", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None, help="write the docs tables here")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    out: dict[str, Any] = {"benchmark": "frontier", "models": {}, "unavailable": {}}
    for spec in args.models:
        try:
            out["models"][spec] = run_model(spec, args)
        except SystemExit as exc:
            out["unavailable"][spec] = str(exc)
            print(f"[skip] {spec}: {exc}", file=sys.stderr)
    out["command"] = "python benchmarks/frontier.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = json.dumps(out, indent=2, default=float)
    print(text)
    if args.json is not None:
        from deltaexit.io import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    if args.markdown is not None:
        from deltaexit.io import atomic_write_text

        atomic_write_text(args.markdown, markdown(out, args.target_agreement) + "\n")
    return out


if __name__ == "__main__":
    main()
