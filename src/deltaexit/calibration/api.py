"""``dx.calibrate``: the most aggressive exit threshold whose disagreement with the full model is certified.

Example:
    >>> import deltaexit as dx
    >>> result = dx.calibrate(model, prompts, measure="softmax-max", kv="recompute",
    ...                       delta=0.05, epsilon=0.1)                 # doctest: +SKIP
    >>> result.summary()                                              # doctest: +SKIP
    >>> ee = result.early_exit(model)                                 # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deltaexit.calibration.bounds import min_examples
from deltaexit.calibration.ltt import InsufficientCalibrationData, learn_then_test
from deltaexit.calibration.result import KINDS, CalibrationResult
from deltaexit.calibration.risk import GenerationLosses
from deltaexit.calibration.simulate import (
    LOSSES,
    CalmDecay,
    ExitTable,
    continuation_table,
    greedy_continuations,
)
from deltaexit.measures.base import ConfidenceMeasure, get_measure

__all__ = ["calibrate", "candidate_thresholds", "make_threshold", "quantile_levels"]

BACKENDS = ("generate", "offline")


def quantile_levels(num: int) -> torch.Tensor:
    """``num`` quantile levels in ``[0, 1]``, descending, dense near 1 (where the safe thresholds are).

    Example:
        >>> levels = quantile_levels(8)
        >>> float(levels[0]), float(levels[-1]), bool((levels[:-1] > levels[1:]).all())
        (1.0, 0.0, True)
    """
    if num < 2:
        raise ValueError(f"need at least 2 thresholds, got {num}")
    half = num // 2
    linear = torch.linspace(0.0, 1.0, num - half, dtype=torch.float64)
    tail = 1.0 - torch.logspace(-4, math.log10(0.5), half, dtype=torch.float64)
    return torch.unique(torch.cat([linear, tail])).flip(0)


def _quantile_candidates(
    scores: torch.Tensor, kind: str, levels: torch.Tensor, min_exit_layer: int, tau: float
) -> list[Any]:
    """Candidates at the given quantile levels (descending), the never-exit one first."""
    if kind == "per-layer":
        q = torch.quantile(scores, levels, dim=1)  # [levels, layers]
        prefix = [math.inf] * (min_exit_layer - 1)
        candidates: list[Any] = [prefix + [math.inf] * scores.shape[0]]
        seen = set()
        for row in q.tolist():
            if tuple(row) not in seen:
                seen.add(tuple(row))
                candidates.append(prefix + row)
        return candidates
    flat = scores.reshape(-1)
    if flat.numel() > 1_000_000:  # torch.quantile's input limit; a strided sample is plenty
        flat = flat[:: math.ceil(flat.numel() / 1_000_000)]
    values = torch.unique(torch.quantile(flat, levels)).flip(0)
    if kind == "decaying":  # 0.9 * base + 0.1 * exp(-tau / 2) == quantile at the middle step
        values = (values - 0.1 * math.exp(-tau / 2)) / 0.9
    return [math.inf, *values.tolist()]


def candidate_thresholds(
    table: ExitTable,
    kind: str = "constant",
    num: int = 64,
    *,
    min_exit_layer: int = 1,
    tau: float = 4.0,
    max_steps: int | None = None,
    spacing: str = "compute",
) -> list[Any]:
    """Ordered candidates (safest first) from the measure's scores in ``table``.

    ``"constant"``: quantiles of the pooled scores of the layers that can exit; ``"decaying"``: the
    bases whose schedule passes through those quantiles half-way through decoding;
    ``"per-layer"``: at each quantile level, that level's quantile of each layer's own scores. The
    first candidate never exits. With ``spacing="compute"`` (default) ``num`` candidates are
    picked from a fine quantile grid so that the blocks they save on ``table`` are evenly spaced
    (no coarse jumps where the risk rises); ``"quantile"`` keeps ``num`` quantile levels. Build it on
    examples disjoint from the calibration examples.

    Example:
        >>> grid = candidate_thresholds(table, "per-layer", 32)   # doctest: +SKIP
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if spacing not in ("compute", "quantile"):
        raise ValueError(f"spacing must be 'compute' or 'quantile', got {spacing!r}")
    scores = table.exit_scores(min_exit_layer=min_exit_layer).to(torch.float64)
    if scores.numel() == 0:
        raise ValueError(f"no layer can exit with min_exit_layer={min_exit_layer} in a {table.num_layers}-layer model")
    if spacing == "quantile":
        return _quantile_candidates(scores, kind, quantile_levels(num), min_exit_layer, tau)
    fine = _quantile_candidates(scores, kind, quantile_levels(max(1024, 16 * num)), min_exit_layer, tau)
    steps = max_steps if max_steps is not None else int(table.step.max()) + 1

    def mean_depth(candidate: Any) -> float:
        threshold = make_threshold(kind, candidate, max_steps=steps, tau=tau)
        return float(table.exit_layers(threshold, min_exit_layer=min_exit_layer).to(torch.float64).mean())

    depth = torch.tensor([mean_depth(c) for c in fine])
    saved = torch.cummax(table.num_layers - depth, dim=0).values  # safest first: non-decreasing
    picks: list[int] = [0]
    for target in torch.linspace(0.0, float(saved[-1]), num)[1:]:
        index = int(torch.searchsorted(saved, target, right=True)) - 1
        if index > picks[-1] and saved[index] > saved[picks[-1]]:
            picks.append(index)
    return [fine[i] for i in picks]


