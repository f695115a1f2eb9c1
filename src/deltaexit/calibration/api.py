"""``dx.calibrate``: the most aggressive exit threshold whose disagreement with the full model is certified.

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> prompts = [torch.randint(0, 64, (4,), generator=torch.Generator().manual_seed(i)) for i in range(20)]
    >>> result = calibrate(model, prompts, measure="softmax-max", kv="recompute", backend="offline",
    ...                    delta=0.3, epsilon=0.3, max_new_tokens=4, progress=False)
    >>> result.n, result.certified                    # 4 of the 20 prompts built the threshold grid
    (16, True)
    >>> ee = result.early_exit(model)                 # EarlyExit with the certified threshold
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from deltaexit.calibration.bounds import BOUNDS, min_examples
from deltaexit.calibration.losses import check_loss
from deltaexit.calibration.ltt import InsufficientCalibrationData, LTTOutcome, learn_then_test
from deltaexit.calibration.result import KINDS, CalibrationResult
from deltaexit.calibration.risk import GenerationLosses
from deltaexit.calibration.simulate import ExitTable, continuation_table
from deltaexit.exits import DecayingThreshold
from deltaexit.measures.base import ConfidenceMeasure, get_measure
from deltaexit.prompts import as_prompts, greedy_continuations

__all__ = [
    "BACKENDS",
    "CalibrationConfig",
    "calibrate",
    "candidate_thresholds",
    "make_threshold",
    "prompts_needed",
    "quantile_levels",
]

#: Where the losses come from: real early-exit generation, or the offline exit-table simulator.
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
        >>> from deltaexit.calibration.simulate import exit_table
        >>> from deltaexit.testing import tiny_model
        >>> table = exit_table(tiny_model("llama"), torch.randint(0, 64, (4, 12)), measure="softmax-max")
        >>> grid = candidate_thresholds(table, "per-layer", 8)
        >>> grid[0]                                    # the safest candidate never exits
        [inf, inf]
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
    """The threshold object for candidate ``value``: a float, a per-layer list or CALM's schedule.

    The simulator and generation take the same objects; ``for_generate`` is kept for compatibility
    and changes nothing.

    Example:
        >>> make_threshold("decaying", 0.8, max_steps=16).values(0, 2)[0] == 0.9 * 0.8 + 0.1
        True
    """
    del for_generate  # one schedule for the simulator and generation
    if kind == "constant":
        return float(value)
    if kind == "per-layer":
        return [float(v) for v in value]
    if kind == "decaying":
        if math.isinf(float(value)):
            return math.inf
        return DecayingThreshold(float(value), tau=tau, max_steps=max_steps)
    raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")


@dataclass
class CalibrationConfig:
    """The settings of :func:`calibrate` (every keyword of ``calibrate`` but the data overrides one).

    Attributes:
        measure: Registered measure name or a (fitted) measure instance.
        kv: KV policy of the early-exit generation measured: a name (``"verify"``, ``"propagate"``,
            ``"recompute"``) or a policy object, passed to ``EarlyExit`` as given (``"verify"`` is
            lossless: its risk is 0).
        delta: Tolerated expected loss, in (0, 1).
        epsilon: Error level, in (0, 1).
        schedule: ``"constant"`` (one threshold), ``"per-layer"`` (a family of per-layer
            thresholds indexed by one quantile level) or ``"decaying"`` (CALM's schedule over
            decode steps; the calibrated scalar is its base).
        num_thresholds: Size of the built candidate grid.
        grid_fraction: Share of prompts set aside to build the grid (unless ``thresholds=`` is given).
        loss: ``"textual"`` (share of differing tokens), ``"sequence"`` (any differing token) or
            ``"risk"`` (CALM's risk consistency against ``references``).
        backend: ``"generate"`` runs ``EarlyExit`` for each tested candidate; ``"offline"`` reads
            exits off one full forward over prompt + full continuation (exact for ``kv="recompute"``
            up to the first disagreement; see :mod:`~deltaexit.calibration.simulate`).
        max_new_tokens: Length of the compared continuations.
        min_exit_layer: First 1-based layer a token may exit after.
        tau: Decay temperature of the ``"decaying"`` schedule.
        bound: ``"hb"``, ``"hoeffding"`` or ``"bentkus"``.
        batch_size: Prompts per forward / generate call.
        seed: Seed of the grid split.
        test_all: Evaluate every candidate for the record (the choice is unchanged).
        progress: Show tqdm progress bars (on by default: a calibration runs for minutes).

    Example:
        >>> CalibrationConfig(delta=0.01).with_settings(epsilon=0.05).epsilon
        0.05
    """

    measure: str | ConfidenceMeasure = "softmax-max"
    kv: Any = "recompute"
    delta: float = 0.05
    epsilon: float = 0.1
    schedule: str = "constant"
    num_thresholds: int = 64
    grid_fraction: float = 0.2
    loss: str = "textual"
    backend: str = "generate"
    max_new_tokens: int = 32
    min_exit_layer: int = 1
    tau: float = 4.0
    bound: str = "hb"
    batch_size: int = 16
    seed: int = 0
    test_all: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must lie in (0, 1), got {self.epsilon}")
        if self.schedule not in KINDS:
            raise ValueError(f"schedule must be one of {list(KINDS)}, got {self.schedule!r}")
        if self.bound not in BOUNDS:
            raise ValueError(f"unknown bound {self.bound!r}; choose one of {list(BOUNDS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        check_loss(self.loss)

    def with_settings(self, **settings: Any) -> CalibrationConfig:
        """A copy with ``settings`` replaced; an unknown name raises a TypeError listing the known ones."""
        known = [f.name for f in fields(self)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise TypeError(f"unknown calibration setting(s) {unknown}; CalibrationConfig has {known}")
        return replace(self, **settings)

    @property
    def measure_name(self) -> str:
        """The measure's name (a registered name, or the instance's ``name``)."""
        m = self.measure
        return m if isinstance(m, str) else getattr(m, "name", type(m).__name__)

    def threshold(self, value: Any) -> Any:
        """The threshold object of candidate ``value`` under this schedule (see :func:`make_threshold`)."""
        return make_threshold(self.schedule, value, max_steps=self.max_new_tokens, tau=self.tau)


def prompts_needed(examples: int, grid_fraction: float) -> int:
    """Fewest prompts that leave ``examples`` calibration examples once the grid share is set aside.

    Example:
        >>> prompts_needed(45, 0.2)       # 56 prompts: 11 build the grid, 45 remain
        56
    """
    if not 0.0 < grid_fraction < 1.0:
        raise ValueError(f"grid_fraction must lie in (0, 1), got {grid_fraction}")
    total = examples + 1
    while total - max(1, round(grid_fraction * total)) < examples:
        total += 1
    return total


def _too_few(n: int, needed: int, config: CalibrationConfig, grid: int = 0) -> str:
    if grid:
        extra = (
            f" ({grid} more prompts are set aside to build the threshold grid: with "
            f"grid_fraction={config.grid_fraction} set aside, pass at least "
            f"{prompts_needed(needed, config.grid_fraction)} prompts, or pass thresholds= to use all of them)"
        )
    else:
        extra = f" (pass at least {needed} prompts)"
    return (
        f"{n} calibration examples cannot certify delta={config.delta}, epsilon={config.epsilon} with the "
        f"{config.bound!r} bound: even zero disagreement needs at least {needed} calibration examples{extra}. "
        "Pass more calibration prompts, or raise delta or epsilon."
    )


def calibrate(
    model: nn.Module | None = None,
    prompts: Sequence[Any] | torch.Tensor | None = None,
    *,
    config: CalibrationConfig | None = None,
    thresholds: Sequence[Any] | None = None,
    references: Sequence[Any] | None = None,
    losses: Callable[[Any], torch.Tensor] | None = None,
    tokenizer: Any = None,
    table: ExitTable | None = None,
    shards: str | os.PathLike[str] | None = None,
    **settings: Any,
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
        config: The settings (:class:`CalibrationConfig`; default: its defaults).
        thresholds: Explicit candidates ordered from safest to most aggressive (floats, per-layer
            lists or decaying bases, matching ``schedule``). If not given, they are built from the
            measure's scores on a random ``grid_fraction`` of the prompts, which are then not used
            for the p-values (so the order does not depend on the calibration losses).
        references: One reference continuation (1-D token ids) per prompt, for ``loss="risk"``.
        losses: A custom ``losses(candidate) -> Tensor[n]`` (losses in [0, 1]); then ``thresholds``
            are required and ``model``/``prompts`` are not used.
        tokenizer: Turns string prompts into ids.
        table: An :class:`~deltaexit.calibration.ExitTable` to read the losses off (one example per row, e.g.
            :func:`~deltaexit.calibration.exit_table` over text windows); no model runs. The grid examples are
            set aside as for prompts; ``kv`` is recorded, the losses are the offline simulator's.
        shards: A collection (``collect_to_disk`` / ``deltaexit collect`` directory) with ``lens_topk`` over every
            block and what the measure reads: each window is an example, read shard by shard
            (:mod:`~deltaexit.calibration.stream`); equal to ``table=shard_exit_table(shards, measure)`` without
            holding the table. Pass ``model`` too for measures that read the lens beyond the stored top-k (it is
            checked against the collection).
        **settings: Any :class:`CalibrationConfig` field (``measure=``, ``kv=``, ``delta=``,
            ``epsilon=``, ``schedule=``, ``backend=``, ``progress=``, ...); overrides ``config``.

    Returns:
        A :class:`CalibrationResult` (``.threshold``, ``.certified``, ``.summary()``, ``.save(dir)``).

    Raises:
        InsufficientCalibrationData: Fewer calibration examples than even a zero empirical risk
            needs for ``(delta, epsilon)``, raised before the model runs; the message says how many
            examples and how many prompts are needed.

    Example:
        >>> import torch
        >>> curve = lambda t: torch.full((400,), max(0.0, 0.5 - t))   # risk falls as t rises
        >>> r = calibrate(losses=curve, thresholds=[1.0, 0.5, 0.48, 0.45, 0.4], delta=0.04, epsilon=0.1,
        ...               progress=False)
        >>> r.threshold
        0.48
    """
    cfg = (config if config is not None else CalibrationConfig()).with_settings(**settings)
    needed = min_examples(cfg.delta, cfg.epsilon, cfg.bound)
    if losses is not None:
        if thresholds is None:
            raise ValueError("with a custom losses= callable, pass the ordered candidates as thresholds=")
        outcome = _test(losses, thresholds, cfg)
        return _result(outcome, cfg, needed, loss="custom", backend="custom", max_new_tokens=None, info={})
    if table is not None or shards is not None:
        if table is not None and shards is not None:
            raise ValueError("pass table= or shards=, not both")
        if prompts is not None or references is not None:
            raise ValueError("table= and shards= bring their own examples (and next tokens): drop prompts/references")
        check_loss(cfg.loss, table is None or table.reference is not None)  # a collection has the next tokens
        if shards is not None:
            return _calibrate_shards(shards, model, cfg, thresholds, needed)
        assert table is not None
        return _calibrate_table(table, cfg, thresholds, needed)
    if model is None:
        raise ValueError("pass the model (or a custom losses= callable with thresholds=)")
    return _calibrate_model(model, prompts, cfg, thresholds, references, tokenizer, needed)


