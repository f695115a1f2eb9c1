"""Wall-clock of early exit against ``model.generate``, alternated in one run, batch 1, greedy.

Each repeat runs, prompt by prompt, ``model.generate`` and then the early-exit setting on the same prompt, so a
slow phase of a shared machine hits both; a repeat's ratio is the summed ``model.generate`` time over the summed
early-exit time (``> 1``: early exit is faster). Figures are medians over repeats with their spread.

Example:
    >>> import torch
    >>> from deltaexit.generation.early_exit import EarlyExit
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=4)
    >>> runs = PromptRuns(model, [torch.tensor([5, 6, 7])], max_new_tokens=4)
    >>> timing = time_against_generate(runs, EarlyExit(model, "softmax-max", 0.5, "verify"), repeats=2)
    >>> len(timing.ratios), timing.agreement, timing.identical
    (2, 1.0, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.outputs import EarlyExitOutput
from deltaexit.structure import find_structure
from deltaexit.timing import spread

__all__ = ["PromptRuns", "Timing", "time_against_generate", "token_agreement"]


def token_agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[int, int]:
    """``(matching, total)`` new tokens of ``other`` against ``reference`` (1-D), position by position.

    Example:
        >>> token_agreement(torch.tensor([1, 2, 3]), torch.tensor([1, 5]))
        (1, 3)
    """
    n = int(reference.numel())
    m = min(n, int(other.numel()))
    return int((reference[:m] == other[:m]).sum()), max(n, int(other.numel()))


@dataclass
class Timing:
    """Alternated timings of one setting against ``model.generate``.

    Attributes:
        ratios: ``model.generate`` seconds / early-exit seconds, one per repeat (``> 1``: faster).
        agreement: Share of new tokens equal to ``model.generate``'s (1.0 = identical text).
        identical: Every sequence equals ``model.generate``'s token for token.
        mean_exit_layer: Mean 1-based exit layer of the emitted tokens.
        baseline_s: Summed ``model.generate`` seconds, one per repeat.
    """

    ratios: list[float] = field(default_factory=list)
    agreement: float = 1.0
    identical: bool = True
    mean_exit_layer: float = float("nan")
    baseline_s: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median ratio (nan before any repeat)."""
        return float(spread(self.ratios)["median"])

    @property
    def spread(self) -> tuple[float, float]:
        """``(min, max)`` of the ratios."""
        summary = spread(self.ratios)
        return float(summary["min"]), float(summary["max"])


class PromptRuns:
    """Batch-1 greedy generation of a fixed list of prompts, with ``model.generate``'s outputs kept once.

    Args:
        model: The causal LM.
        prompts: 1-D token-id tensors.
        max_new_tokens: New tokens per prompt.
        timer: The clock (seconds).
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[torch.Tensor],
        max_new_tokens: int,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        structure = find_structure(model, validate=False)
        self.model: Any = model
        self.inputs = [p.reshape(1, -1).to(structure.input_device) for p in prompts]
        self.kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": structure.pad_token_id,
        }  # fmt: skip
        self.timer = timer

    def _baseline(self, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
        start = self.timer()
        seq = self.model.generate(ids, attention_mask=torch.ones_like(ids), **self.kwargs)
        return self.timer() - start, seq[0, ids.shape[1] :].cpu()

    def _early(self, ee: EarlyExit, ids: torch.Tensor) -> tuple[float, torch.Tensor, Any]:
        start = self.timer()
        out = ee.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, **self.kwargs)
        elapsed = self.timer() - start
        assert isinstance(out, EarlyExitOutput)
        return elapsed, out.sequences[0, ids.shape[1] :].cpu(), out.stats

    def repeat(self, ee: EarlyExit, timing: Timing, count: int | None = None) -> None:
        """One alternated repeat over the first ``count`` prompts (all by default), added to ``timing``."""
        inputs = self.inputs[: count if count is not None else len(self.inputs)]
        base_s = early_s = 0.0
        matched = total = layers = tokens = 0
        for ids in inputs:
            b, ref = self._baseline(ids)
            e, new, stats = self._early(ee, ids)
            base_s, early_s = base_s + b, early_s + e
            good, n = token_agreement(ref, new)
            matched, total = matched + good, total + n
            timing.identical = timing.identical and torch.equal(ref, new)
            if stats is not None and stats.tokens:
                layers += stats.mean_exit_layer * stats.tokens
                tokens += stats.tokens
        timing.ratios.append(base_s / max(early_s, 1e-12))
        timing.baseline_s.append(base_s)
        timing.agreement = matched / max(total, 1)
        timing.mean_exit_layer = layers / tokens if tokens else float("nan")

    def warm_up(self, ee: EarlyExit | None = None) -> None:
        """One short untimed call (first-call costs out of the figures)."""
        ids = self.inputs[0]
        kwargs = {**self.kwargs, "max_new_tokens": min(2, int(self.kwargs["max_new_tokens"]))}
        if ee is None:
            self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        else:
            ee.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def time_against_generate(runs: PromptRuns, ee: EarlyExit, repeats: int = 5, count: int | None = None) -> Timing:
    """``repeats`` alternated repeats of ``ee`` against ``model.generate`` on ``runs``'s prompts (warm-up first).

    Args:
        runs: The prompts and generation settings.
        ee: The early-exit setting.
        repeats: Alternated repeats (median and spread over these).
        count: Time only the first ``count`` prompts.
    """
    runs.warm_up()
    runs.warm_up(ee)
    timing = Timing()
    for _ in range(repeats):
        runs.repeat(ee, timing, count)
    return timing