def make_threshold(kind: str, value: Any, *, max_steps: int = 64, tau: float = 4.0, for_generate: bool = False) -> Any:
    """The threshold object for candidate ``value``: a float, a per-layer list or CALM's schedule."""
    if kind == "constant":
        return float(value)
    if kind == "per-layer":
        return [float(v) for v in value]
    if kind == "decaying":
        if math.isinf(float(value)):
            return math.inf
        if for_generate:
            from deltaexit.exits import DecayingThreshold

            return DecayingThreshold(float(value), tau=tau, max_steps=max_steps)
        return CalmDecay(float(value), tau=tau, max_steps=max_steps)
    raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")


def _as_prompts(prompts: Any, tokenizer: Any) -> list[torch.Tensor]:
    if prompts is None:
        raise ValueError("pass calibration prompts (a list of token-id tensors, or strings with tokenizer=)")
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError("a tensor of prompts must be [examples, tokens] (unpadded); pass a list otherwise")
        prompts = list(prompts)
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("prompts are strings: pass tokenizer= to turn them into token ids")
            p = tokenizer(p, return_tensors="pt")["input_ids"][0]
        p = torch.as_tensor(p, dtype=torch.long).reshape(-1)
        if p.numel() == 0:
            raise ValueError("a calibration prompt is empty; every prompt needs at least one token")
        out.append(p)
    if not out:
        raise ValueError("no calibration prompts given")
    return out


def _too_few(n: int, needed: int, delta: float, epsilon: float, bound: str, grid: int = 0) -> str:
    extra = (
        f" ({grid} more prompts are set aside to build the threshold grid; pass thresholds= to use all of them)"
        if grid
        else ""
    )
    return (
        f"{n} calibration examples cannot certify delta={delta}, epsilon={epsilon} with the {bound!r} bound: "
        f"even zero disagreement needs at least {needed}{extra}. Pass more calibration prompts, "
        "or raise delta or epsilon."
    )