def _test(losses: Callable[[Any], torch.Tensor], candidates: Sequence[Any], cfg: CalibrationConfig) -> LTTOutcome:
    return learn_then_test(
        losses, list(candidates), delta=cfg.delta, epsilon=cfg.epsilon, bound=cfg.bound,
        test_all=cfg.test_all, progress=cfg.progress,
    )  # fmt: skip


def _split(total: int, cfg: CalibrationConfig, needed: int, build_grid: bool) -> tuple[list[int], list[int]]:
    """``(calibration, grid)`` prompt indices (a seeded split); raises when too few remain."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    num_grid = 0
    if build_grid:
        if not 0.0 < cfg.grid_fraction < 1.0:
            raise ValueError(f"grid_fraction must lie in (0, 1), got {cfg.grid_fraction}")
        num_grid = max(1, round(cfg.grid_fraction * total))
    cal_ids, grid_ids = order[num_grid:], order[:num_grid]
    if len(cal_ids) < needed:
        raise InsufficientCalibrationData(_too_few(len(cal_ids), needed, cfg, num_grid))
    return cal_ids, grid_ids


def _calibrate_model(
    model: nn.Module,
    prompts: Any,
    cfg: CalibrationConfig,
    thresholds: Sequence[Any] | None,
    references: Sequence[Any] | None,
    tokenizer: Any,
    needed: int,
) -> CalibrationResult:
    """The model flow: split the prompts, build the grid if needed, measure the losses, test."""
    check_loss(cfg.loss, references is not None)
    measure = get_measure(cfg.measure) if isinstance(cfg.measure, str) else cfg.measure
    all_prompts = as_prompts(prompts, tokenizer)
    refs = None
    if references is not None:
        if len(references) != len(all_prompts):
            raise ValueError(f"{len(references)} references for {len(all_prompts)} prompts")
        refs = [torch.as_tensor(r, dtype=torch.long).reshape(-1)[: cfg.max_new_tokens] for r in references]
    cal_ids, grid_ids = _split(len(all_prompts), cfg, needed, build_grid=thresholds is None)
    info: dict[str, Any] = {"num_prompts": len(all_prompts), "num_grid_prompts": len(grid_ids)}
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name_or_path:
        info["model"] = str(name_or_path)
    if thresholds is None:
        thresholds = _grid(model, [all_prompts[i] for i in grid_ids], measure, cfg)
    cal_prompts = [all_prompts[i] for i in cal_ids]
    cal_refs = None if refs is None else [refs[i] for i in cal_ids]
    measured = _offline_losses if cfg.backend == "offline" else _generation_losses
    outcome = _test(measured(model, cal_prompts, cal_refs, measure, cfg), thresholds, cfg)
    return _result(
        outcome, cfg, needed, loss=cfg.loss, backend=cfg.backend, max_new_tokens=cfg.max_new_tokens, info=info
    )


def _grid_of(table: ExitTable, cfg: CalibrationConfig) -> list[Any]:
    return candidate_thresholds(
        table, cfg.schedule, cfg.num_thresholds, min_exit_layer=cfg.min_exit_layer, tau=cfg.tau,
        max_steps=cfg.max_new_tokens,
    )  # fmt: skip


def _calibrate_table(
    table: ExitTable, cfg: CalibrationConfig, thresholds: Sequence[Any] | None, needed: int
) -> CalibrationResult:
    """The exit-table flow: split the examples, build the grid on its share if needed, read the losses off."""
    cal_ids, grid_ids = _split(table.num_examples, cfg, needed, build_grid=thresholds is None)
    if thresholds is None:
        thresholds = _grid_of(table.subset(grid_ids), cfg)
    cal = table.subset(cal_ids)

    def losses(value: Any) -> torch.Tensor:
        return cal.losses(cfg.threshold(value), cfg.loss, min_exit_layer=cfg.min_exit_layer)

    info = {"num_examples": table.num_examples, "num_grid_examples": len(grid_ids)}
    return _result(_test(losses, thresholds, cfg), cfg, needed, loss=cfg.loss, backend="table",
                   max_new_tokens=cfg.max_new_tokens, info=info)  # fmt: skip


def _calibrate_shards(
    shards: str | os.PathLike[str], model: nn.Module | None, cfg: CalibrationConfig,
    thresholds: Sequence[Any] | None, needed: int,
) -> CalibrationResult:  # fmt: skip
    """The collection flow: as :func:`_calibrate_table` on the collection's windows, one pass for all losses."""
    from deltaexit.calibration.stream import open_collection, shard_exit_table, shard_losses, shard_windows

    manifest, measure, _ = open_collection(shards, cfg.measure, model)  # every check before any shard is read
    windows = shard_windows(manifest)
    cal_ids, grid_ids = _split(int(windows.numel()), cfg, needed, build_grid=thresholds is None)
    if thresholds is None:
        thresholds = _grid_of(shard_exit_table(manifest, measure, model=model, windows=windows[grid_ids]), cfg)
    candidates = list(thresholds)
    matrix = shard_losses(manifest, measure, [cfg.threshold(c) for c in candidates], loss=cfg.loss,
                          min_exit_layer=cfg.min_exit_layer, model=model, windows=windows[cal_ids])  # fmt: skip
    rows = {id(c): i for i, c in enumerate(candidates)}

    def losses(value: Any) -> torch.Tensor:
        return matrix[rows[id(value)] if id(value) in rows else candidates.index(value)]

    info = {"shards": str(manifest.root), "num_examples": int(windows.numel()), "num_grid_examples": len(grid_ids)}
    return _result(_test(losses, candidates, cfg), cfg, needed, loss=cfg.loss, backend="shards",
                   max_new_tokens=cfg.max_new_tokens, info=info)  # fmt: skip


