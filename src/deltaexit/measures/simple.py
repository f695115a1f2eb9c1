"""Training-free confidence measures: softmax response, state propagation, delta size.

Every score follows the one sign convention of :class:`~deltaexit.measures.base.ConfidenceMeasure`:
**higher = safer to exit**. Measures of *change* are therefore negated: ``delta-norm``
scores ``-‖delta‖`` (a small update means a stable prediction) and ``delta-ratio`` scores
``-‖delta‖ / ‖h_in‖``. A threshold ``t`` on ``delta-norm`` thus means "exit when
``‖delta‖ <= -t``".

Example:
    >>> import torch
    >>> from deltaexit.measures import LayerState, get_measure
    >>> h_in = torch.ones(2, 4); h_out = h_in + torch.tensor([[0.0] * 4, [1.0] * 4])
    >>> get_measure("delta-norm").score(LayerState(layer=0, h_in=h_in, h_out=h_out)).tolist()
    [-0.0, -2.0]
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from deltaexit.measures.base import ConfidenceMeasure, LayerState, register_measure
from deltaexit.measures.candidates import (
    candidate_head_flops,
    candidate_logits,
    check_candidates,
    check_candidates_for_vocab,
)
from deltaexit.measures.cost import lens_head_flops

__all__ = ["DeltaNorm", "DeltaRatio", "SoftmaxGap", "SoftmaxMax", "StateCosine"]

_EPS = 1e-12


def _top2(state: LayerState) -> torch.Tensor:
    """Top-2 lens probabilities ``[..., 2]`` (float32), from ``state.topk_probs`` when given."""
    if state.topk_probs is not None and state.topk_probs.shape[-1] >= 2:
        return state.topk_probs[..., :2].float()
    probs = torch.softmax(state.logits.float(), dim=-1)
    if probs.shape[-1] < 2:
        raise ValueError("softmax measures need a vocabulary of at least 2 tokens")
    return probs.topk(2, dim=-1).values


class _SoftmaxMeasure(ConfidenceMeasure):
    """Shared parts of the softmax responses: the lens, scores in [0, 1], the ``candidates`` option.

    Args:
        candidates: None: the softmax over the full vocabulary at every scored layer. ``K``: the top-``K``
            tokens of the full lens at a token's first scored layer are its candidates; every decision scores
            the softmax over those ``K`` logits only (``K`` rows of the head after the first layer; see
            :mod:`deltaexit.measures.candidates`).
    """

    needs_lens: ClassVar[bool] = True
    inputs: ClassVar[tuple[str, ...]] = ("h_out",)
    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    #: FLOPs per token of the softmax statistic over ``n`` probabilities (beyond the softmax itself).
    stat_flops: ClassVar[float] = 1.0

    def __init__(self, candidates: int | None = None) -> None:
        self.candidates = check_candidates(candidates, minimum=2)

    @property
    def display_name(self) -> str:
        """``name``, with ``@K`` for a candidate set (e.g. ``softmax-max@64``)."""
        return self.name if self.candidates is None else f"{self.name}@{self.candidates}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(candidates={self.candidates})"

    def probs(self, state: LayerState) -> torch.Tensor:
        """The probabilities the score reads: over the candidates, or over the full vocabulary."""
        if self.candidates is None:
            return torch.softmax(state.logits.float(), dim=-1)
        return torch.softmax(candidate_logits(state, self.candidates).float(), dim=-1)

    def check_sizes(self, hidden_size: int, vocab_size: int) -> None:
        check_candidates_for_vocab(self.candidates, vocab_size)

    def flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        n = vocab_size if self.candidates is None else self.candidates
        head = (
            lens_head_flops(hidden_size, vocab_size)
            if self.candidates is None
            else candidate_head_flops(hidden_size, n)
        )
        return head + self.stat_flops * n

    def setup_flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        if self.candidates is None:
            return 0.0
        # the full head at the first scored layer, and the top-K over it, instead of K rows
        full = lens_head_flops(hidden_size, vocab_size) + vocab_size * math.log2(max(2, self.candidates))
        return full - candidate_head_flops(hidden_size, self.candidates)


@register_measure
class SoftmaxMax(_SoftmaxMeasure):
    """CALM's softmax response: the lens's maximum probability after block ``l`` (in [0, 1]).

    Example:
        >>> m = SoftmaxMax()
        >>> m.score(LayerState(layer=0, h_out=torch.zeros(1, 4), topk_probs=torch.tensor([[0.7, 0.2]])))
        tensor([0.7000])
    """

    name: ClassVar[str] = "softmax-max"
    example_threshold: ClassVar[float | None] = 0.9

    def score(self, state: LayerState) -> torch.Tensor:
        if self.candidates is None and state.topk_probs is not None:
            return state.topk_probs[..., 0].float()
        return self.probs(state).amax(dim=-1)


@register_measure
class SoftmaxGap(_SoftmaxMeasure):
    """CALM's softmax response as top-1 minus top-2 probability (in [0, 1])."""

    name: ClassVar[str] = "softmax-gap"
    example_threshold: ClassVar[float | None] = 0.5
    stat_flops: ClassVar[float] = 2.0

    def score(self, state: LayerState) -> torch.Tensor:
        if self.candidates is None:
            top = _top2(state)
        else:
            top = self.probs(state).topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]