def calibrate(
    model: nn.Module | None = None,
    prompts: Sequence[Any] | torch.Tensor | None = None,
    *,
    measure: str | ConfidenceMeasure = "softmax-max",
    kv: str = "recompute",
    delta: float = 0.05,
    epsilon: float = 0.1,
    schedule: str = "constant",
    thresholds: Sequence[Any] | None = None,
    num_thresholds: int = 64,
    grid_fraction: float = 0.2,
    loss: str = "textual",
    references: Sequence[Any] | None = None,
    backend: str = "generate",
    max_new_tokens: int = 32,
    min_exit_layer: int = 1,
    tau: float = 4.0,
    bound: str = "hb",
    batch_size: int = 16,
    losses: Callable[[Any], torch.Tensor] | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    test_all: bool = False,
    progress: bool = False,
) -> CalibrationResult:
    """Learn-then-Test calibration of an early-exit threshold for any measure and KV policy.

    Picks the most aggressive candidate threshold such that, with probability at least
    ``1 - epsilon`` over the draw of the calibration prompts, the expected per-prompt loss
    (disagreement of the early-exit continuation with the full model's greedy continuation)
    is at most ``delta``. Candidates are tested in fixed sequence, safest first, with
    Hoeffding–Bentkus p-values; the choice is the last one rejected.

    Args:
        model: The causal LM (not needed with ``losses=``).
        prompts: Calibration prompts: 1-D token-id tensors, or strings with ``tokenizer=``. They
            should be i.i.d. draws from the prompts the guarantee is meant for.
        measure: Registered measure name or a (fitted) measure instance.
        kv: KV policy of the early-exit generation measured (``"verify"`` is lossless: its risk is 0).
        delta: Tolerated expected loss, in (0, 1).
        epsilon: Error level, in (0, 1).
        schedule: ``"constant"`` (one threshold), ``"per-layer"`` (a family of per-layer
            thresholds indexed by one quantile level) or ``"decaying"`` (CALM's schedule over
            decode steps; the calibrated scalar is its base).
        thresholds: Explicit candidates ordered from safest to most aggressive (floats, per-layer
            lists or decaying bases, matching ``schedule``). If not given, they are built from the
            measure's scores on a random ``grid_fraction`` of the prompts, which are then not used
            for the p-values (so the order does not depend on the calibration losses).
        num_thresholds: Size of the built grid.
        grid_fraction: Share of prompts set aside to build the grid.
        loss: ``"textual"`` (share of differing tokens), ``"sequence"`` (any differing token) or
            ``"risk"`` (CALM's risk consistency against ``references``).
        references: One reference continuation (1-D token ids) per prompt, for ``loss="risk"``.
        backend: ``"generate"`` runs :class:`deltaexit.EarlyExit` for each tested candidate;
            ``"offline"`` reads exits off one full forward over prompt + full continuation (exact
            for ``kv="recompute"`` up to the first disagreement; see :mod:`~deltaexit.calibration.simulate`).
        max_new_tokens: Length of the compared continuations.
        min_exit_layer: First 1-based layer a token may exit after.
        tau: Decay temperature of the ``"decaying"`` schedule.
        bound: ``"hb"``, ``"hoeffding"`` or ``"bentkus"``.
        batch_size: Prompts per forward / generate call.
        losses: A custom ``losses(candidate) -> Tensor[n]`` (losses in [0, 1]); then ``thresholds``
            are required and ``model``/``prompts`` are not used.
        tokenizer: Turns string prompts into ids.
        seed: Seed of the grid split.
        test_all: Evaluate every candidate for the record (the choice is unchanged).
        progress: Show progress bars.

    Returns:
        A :class:`CalibrationResult` (``.threshold``, ``.certified``, ``.summary()``, ``.save(dir)``).

    Raises:
        InsufficientCalibrationData: Fewer calibration examples than even a zero empirical risk
            needs for ``(delta, epsilon)``; the message says how many.

    Example:
        >>> import torch
        >>> curve = lambda t: torch.full((400,), max(0.0, 0.5 - t))   # risk falls as t rises
        >>> r = calibrate(losses=curve, thresholds=[1.0, 0.5, 0.48, 0.45, 0.4], delta=0.04, epsilon=0.1)
        >>> r.threshold
        0.48
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    if schedule not in KINDS:
        raise ValueError(f"schedule must be one of {list(KINDS)}, got {schedule!r}")
    needed = min_examples(delta, epsilon, bound)
    measure_name = measure if isinstance(measure, str) else getattr(measure, "name", type(measure).__name__)

    if losses is not None:
        if thresholds is None:
            raise ValueError("with a custom losses= callable, pass the ordered candidates as thresholds=")
        outcome = learn_then_test(
            losses,
            list(thresholds),
            delta=delta,
            epsilon=epsilon,
            bound=bound,
            test_all=test_all,
            progress=progress,
        )
        return _result(outcome, schedule, measure_name, kv, "custom", "custom", needed, min_exit_layer, None, tau, {})

    if model is None:
        raise ValueError("pass the model (or a custom losses= callable with thresholds=)")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if loss == "risk" and references is None:
        raise ValueError("loss='risk' (risk consistency) needs references=: one reference continuation per prompt")
    if isinstance(measure, str):
        measure = get_measure(measure)
    all_prompts = _as_prompts(prompts, tokenizer)
    refs = None
    if references is not None:
        if len(references) != len(all_prompts):
            raise ValueError(f"{len(references)} references for {len(all_prompts)} prompts")
        refs = [torch.as_tensor(r, dtype=torch.long).reshape(-1)[:max_new_tokens] for r in references]

    total = len(all_prompts)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    num_grid = 0
    if thresholds is None:
        if not 0.0 < grid_fraction < 1.0:
            raise ValueError(f"grid_fraction must lie in (0, 1), got {grid_fraction}")
        num_grid = max(1, round(grid_fraction * total))
    cal_ids, grid_ids = order[num_grid:], order[:num_grid]
    if len(cal_ids) < needed:
        raise InsufficientCalibrationData(_too_few(len(cal_ids), needed, delta, epsilon, bound, num_grid))

    if backend == "generate":
        try:
            from deltaexit.generation import EarlyExit  # noqa: F401
        except ImportError:
            raise ImportError(
                "backend='generate' needs dx.EarlyExit (deltaexit.generation), missing in this installation; "
                "use backend='offline' (the exit-table simulator) instead"
            ) from None
    info: dict[str, Any] = {"num_prompts": total, "num_grid_prompts": num_grid}
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name_or_path:
        info["model"] = str(name_or_path)
    if thresholds is None:
        grid_prompts = [all_prompts[i] for i in grid_ids]
        grid_cont = greedy_continuations(model, grid_prompts, max_new_tokens, batch_size=batch_size)
        grid_table = continuation_table(model, grid_prompts, measure, grid_cont, batch_size=batch_size)
        thresholds = candidate_thresholds(
            grid_table,
            schedule,
            num_thresholds,
            min_exit_layer=min_exit_layer,
            tau=tau,
            max_steps=max_new_tokens,
        )
    candidates = list(thresholds)

    cal_prompts = [all_prompts[i] for i in cal_ids]
    cal_refs = None if refs is None else [refs[i] for i in cal_ids]
    fn: Callable[[Any], torch.Tensor]
    if backend == "offline":
        if cal_refs is not None and loss == "risk":
            cont: Any = cal_refs
        else:
            cont = greedy_continuations(model, cal_prompts, max_new_tokens, batch_size=batch_size)
        table = continuation_table(model, cal_prompts, measure, cont, batch_size=batch_size, progress=progress)

        def fn(value: Any) -> torch.Tensor:
            threshold = make_threshold(schedule, value, max_steps=max_new_tokens, tau=tau)
            return table.losses(threshold, loss, min_exit_layer=min_exit_layer)

    else:
        gen = GenerationLosses(
            model, cal_prompts, measure, kv, max_new_tokens=max_new_tokens, loss=loss, references=cal_refs,
            batch_size=batch_size, min_exit_layer=min_exit_layer,
        )  # fmt: skip

        def fn(value: Any) -> torch.Tensor:
            return gen(make_threshold(schedule, value, max_steps=max_new_tokens, tau=tau, for_generate=True))

    outcome = learn_then_test(
        fn, candidates, delta=delta, epsilon=epsilon, bound=bound, test_all=test_all, progress=progress
    )
    return _result(
        outcome, schedule, measure_name, kv, loss, backend,
        needed, min_exit_layer, max_new_tokens, tau, info,
    )  # fmt: skip


def _plain(value: Any) -> Any:
    """A JSON-friendly form of a candidate: float, list of floats, else its repr."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    return repr(value)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _result(outcome, kind, measure, kv, loss, backend, needed, min_exit_layer, max_new_tokens, tau, info):
    chosen = None if outcome.chosen is None else _plain(outcome.chosen)
    if chosen is not None and all(isinstance(v, float) and math.isinf(v) for v in _as_list(chosen)):
        info = {**info, "note": "only the never-exit candidate was certified"}
    return CalibrationResult(
        delta=outcome.delta,
        epsilon=outcome.epsilon,
        n=outcome.n,
        threshold=chosen,
        kind=kind,
        measure=measure,
        kv=kv,
        loss=loss,
        bound=outcome.bound,
        index=outcome.index,
        candidates=[_plain(c) for c in outcome.candidates],
        pvalues=outcome.pvalues,
        risks=outcome.risks,
        min_examples=needed,
        min_exit_layer=min_exit_layer,
        max_new_tokens=max_new_tokens,
        tau=tau,
        backend=backend,
        info=info,
        losses=outcome.losses,
    )
