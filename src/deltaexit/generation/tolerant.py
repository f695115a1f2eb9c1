"""``kv="tolerant"``: self-speculation that also accepts an early-exit draft the full model nearly agrees with.

:class:`Tolerant` is :class:`~deltaexit.generation.verify.Verify` with one change in greedy decoding: an
early-exit draft token ``d`` is accepted when the full model's probability of it is within a factor ``ratio`` of
its top-1, ``p_full(d) >= ratio * p_full(top1)`` (on the verify pass's raw logits: ``logit(d) >= max + log ratio``),
so a round keeps more of its drafts. ``ratio=1`` is ``verify`` (output identical to ``model.generate``); below 1
the output may differ from ``model.generate``'s, and each tolerated draft changes the text from there on. N-gram
drafts and sampling (``do_sample=True``, speculative sampling) are verified exactly as ``verify`` does.

Choose ``ratio`` with Learn-then-Test (:func:`deltaexit.calibration.tolerant.calibrate_tolerant`, or
``dx.tune(..., tolerance=δ)``), which bounds the share of new tokens that differ from ``model.generate``'s.

Example:
    >>> import torch
    >>> from deltaexit.generation.early_exit import EarlyExit
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=4)
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> ee = EarlyExit(model, "delta-norm", float("-inf"), Tolerant(ratio=1.0, num_draft=2), min_exit_layer=2)
    >>> out = ee.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    >>> torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from deltaexit.generation.policy import register_policy
from deltaexit.generation.run import Run
from deltaexit.generation.verify import Verify

__all__ = ["Tolerant", "tolerated_logits"]


def tolerated_logits(logits: torch.Tensor, drafts: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """A copy of ``[B, n, V]`` verify logits in which each draft ``drafts[i]`` (``[B]``) within ``ratio`` of the
    top-1 at position ``i`` is raised just above it, so greedy acceptance takes it.

    Example:
        >>> logits = torch.log(torch.tensor([[[0.5, 0.4, 0.1], [0.2, 0.7, 0.1]]]))
        >>> tolerated_logits(logits, [torch.tensor([1]), torch.tensor([2])], ratio=0.75).argmax(-1).tolist()
        [[1, 1]]
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio!r}")
    out = logits.clone()
    log_ratio = math.log(ratio)
    for i, draft in enumerate(drafts):
        row = out[:, i]
        top = row.max(dim=-1).values
        own = row.gather(-1, draft[:, None]).squeeze(-1)
        lifted = torch.where(own >= top + log_ratio, torch.maximum(own, torch.nextafter(top, top + 1.0)), own)
        row.scatter_(-1, draft[:, None], lifted[:, None])
    return out


@register_policy
@dataclass(frozen=True)
class Tolerant(Verify):
    """Self-speculation accepting early-exit drafts with ``p_full(draft) >= ratio * p_full(top1)`` (lossy below 1).

    Args:
        ratio: Tolerance factor in (0, 1]; 1.0 accepts only the full model's own token (``verify``'s output).
            Calibrate it (``dx.tune(..., tolerance=δ)``); the default keeps the output identical.
        num_draft, adaptive, ngram, ngram_draft, ngram_min: As :class:`~deltaexit.generation.verify.Verify`.
    """

    name: ClassVar[str] = "tolerant"

    ratio: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1] (1.0: lossless, like kv='verify'), got {r!r}")

    def _accept(self, run: Run, chunk, target: torch.Tensor):
        """``verify``'s acceptance, on logits in which the tolerated early-exit drafts are the top-1."""
        tolerant = self.ratio < 1.0 and not run.do_sample and chunk.depth > 0 and bool(chunk.tokens)
        if tolerant:  # depth 0 is an n-gram chunk: verified exactly
            target = tolerated_logits(target, chunk.tokens, float(self.ratio))
        return super()._accept(run, chunk, target)
