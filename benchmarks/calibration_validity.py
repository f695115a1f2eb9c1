"""Does the calibrated threshold keep its (delta, epsilon) promise on held-out prompts?

Protocol (deliverable 2 of the calibration issue):

1. Prompts: ``--prompt-tokens`` token windows from WikiText-2 ``test.txt`` paragraphs (held out from
   the reference models' training text), one per paragraph; each example is a prompt plus the
   full model's greedy continuation of ``--max-new-tokens`` tokens.
2. A fixed set of ``--grid-prompts`` prompts builds the ordered candidate thresholds (score
   quantiles), so the order never depends on the calibration losses.
3. The per-example loss of every candidate is computed once for the pool of remaining prompts
   (``--backend offline``: one forward, exits read off every layer, exact for ``kv="recompute"`` up
   to the first disagreement; ``--backend generate``: real ``dx.EarlyExit`` generation).
4. For each of ``--splits`` random splits of the pool into calibration and test halves, Learn-then-
   Test (Hoeffding–Bentkus, fixed sequence) picks a threshold on the calibration half; the
   realised disagreement is its mean loss on the test half. The promise: the realised
   disagreement exceeds delta in at most an epsilon share of the splits, within sampling error.

Prints JSON (also written to ``--json``).

Usage:
    python benchmarks/calibration_validity.py --model v1 --deltas 0.01 0.05 --splits 100 \
        --json docs/results/calibration_validity.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import deltaexit as dx  # noqa: E402
from deltaexit.calibration import (  # noqa: E402
    GenerationLosses,
    candidate_thresholds,
    continuation_table,
    greedy_continuations,
    learn_then_test,
    make_threshold,
    min_examples,
)
from deltaexit.measures.base import ConfidenceMeasure, LayerState, available_measures, get_measure  # noqa: E402
from deltaexit.saturation import saturation_from_topk  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "wikitext-2"


# -- shared helpers (frontier.py imports these) -------------------------------------------------------
class FallbackMaxProb(ConfidenceMeasure):
    """Softmax response, used only when the measure registry has no ``softmax-max`` yet."""

    name: ClassVar[str] = "softmax-max (fallback)"
    needs_lens: ClassVar[bool] = True

    def score(self, state: LayerState) -> torch.Tensor:
        return torch.softmax(state.logits.float(), dim=-1).amax(dim=-1)


class FallbackDeltaNorm(ConfidenceMeasure):
    """``-||delta||``, used only when the registry has no ``delta-norm`` yet."""

    name: ClassVar[str] = "delta-norm (fallback)"
    inputs: ClassVar[tuple[str, ...]] = ("delta",)

    def score(self, state: LayerState) -> torch.Tensor:
        return -state.delta.float().norm(dim=-1)


def fit_measure(measure: Any, model: Any, tokenizer: Any, tokens: int, window: int = 128, data: Path = DATA) -> None:
    """Fit a trainable measure on ``valid.txt`` states with the ``final`` label (decision after block l)."""
    if tokenizer is None:
        raise RuntimeError("no tokenizer: cannot read valid.txt")
    text = (Path(data) / "valid.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text[: tokens * 8], add_special_tokens=False)["input_ids"][:tokens])
    ids = ids[: (ids.numel() // window) * window].reshape(-1, window)
    lens = dx.Lens.from_model(model)
    with torch.no_grad():
        with dx.collect(model, capture=("h_in", "h_out"), positions="all") as trace:
            for start in range(0, ids.shape[0], 16):
                model(input_ids=ids[start : start + 16], use_cache=False)
        h_in, h_out = trace.tokens("h_in"), trace.tokens("h_out")  # [L, N, H]
        num_layers = h_out.shape[0]
        top1 = torch.stack([lens(h_out[i]).argmax(-1) for i in range(num_layers)])
    sat = saturation_from_topk(top1[..., None])
    states = [LayerState(layer=i, h_out=h_out[i], h_in=h_in[i], num_layers=num_layers, lens=lens)
              for i in range(num_layers - 1)]  # fmt: skip
    labels = [sat.saturated[i] for i in range(num_layers - 1)]
    measure.fit(states, labels)  # outside no_grad: the measure trains


def resolve_measure(name: str) -> ConfidenceMeasure:
    """The registered measure ``name``, or a clearly labelled fallback for the two basic ones."""
    if name in available_measures():
        return get_measure(name)
    fallbacks = {"softmax-max": FallbackMaxProb, "delta-norm": FallbackDeltaNorm}
    if name in fallbacks:
        print(
            f"[fallback] measure {name!r} is not registered yet; using {fallbacks[name].name}",
            file=sys.stderr,
        )
        return fallbacks[name]()
    raise KeyError(f"unknown measure {name!r}; registered: {available_measures()}")


def load_model(spec: str) -> tuple[Any, Any, str]:
    """``(model, tokenizer or None, description)`` for ``v1``/``v2`` (embedded references), a directory,
    or ``tiny`` (a random 8-layer Llama of the reference shape; no tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in ("v1", "v2", "v2-12l") or spec.startswith("v"):
        try:
            from deltaexit.reference import load_reference

            model, tok = load_reference(spec)
            return model.eval(), tok, f"reference {spec} (deltaexit.reference)"
        except (ImportError, ValueError) as exc:
            raise SystemExit(
                f"reference model {spec!r} is not available here ({exc}); pass --model DIR or --model tiny"
            ) from exc
    if spec == "tiny":
        from deltaexit.testing import tiny_model

        model = tiny_model("llama", num_layers=8, hidden=64, heads=4, vocab=4096, seed=0, intermediate_size=256)
        return model, None, "random tiny llama (8 layers, hidden 64, vocab 4096) -- no trained weights"
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {spec!r}: not v1/v2/tiny and not a HF model directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
    return model, tok, f"HF directory {path}"


def load_prompts(
    tokenizer: Any,
    vocab: int,
    n: int,
    prompt_tokens: int,
    *,
    split: str = "test.txt",
    seed: int = 0,
    data: Path = DATA,
) -> list[torch.Tensor]:
    """``n`` prompts of ``prompt_tokens`` tokens: the start of distinct WikiText paragraphs
    (random ids when there is no tokenizer)."""
    rng = random.Random(seed)
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (prompt_tokens,), generator=g) for _ in range(n)]
    path = Path(data) / split
    if not path.is_file():
        raise SystemExit(f"no WikiText file at {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if len(ln.split()) >= 2 * prompt_tokens and not ln.startswith("=")]
    rng.shuffle(lines)
    prompts = []
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            prompts.append(torch.tensor(ids[:prompt_tokens], dtype=torch.long))
        if len(prompts) == n:
            break
    if len(prompts) < n:
        raise SystemExit(f"only {len(prompts)} paragraphs with {prompt_tokens} tokens in {path}; ask for fewer")
    return prompts


def loss_matrix(table: Any, candidates: list[Any], kind: str, loss: str, max_new_tokens: int) -> torch.Tensor:
    """``[examples, candidates]`` per-example losses from an exit table."""
    cols = [table.losses(make_threshold(kind, c, max_steps=max_new_tokens), loss) for c in candidates]
    return torch.stack(cols, dim=1)


def pool_losses(
    args: argparse.Namespace,
    model: Any,
    measure: Any,
    pool: list[torch.Tensor],
    cont: torch.Tensor,
    candidates: list[Any],
) -> tuple[torch.Tensor, list[float]]:
    """``([pool, candidates] losses, blocks saved per candidate)`` with the chosen backend."""
    if args.backend == "offline":
        table = continuation_table(model, pool, measure, cont, batch_size=args.batch_size)
        losses = loss_matrix(table, candidates, args.schedule, args.loss, args.max_new_tokens)
        saved = [
            table.summary(make_threshold(args.schedule, c, max_steps=args.max_new_tokens))["blocks_saved"]
            for c in candidates
        ]
        return losses, saved
    saved = []
    gen = GenerationLosses(
        model, pool, measure, args.kv, max_new_tokens=args.max_new_tokens, loss=args.loss,
        batch_size=args.batch_size,
    )  # fmt: skip
    cols = []
    for c in candidates:
        threshold = make_threshold(args.schedule, c, max_steps=args.max_new_tokens)
        col = gen(threshold)
        cols.append(col)
        saved.append(gen.records.get(repr(threshold), {}).get("blocks_saved", 0.0))
        if float(col.mean()) > 3 * max(args.deltas):
            break  # more aggressive candidates are never chosen; pad with ones (worst case)
    saved += [float("nan")] * (len(candidates) - len(cols))
    cols += [torch.ones(len(pool), dtype=torch.float64)] * (len(candidates) - len(cols))
    return torch.stack(cols, dim=1), saved


# -- the check --------------------------------------------------------------------------------------------
def _column(losses: torch.Tensor, rows: torch.Tensor, j: int) -> torch.Tensor:
    return losses[rows, j]


def validity(
    losses: torch.Tensor,
    delta: float,
    epsilon: float,
    splits: int,
    cal_fraction: float,
    seed: int,
    saved: list[float] | None = None,
) -> dict[str, Any]:
    """Random calibration/test splits of the pool: how often does the realised risk exceed delta?"""
    g = torch.Generator().manual_seed(seed)
    pool, _ = losses.shape
    n_cal = round(cal_fraction * pool)
    violations, chosen, realised, cal_risk = 0, [], [], []
    for _ in range(splits):
        perm = torch.randperm(pool, generator=g)
        cal, test = perm[:n_cal], perm[n_cal:]
        out = learn_then_test(partial(_column, losses, cal), range(losses.shape[1]), delta=delta, epsilon=epsilon)
        idx = max(out.index, 0)  # nothing certified -> the never-exit candidate 0 (risk 0)
        risk = float(losses[test, idx].mean())
        violations += risk > delta
        chosen.append(idx)
        realised.append(risk)
        cal_risk.append(out.risks[idx] if out.index >= 0 else 0.0)
    rate = violations / splits
    se = math.sqrt(epsilon * (1 - epsilon) / splits)
    return {
        "delta": delta,
        "epsilon": epsilon,
        "n_calibration": n_cal,
        "n_test": pool - n_cal,
        "min_examples": min_examples(delta, epsilon),
        "splits": splits,
        "violation_rate": rate,
        "binomial_se_at_epsilon": se,
        "promise_kept": rate <= epsilon + 2 * se,
        "mean_realised_risk": sum(realised) / splits,
        "max_realised_risk": max(realised),
        "mean_calibration_risk": sum(cal_risk) / splits,
        "chosen_index_mean": sum(chosen) / splits,
        "chosen_index_range": [min(chosen), max(chosen)],
        "never_exit_share": sum(c == 0 for c in chosen) / splits,
        "mean_blocks_saved_at_chosen": None if saved is None else sum(saved[c] for c in chosen) / splits,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="v1", help="v1, v2, a HF directory, or tiny (random)")
    p.add_argument("--measure", default="softmax-max")
    p.add_argument("--schedule", default="constant", choices=["constant", "per-layer", "decaying"])
    p.add_argument("--loss", default="textual", choices=["textual", "sequence"])
    p.add_argument("--backend", default="offline", choices=["offline", "generate"])
    p.add_argument("--kv", default="recompute", choices=["recompute", "propagate", "verify"])
    p.add_argument("--deltas", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--splits", type=int, default=100)
    p.add_argument("--pool", type=int, default=1000, help="held-out prompts split into calibration/test")
    p.add_argument("--cal-fraction", type=float, default=0.5)
    p.add_argument("--grid-prompts", type=int, default=100)
    p.add_argument("--num-thresholds", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-tokens", type=int, default=16384, help="valid.txt tokens a trainable measure is fitted on")
    p.add_argument("--data", type=Path, default=DATA, help="WikiText-2 directory (test.txt)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    model, tok, described = load_model(args.model)
    measure = resolve_measure(args.measure)
    if getattr(measure, "requires_fit", False):
        fit_measure(measure, model, tok, args.fit_tokens, data=args.data)
    vocab = dx.Lens.from_model(model).vocab_size
    prompts = load_prompts(
        tok, vocab, args.grid_prompts + args.pool, args.prompt_tokens, seed=args.seed, data=args.data
    )
    grid_prompts, pool = prompts[: args.grid_prompts], prompts[args.grid_prompts :]
    cont = greedy_continuations(model, prompts, args.max_new_tokens, batch_size=args.batch_size)
    grid_table = continuation_table(model, grid_prompts, measure, cont[: args.grid_prompts], batch_size=args.batch_size)
    candidates = candidate_thresholds(grid_table, args.schedule, args.num_thresholds, max_steps=args.max_new_tokens)
    losses, saved = pool_losses(args, model, measure, pool, cont[args.grid_prompts :], candidates)
    results = [
        validity(losses, d, args.epsilon, args.splits, args.cal_fraction, args.seed + 1, saved) for d in args.deltas
    ]
    out = {
        "benchmark": "calibration_validity",
        "model": described,
        "measure": measure.name,
        "schedule": args.schedule,
        "loss": args.loss,
        "backend": args.backend,
        "kv": args.kv if args.backend == "generate" else f"{args.kv} (offline simulation)",
        "prompt_tokens": args.prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "pool": len(pool),
        "grid_prompts": len(grid_prompts),
        "num_candidates": len(candidates),
        "pool_risk_by_candidate": [round(float(v), 6) for v in losses.mean(0)],
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/calibration_validity.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json is not None:
        from deltaexit.io import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return out


if __name__ == "__main__":
    main()