def _grid(
    model: nn.Module, prompts: list[torch.Tensor], measure: ConfidenceMeasure, cfg: CalibrationConfig
) -> list[Any]:
    """Candidates from the measure's scores on the grid prompts (prompt + full greedy continuation)."""
    cont = greedy_continuations(model, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size)
    table = continuation_table(model, prompts, measure, cont, batch_size=cfg.batch_size)
    return candidate_thresholds(
        table, cfg.schedule, cfg.num_thresholds, min_exit_layer=cfg.min_exit_layer, tau=cfg.tau,
        max_steps=cfg.max_new_tokens,
    )  # fmt: skip


def _offline_losses(
    model: nn.Module,
    prompts: list[torch.Tensor],
    references: list[torch.Tensor] | None,
    measure: ConfidenceMeasure,
    cfg: CalibrationConfig,
) -> Callable[[Any], torch.Tensor]:
    """``losses(candidate)`` read off one exit table over prompt + continuation."""
    if references is not None and cfg.loss == "risk":
        cont: Any = references
    else:
        cont = greedy_continuations(model, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size)
    table = continuation_table(model, prompts, measure, cont, batch_size=cfg.batch_size, progress=cfg.progress)

    def losses(value: Any) -> torch.Tensor:
        return table.losses(cfg.threshold(value), cfg.loss, min_exit_layer=cfg.min_exit_layer)

    return losses