@register_measure
class StateCosine(ConfidenceMeasure):
    """CALM's state propagation: ``cos(h_in, h_out)`` of block ``l`` (in [-1, 1]; 1 = no turn)."""

    name: ClassVar[str] = "state-cosine"
    inputs: ClassVar[tuple[str, ...]] = ("h_in", "h_out")
    score_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)
    example_threshold: ClassVar[float | None] = 0.99

    def score(self, state: LayerState) -> torch.Tensor:
        if state.h_in is None:
            raise ValueError("state-cosine needs h_in (the state before the block)")
        a, b = state.h_in.float(), state.h_out.float()
        dot = (a * b).sum(dim=-1)
        norms = a.norm(dim=-1) * b.norm(dim=-1)
        return (dot / norms.clamp_min(_EPS)).clamp(-1.0, 1.0)

    def flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        return 6.0 * hidden_size + 2.0


@register_measure
class DeltaNorm(ConfidenceMeasure):
    """``-‖delta‖``: a small residual update of block ``l`` means a stable prediction.

    The score is negated so that higher = safer to exit; ``‖delta‖ = -score``.
    """

    name: ClassVar[str] = "delta-norm"
    inputs: ClassVar[tuple[str, ...]] = ("delta",)
    score_range: ClassVar[tuple[float, float]] = (-math.inf, 0.0)
    example_threshold: ClassVar[float | None] = -2.0

    def threshold_hint(self, threshold: float) -> str:
        return f" (exits when ‖delta‖ <= {-threshold:g})"

    def score(self, state: LayerState) -> torch.Tensor:
        return -state.delta.float().norm(dim=-1)

    def flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        return 3.0 * hidden_size  # subtract (delta) + square-accumulate


@register_measure
class DeltaRatio(ConfidenceMeasure):
    """``-‖delta‖ / ‖h_in‖``: the relative size of block ``l``'s update (negated)."""

    name: ClassVar[str] = "delta-ratio"
    inputs: ClassVar[tuple[str, ...]] = ("h_in", "delta")
    score_range: ClassVar[tuple[float, float]] = (-math.inf, 0.0)
    example_threshold: ClassVar[float | None] = -0.1

    def threshold_hint(self, threshold: float) -> str:
        return f" (exits when ‖delta‖ <= {-threshold:g}·‖h_in‖)"

    def score(self, state: LayerState) -> torch.Tensor:
        if state.h_in is None:
            raise ValueError("delta-ratio needs h_in (the state before the block)")
        return -state.delta.float().norm(dim=-1) / state.h_in.float().norm(dim=-1).clamp_min(_EPS)

    def flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        return 5.0 * hidden_size + 1.0
