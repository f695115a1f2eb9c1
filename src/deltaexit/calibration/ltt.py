"""Learn-then-Test with fixed-sequence testing over an ordered list of candidate thresholds.

The candidates are ordered from safest (least early exit) to most aggressive, and that order is
fixed before the calibration losses are seen. For each candidate in turn the empirical risk of
``n`` per-example losses in ``[0, 1]`` gives a p-value for ``H0: risk > delta``; the test walks the
list and stops at the first p-value above ``epsilon``. The chosen candidate is the last one
rejected. Fixed-sequence testing controls the family-wise error at ``epsilon`` without any
multiplicity correction, so with probability at least ``1 - epsilon`` over the calibration draw
every rejected candidate (the chosen one included) has risk at most ``delta``.

Example:
    >>> import torch
    >>> risks = [0.0, 0.0, 0.01, 0.2, 0.0]             # an aggressive candidate that looks safe again
    >>> out = learn_then_test(lambda i: torch.full((500,), risks[i]), range(5), delta=0.05, epsilon=0.1)
    >>> out.index, out.num_tested                      # stops at the first non-rejection
    (2, 4)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deltaexit.calibration.bounds import min_examples, pvalue

__all__ = [
    "InsufficientCalibrationData",
    "LTTOutcome",
    "check_losses",
    "fixed_sequence_test",
    "learn_then_test",
]


class InsufficientCalibrationData(ValueError):
    """Too few calibration examples: even a zero empirical risk cannot certify ``(delta, epsilon)``."""


def check_losses(losses: Any, n: int | None = None) -> torch.Tensor:
    """Validate per-example losses: a finite 1-D float tensor in ``[0, 1]`` (of length ``n`` if given)."""
    losses = torch.as_tensor(losses).detach().to(torch.float64).cpu()
    if losses.dim() != 1:
        raise ValueError(f"losses(candidate) must return a 1-D tensor [n], got shape {tuple(losses.shape)}")
    if losses.numel() == 0:
        raise ValueError("losses(candidate) returned no examples; calibrate on at least one prompt")
    if not torch.isfinite(losses).all():
        raise ValueError("losses(candidate) returned NaN or infinite values")
    if losses.min() < 0 or losses.max() > 1:
        raise ValueError(
            f"per-example losses must lie in [0, 1] for the bounds to hold, got range "
            f"[{float(losses.min()):.4g}, {float(losses.max()):.4g}]"
        )
    if n is not None and losses.numel() != n:
        raise ValueError(f"losses(candidate) returned {losses.numel()} values, expected {n} (one per example)")
    return losses


def fixed_sequence_test(pvalues: Iterable[float], epsilon: float) -> int:
    """Index of the last hypothesis rejected in sequence at level ``epsilon`` (-1 if the first is not).

    Example:
        >>> fixed_sequence_test([0.01, 0.05, 0.2, 0.01], 0.1)
        1
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    last = -1
    for i, p in enumerate(pvalues):
        if math.isnan(p) or p > epsilon:
            break
        last = i
    return last


@dataclass
class LTTOutcome:
    """What :func:`learn_then_test` found.

    Attributes:
        index: Index of the chosen (last rejected) candidate; -1 if even the first was not rejected.
        candidates: The ordered candidates.
        pvalues: p-value of each tested candidate (testing stops at the first non-rejection
            unless ``test_all``; candidates past it are never eligible).
        risks: Empirical risk of each tested candidate.
        n: Number of calibration examples.
        delta, epsilon, bound: The test's tolerance, level and concentration bound.
        losses: ``[tested, n]`` per-example losses (float64).
    """

    index: int
    candidates: list[Any]
    pvalues: list[float]
    risks: list[float]
    n: int
    delta: float
    epsilon: float
    bound: str
    losses: torch.Tensor = field(repr=False)

    @property
    def num_tested(self) -> int:
        """How many candidates were evaluated."""
        return len(self.pvalues)

    @property
    def chosen(self) -> Any:
        """The chosen candidate, or None when nothing could be certified."""
        return self.candidates[self.index] if self.index >= 0 else None


def learn_then_test(
    losses: Callable[[Any], torch.Tensor],
    candidates: Sequence[Any] | Iterable[Any],
    *,
    delta: float,
    epsilon: float,
    bound: str = "hb",
    test_all: bool = False,
    progress: bool = False,
) -> LTTOutcome:
    """Pick the most aggressive candidate whose risk is certified ``<= delta`` at level ``epsilon``.

    Args:
        losses: ``losses(candidate) -> Tensor[n]`` per-example losses in ``[0, 1]`` (the same ``n``
            examples for every candidate).
        candidates: Ordered from safest to most aggressive, fixed before seeing the losses.
        delta: Risk tolerance in ``(0, 1)``.
        epsilon: Error level in ``(0, 1)``: the guarantee holds with probability ``>= 1 - epsilon``.
        bound: ``"hb"`` (Hoeffding–Bentkus), ``"hoeffding"`` or ``"bentkus"``.
        test_all: Evaluate every candidate for the record (the choice is the same).
        progress: Show a tqdm bar.

    Raises:
        InsufficientCalibrationData: ``n`` is below :func:`~deltaexit.calibration.bounds.min_examples`.

    Example:
        >>> import torch
        >>> out = learn_then_test(lambda t: torch.zeros(300), [0.9, 0.5], delta=0.01, epsilon=0.1)
        >>> out.chosen
        0.5
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("no candidate thresholds to test")
    iterator: Iterable[Any] = candidates
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(candidates, desc="calibrating (LTT)", unit="threshold")
    pvalues: list[float] = []
    risks: list[float] = []
    rows: list[torch.Tensor] = []
    n: int | None = None
    for candidate in iterator:
        row = check_losses(losses(candidate), n)
        if n is None:
            n = row.numel()
            needed = min_examples(delta, epsilon, bound)
            if n < needed:
                raise InsufficientCalibrationData(
                    f"{n} calibration examples cannot certify delta={delta}, epsilon={epsilon} "
                    f"with the {bound!r} bound: even zero disagreement needs at least {needed}. "
                    "Pass more calibration prompts, or raise delta or epsilon."
                )
        risk = float(row.mean())
        rows.append(row)
        risks.append(risk)
        pvalues.append(pvalue(risk, n, delta, bound))
        if pvalues[-1] > epsilon and not test_all:
            break
    assert n is not None
    index = fixed_sequence_test(pvalues, epsilon)
    return LTTOutcome(
        index=index,
        candidates=candidates,
        pvalues=pvalues,
        risks=risks,
        n=n,
        delta=float(delta),
        epsilon=float(epsilon),
        bound=bound,
        losses=torch.stack(rows),
    )