def _generation_losses(
    model: nn.Module,
    prompts: list[torch.Tensor],
    references: list[torch.Tensor] | None,
    measure: ConfidenceMeasure,
    cfg: CalibrationConfig,
) -> Callable[[Any], torch.Tensor]:
    """``losses(candidate)`` from real early-exit generation with ``cfg.kv``."""
    gen = GenerationLosses(
        model, prompts, measure, cfg.kv, max_new_tokens=cfg.max_new_tokens, loss=cfg.loss, references=references,
        batch_size=cfg.batch_size, min_exit_layer=cfg.min_exit_layer,
    )  # fmt: skip

    def losses(value: Any) -> torch.Tensor:
        return gen(cfg.threshold(value))

    return losses


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


def _result(
    outcome: LTTOutcome,
    cfg: CalibrationConfig,
    needed: int,
    *,
    loss: str,
    backend: str,
    max_new_tokens: int | None,
    info: dict[str, Any],
) -> CalibrationResult:
    chosen = None if outcome.chosen is None else _plain(outcome.chosen)
    if chosen is not None and all(isinstance(v, float) and math.isinf(v) for v in _as_list(chosen)):
        info = {**info, "note": "only the never-exit candidate was certified"}
    return CalibrationResult(
        delta=outcome.delta,
        epsilon=outcome.epsilon,
        n=outcome.n,
        threshold=chosen,
        kind=cfg.schedule,
        measure=cfg.measure_name,
        kv=cfg.kv,
        loss=loss,
        bound=outcome.bound,
        index=outcome.index,
        candidates=[_plain(c) for c in outcome.candidates],
        pvalues=outcome.pvalues,
        risks=outcome.risks,
        min_examples=needed,
        min_exit_layer=cfg.min_exit_layer,
        max_new_tokens=max_new_tokens,
        tau=cfg.tau,
        backend=backend,
        info=info,
        losses=outcome.losses,
    )
