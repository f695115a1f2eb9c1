"""The exit rule and its thresholds, shared by early-exit generation and the offline calibration simulator.

The rule: a token exits after the **first scored block** whose score passes that block's threshold
(``score >= threshold``). Block ``l`` (1-based depth ``d = l + 1``) is scored when
``min_exit_layer <= d < num_layers`` and its threshold is not ``inf``; a token no block lets out runs to full
depth. Thresholds come as one value, one per block, or a schedule over decode steps (CALM's decay);
:func:`as_schedule` coerces any of them, :func:`threshold_matrix` tabulates one for a whole decode, and
:func:`exit_layers` applies the rule to a table of scores at once. :class:`deltaexit.EarlyExit` applies the same
:func:`is_scored` / :func:`passes` block by block.

Example:
    >>> as_schedule(0.9, num_layers=4).values(step=0)
    [0.9, 0.9, 0.9, 0.9]
    >>> as_schedule([1.0, 0.8, 0.5], num_layers=4).values(step=3)
    [1.0, 0.8, 0.5, inf]
    >>> s = DecayingThreshold(0.9, tau=4.0, max_steps=10)
    >>> round(s.values(0, num_layers=2)[0], 4), round(s.values(10, num_layers=2)[0], 4)
    (0.91, 0.8118)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "ConstantThreshold",
    "DecayingThreshold",
    "PerLayerThreshold",
    "ThresholdSchedule",
    "as_schedule",
    "exit_layers",
    "is_scored",
    "passes",
    "threshold_matrix",
]


class ThresholdSchedule:
    """Base class: ``values(step, num_layers)`` gives one threshold per block (0-based) for a decode step."""

    num_layers: int | None = None

    def values(self, step: int, num_layers: int | None = None) -> list[float]:
        """Thresholds for blocks ``0..L-1`` at decode step ``step`` (0 = first token after the prompt)."""
        raise NotImplementedError

    def _layers(self, num_layers: int | None) -> int:
        n = num_layers if num_layers is not None else self.num_layers
        if n is None:
            raise ValueError("the number of layers is unknown; pass num_layers")
        return n


class ConstantThreshold(ThresholdSchedule):
    """The same threshold after every block and at every step."""

    def __init__(self, value: float, num_layers: int | None = None) -> None:
        self.value = _check_value(value)
        self.num_layers = num_layers

    def values(self, step: int, num_layers: int | None = None) -> list[float]:
        return [self.value] * self._layers(num_layers)

    def __repr__(self) -> str:
        return f"ConstantThreshold({self.value})"


class PerLayerThreshold(ThresholdSchedule):
    """One threshold per block (0-based); blocks beyond the list never exit."""

    def __init__(self, values: Sequence[float], num_layers: int | None = None) -> None:
        if len(values) == 0:
            raise ValueError("per-layer thresholds: the list is empty")
        self.thresholds = [_check_value(v) for v in values]
        self.num_layers = num_layers

    def values(self, step: int, num_layers: int | None = None) -> list[float]:
        n = self._layers(num_layers)
        if len(self.thresholds) > n:
            raise ValueError(f"{len(self.thresholds)} per-layer thresholds for a model with {n} blocks")
        return self.thresholds + [math.inf] * (n - len(self.thresholds))

    def __repr__(self) -> str:
        return f"PerLayerThreshold({self.thresholds})"


class DecayingThreshold(ThresholdSchedule):
    """CALM's schedule: ``clip(0.9 * base + 0.1 * exp(-tau * step / max_steps))``, easing as decoding goes on.

    Args:
        base: The threshold the schedule relaxes towards (CALM's lambda).
        tau: Decay temperature.
        max_steps: The decode length N the decay is spread over (e.g. ``max_new_tokens``).
        clip: Clip to [0, 1] (for probability-like scores).
    """

    def __init__(self, base: float, *, tau: float = 4.0, max_steps: int = 64, clip: bool = True) -> None:
        self.base = _check_value(base)
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.tau, self.max_steps, self.clip = float(tau), int(max_steps), clip

    def values(self, step: int, num_layers: int | None = None) -> list[float]:
        if math.isinf(self.base):  # +inf never exits, -inf always passes: no decay applies
            return [self.base] * self._layers(num_layers)
        value = 0.9 * self.base + 0.1 * math.exp(-self.tau * step / self.max_steps)
        if self.clip:
            value = min(1.0, max(0.0, value))
        return [value] * self._layers(num_layers)

    def __repr__(self) -> str:
        return f"DecayingThreshold(base={self.base}, tau={self.tau}, max_steps={self.max_steps})"


def _check_value(value: float) -> float:
    value = float(value)
    if math.isnan(value):
        raise ValueError("a threshold is NaN; use float('inf') for 'never exit'")
    return value


def as_schedule(threshold: float | Sequence[float] | ThresholdSchedule, num_layers: int) -> ThresholdSchedule:
    """Turn a float, a per-layer list or a schedule into a :class:`ThresholdSchedule` for ``num_layers`` blocks."""
    if isinstance(threshold, ThresholdSchedule):
        schedule = threshold
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        schedule = ConstantThreshold(threshold)
    elif isinstance(threshold, Sequence) and not isinstance(threshold, str):
        schedule = PerLayerThreshold(list(threshold))
    else:
        raise TypeError(
            "threshold must be a float, a list of per-layer floats or a ThresholdSchedule, "
            f"got {type(threshold).__name__}"
        )
    schedule.num_layers = num_layers
    schedule.values(0, num_layers)  # validates the length
    return schedule


def threshold_matrix(threshold: float | Sequence[float] | ThresholdSchedule, num_layers: int, num_steps: int):
    """``[num_steps, num_layers]`` float64 thresholds of any threshold :func:`as_schedule` takes.

    Example:
        >>> threshold_matrix([0.5, 0.7], num_layers=3, num_steps=1).tolist()
        [[0.5, 0.7, inf]]
    """
    if isinstance(threshold, torch.Tensor):
        threshold = [float(v) for v in threshold.reshape(-1)]
    schedule = as_schedule(threshold, num_layers)
    rows = [schedule.values(step, num_layers) for step in range(num_steps)]
    return torch.tensor(rows, dtype=torch.float64).reshape(num_steps, num_layers)


def is_scored(depth: int, threshold: float, *, min_exit_layer: int, num_layers: int) -> bool:
    """Whether the block ending at 1-based ``depth`` takes an exit decision under ``threshold``.

    Example:
        >>> [is_scored(d, 0.5, min_exit_layer=2, num_layers=4) for d in range(1, 5)]
        [False, True, True, False]
    """
    return min_exit_layer <= depth < num_layers and threshold != math.inf


def passes(score: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """The exit test on scores: ``score >= threshold`` (higher scores are safer to exit).

    Example:
        >>> passes(torch.tensor([0.2, 0.9]), 0.5).tolist()
        [False, True]
    """
    return score >= threshold


def exit_layers(
    scores: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    min_exit_layer: int = 1,
    full_depth: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[T]`` 1-based exit layer of each token under the exit rule, for a whole table at once.

    Args:
        scores: ``[L, T]`` score after each block (the last block's row is never read).
        thresholds: ``[L, T]`` (or broadcastable) threshold after each block.
        min_exit_layer: First 1-based layer after which a token may exit.
        full_depth: ``[T]`` bool, tokens that must run to full depth whatever their scores.

    Example:
        >>> s = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.0, 0.0]])
        >>> exit_layers(s, torch.full((3, 2), 0.5)).tolist()
        [2, 1]
        >>> exit_layers(s, torch.full((3, 2), 0.5), min_exit_layer=2).tolist()
        [2, 3]
    """
    num_layers = int(scores.shape[0])
    if not 1 <= min_exit_layer <= num_layers:
        raise ValueError(f"min_exit_layer must lie in [1, {num_layers}], got {min_exit_layer}")
    ok = passes(scores.to(torch.float64), thresholds.to(torch.float64)) & (thresholds != math.inf)
    ok[: min_exit_layer - 1] = False
    if full_depth is not None:
        ok[:, full_depth] = False
    ok[-1] = True  # full depth
    return ok.to(torch.int8).argmax(dim=0) + 1
