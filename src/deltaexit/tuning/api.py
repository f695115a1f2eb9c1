"""``dx.tune``: the fastest early-exit setting on this machine that meets a disagreement tolerance.

The search (successive halving): every candidate of the grid (:mod:`deltaexit.tuning.grid`) is timed once,
alternated with ``model.generate``, on the first ``screen_prompts`` prompts; the ``keep`` fastest that meet the
tolerance are re-timed, interleaved, ``repeats`` times on the ``timing_prompts`` (:mod:`deltaexit.tuning.timing`).
The choice is the highest median ratio above 1.0; if none is above 1.0, plain ``model.generate`` is the choice.

* ``tolerance=0``: lossless ``verify`` only (fixed exit layers with ``threshold=-inf`` and thresholded drafts);
  a candidate whose output is not identical to ``model.generate``'s on the timed prompts is rejected.
* ``tolerance > 0``: also ``recompute`` (and any pair in ``calibrated``) at the Learn-then-Test threshold of
  :func:`deltaexit.calibration.calibrate` for ``delta=tolerance``, and ``tolerant`` self-speculation at the
  Learn-then-Test ratio of :func:`deltaexit.calibration.tolerant.calibrate_tolerant` for each of
  ``tolerant_exit_layers``; their realised disagreement on the timed prompts is reported.

Every input is checked before anything is timed.

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=4)
    >>> prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    >>> result = tune(model, prompts, max_new_tokens=4, exit_layers=(1,), draft_settings=({"num_draft": 2},),
    ...               verify_thresholds=(), repeats=1, progress=False)
    >>> [r.name for r in result.results]
    ['model.generate (no early exit)', 'verify E=1 num_draft=2']
    >>> result.realised_disagreement
    0.0
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deltaexit.aliases import CONTEXT_LENGTH_ATTRS
from deltaexit.calibration.api import calibrate, prompts_needed
from deltaexit.calibration.bounds import min_examples
from deltaexit.calibration.ltt import InsufficientCalibrationData
from deltaexit.calibration.tolerant import calibrate_tolerant, tolerance_table
from deltaexit.prompts import as_prompts
from deltaexit.structure import config_int, find_structure
from deltaexit.tuning.grid import Candidate, TuneConfig, calibrated_candidate, lossless_grid, tolerant_candidates
from deltaexit.tuning.result import CandidateResult, TuneResult
from deltaexit.tuning.timing import PromptRuns, Timing

__all__ = ["check_prompts", "prompts_required", "tune"]

#: Fine-round repeats kept even when the budget is spent.
MIN_REPEATS = 3


def prompts_required(config: TuneConfig) -> int:
    """Fewest prompts :func:`tune` takes for ``config.tolerance``: 1 for lossless tuning, else Learn-then-Test's
    minimum for ``(tolerance, epsilon)`` under ``bound`` plus the prompts that build the threshold grid.

    Example:
        >>> prompts_required(TuneConfig()), prompts_required(TuneConfig(tolerance=0.05))
        (1, 56)
    """
    if config.tolerance == 0:
        return 1
    return prompts_needed(min_examples(config.tolerance, config.epsilon, config.bound), config.grid_fraction)


def check_prompts(model: nn.Module, prompts: Any, tokenizer: Any, config: TuneConfig) -> list[torch.Tensor]:
    """The prompts as 1-D token-id tensors; raises ``ValueError`` for any the tuner cannot use.

    Raises:
        ValueError: No prompts, an empty prompt, strings without a tokenizer, or a prompt that with
            ``max_new_tokens`` does not fit the model's context.
        InsufficientCalibrationData: Fewer prompts than :func:`prompts_required` (the message says how many).
    """
    needed = prompts_required(config)
    if prompts is None or (not isinstance(prompts, torch.Tensor) and len(prompts) == 0):
        raise ValueError(
            f"no calibration prompts given: pass a list of at least {needed} prompts (token-id tensors, or strings "
            "with tokenizer=), e.g. deltaexit.samples.sample_prompts()"
        )
    out = as_prompts(prompts, tokenizer)
    if len(out) < needed:
        learn = min_examples(config.tolerance, config.epsilon, config.bound)
        raise InsufficientCalibrationData(
            f"tolerance={config.tolerance} needs at least {needed} calibration prompts, got {len(out)}: "
            f"Learn-then-Test ({config.bound!r} bound, epsilon={config.epsilon}) needs {learn} calibration examples "
            f"(one per prompt) even at zero disagreement, and {needed - learn} more build the threshold grid. "
            "Pass more prompts, raise the tolerance or epsilon, or use tolerance=0 (lossless verify, any number of "
            "prompts)."
        )
    context = config_int(find_structure(model, validate=False).text_config, CONTEXT_LENGTH_ATTRS)
    if context is not None:
        for i, p in enumerate(out):
            if p.numel() + config.max_new_tokens > context:
                raise ValueError(
                    f"prompt {i} has {p.numel()} tokens: with max_new_tokens={config.max_new_tokens} it exceeds the "
                    f"model's context of {context} tokens; shorten it or lower max_new_tokens"
                )
    return out


def tune(
    model: nn.Module,
    prompts: Sequence[Any] | torch.Tensor,
    tolerance: float | None = None,
    *,
    tokenizer: Any = None,
    config: TuneConfig | None = None,
    timer: Callable[[], float] = time.perf_counter,
    **settings: Any,
) -> TuneResult:
    """Time early-exit settings against ``model.generate`` on this machine and return the fastest that meets
    ``tolerance``.

    Args:
        model: The causal LM (eval mode), on the device it will run on.
        prompts: Calibration prompts: 1-D token-id tensors, or strings with ``tokenizer=``; the first
            ``timing_prompts`` are timed, all are used by the calibration when ``tolerance > 0``.
        tolerance: Tolerated share of new tokens that differ from ``model.generate``'s greedy output, in [0, 1)
            (default: ``config.tolerance``, 0: identical output).
        tokenizer: Turns string prompts into ids.
        config: The search settings (:class:`~deltaexit.tuning.grid.TuneConfig`).
        timer: The clock (seconds); nothing calls it before every input has been checked.
        **settings: Any :class:`~deltaexit.tuning.grid.TuneConfig` field (``max_new_tokens=``, ``budget_s=``,
            ``max_candidates=``, ``repeats=``, ``progress=``, ...); overrides ``config``.

    Returns:
        A :class:`~deltaexit.tuning.result.TuneResult`: ``.chosen`` (None: ``model.generate`` was fastest),
        ``.early_exit(model)``, ``.table()``, ``.save(path)``.
    """
    cfg = config if config is not None else TuneConfig()
    cfg = cfg.with_settings(**settings, **({} if tolerance is None else {"tolerance": tolerance}))
    structure = find_structure(model)
    cfg.check(structure.num_layers)
    all_prompts = check_prompts(model, prompts, tokenizer, cfg)
    calibration, calibrated = _calibrated(model, all_prompts, cfg)
    grid = calibrated + lossless_grid(cfg, structure.num_layers)  # calibrated first: max_candidates keeps them
    if cfg.max_candidates is not None:
        grid = grid[: cfg.max_candidates]
    runs = PromptRuns(model, all_prompts[: cfg.timing_prompts], cfg.max_new_tokens, timer)
    started = timer()
    results = _search(runs, model, grid, cfg, structure.num_layers)
    chosen = _choose(results)
    info = {
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        "num_layers": structure.num_layers,
        "num_prompts": len(all_prompts),
        "timing_prompts": len(runs.inputs),
        "screen_prompts": min(cfg.screen_prompts, len(runs.inputs)),
        "max_new_tokens": cfg.max_new_tokens,
        "threads": torch.get_num_threads(),
        "timing_s": timer() - started,
        "training_free_only": True,
    }
    return TuneResult(cfg.tolerance, chosen, results, calibration, info)


def _calibrated(
    model: nn.Module, prompts: list[torch.Tensor], cfg: TuneConfig
) -> tuple[list[dict[str, Any]], list[Candidate]]:
    """Learn-then-Test thresholds for each ``(measure, kv)`` in ``cfg.calibrated`` (none when lossless)."""
    records: list[dict[str, Any]] = []
    candidates: list[Candidate] = []
    if cfg.tolerance == 0:
        return records, candidates
    for measure, kv in cfg.calibrated:
        backend = "offline" if kv == "recompute" else "generate"  # the simulator is exact for recompute only
        res = calibrate(
            model, prompts, measure=measure, kv=kv, delta=float(cfg.tolerance), epsilon=cfg.epsilon, bound=cfg.bound,
            grid_fraction=cfg.grid_fraction, num_thresholds=cfg.num_thresholds, max_new_tokens=cfg.max_new_tokens,
            min_exit_layer=cfg.calibrated_min_exit_layer, backend=backend, progress=cfg.progress,
        )  # fmt: skip
        threshold = res.schedule()
        usable = res.certified and not (isinstance(threshold, float) and math.isinf(threshold))
        records.append(
            {
                "measure": measure, "kv": kv, "backend": backend, "threshold": res.threshold,
                "certified": res.certified, "usable": usable, "empirical_risk": res.empirical_risk, "n": res.n,
                "min_examples": res.min_examples, "delta": res.delta, "epsilon": res.epsilon, "summary": res.summary(),
            }
        )  # fmt: skip
        if usable:
            candidates += [calibrated_candidate(measure, kv, threshold, cfg, opts) for opts in cfg.exit_options]
    tolerant_records, tolerant = _tolerant(model, prompts, cfg)
    return records + tolerant_records, candidates + tolerant


def _tolerant(
    model: nn.Module, prompts: list[torch.Tensor], cfg: TuneConfig
) -> tuple[list[dict[str, Any]], list[Candidate]]:
    """Learn-then-Test ratios of ``kv="tolerant"`` at each of ``cfg.tolerant_exit_layers`` (one table, all prompts)."""
    records: list[dict[str, Any]] = []
    candidates: list[Candidate] = []
    if not cfg.tolerant_exit_layers:
        return records, candidates
    table = tolerance_table(model, prompts, max_new_tokens=cfg.max_new_tokens, progress=cfg.progress)
    for exit_layer in cfg.tolerant_exit_layers:
        res = calibrate_tolerant(
            table, delta=float(cfg.tolerance), epsilon=cfg.epsilon, exit_layers=(exit_layer,), bound=cfg.bound,
            progress=cfg.progress,
        )  # fmt: skip
        usable = res.certified and res.threshold is not None and float(res.threshold) < 1.0
        records.append(
            {
                "measure": "delta-norm", "kv": "tolerant", "backend": res.backend, "exit_layer": exit_layer,
                "threshold": res.threshold, "parameter": "ratio", "certified": res.certified, "usable": usable,
                "empirical_risk": res.empirical_risk, "n": res.n, "min_examples": res.min_examples,
                "delta": res.delta, "epsilon": res.epsilon, "summary": res.summary(),
                "ratios": res.candidates, "risks": res.risks, "pvalues": res.pvalues,
            }
        )  # fmt: skip
        if usable:
            candidates += tolerant_candidates(float(res.threshold), exit_layer, cfg)
    return records, candidates


def _row(candidate: Candidate, stage: str, timing: Timing, cfg: TuneConfig) -> CandidateResult:
    """The figures of a timing; a lossless candidate whose output differs is rejected."""
    row = CandidateResult(
        candidate, stage, list(timing.ratios), timing.agreement, timing.identical, timing.mean_exit_layer
    )
    if candidate.lossless and not timing.identical:
        row.stage, row.note = "rejected", "output differs from model.generate (verify must be lossless: a bug)"
    elif not candidate.lossless and 1.0 - timing.agreement > cfg.tolerance:
        row.stage = "rejected"
        row.note = f"realised disagreement {1.0 - timing.agreement:.4f} above the tolerance on the timed prompts"
    return row


def _progress(items: list[Any], cfg: TuneConfig, desc: str) -> Any:
    if not cfg.progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="candidate")


def _spent(runs: PromptRuns, started: float, cfg: TuneConfig) -> bool:
    return cfg.budget_s is not None and runs.timer() - started > cfg.budget_s


def _search(
    runs: PromptRuns, model: nn.Module, grid: list[Candidate], cfg: TuneConfig, num_layers: int
) -> list[CandidateResult]:
    """The coarse round (each candidate once on the screen prompts), then the fine round on the best few."""
    results = [CandidateResult(None, "baseline", [1.0], 1.0, True, float(num_layers))]
    runs.warm_up()
    started = runs.timer()
    for candidate in _progress(grid, cfg, "tune: screen"):
        if _spent(runs, started, cfg):
            results.append(CandidateResult(candidate, "skipped", note="budget spent before it was timed"))
            continue
        ee = candidate.early_exit(model)
        runs.warm_up(ee)
        timing = Timing()
        runs.repeat(ee, timing, cfg.screen_prompts)
        results.append(_row(candidate, "screen", timing, cfg))
    screened = [r for r in results if r.stage == "screen" and r.candidate is not None]
    top = sorted(screened, key=lambda r: -r.median)[: cfg.keep]
    timings = {id(r): Timing() for r in top}
    builds = {id(r): r.candidate.early_exit(model) for r in top if r.candidate is not None}
    for repeat in _progress(list(range(cfg.repeats)), cfg, "tune: re-time"):
        if repeat >= MIN_REPEATS and _spent(runs, started, cfg):
            break
        for r in top:
            runs.repeat(builds[id(r)], timings[id(r)])
    for r in top:
        assert r.candidate is not None
        fine = _row(r.candidate, "fine", timings[id(r)], cfg)
        fine.note = (fine.note + "; " if fine.note else "") + f"screen {r.median:.2f}x"
        results[results.index(r)] = fine
    return results


def _choose(results: list[CandidateResult]) -> Candidate | None:
    """The re-timed candidate with the highest median ratio above 1.0, else None (``model.generate``)."""
    fine = [r for r in results if r.stage == "fine" and r.median > 1.0]
    return max(fine, key=lambda r: r.median).candidate if fine else None
