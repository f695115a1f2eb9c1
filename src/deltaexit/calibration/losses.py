"""The per-example calibration losses, in [0, 1]: their names and their one computation.

* ``"textual"`` (CALM's textual consistency): share of an example's positions where the
  early-exit token differs from the full model's.
* ``"sequence"``: 1 if they differ at any position.
* ``"risk"`` (CALM's risk consistency): ``max(0, err(early) - err(full))``, ``err`` the share of
  positions that miss the reference token.

:func:`example_losses` computes any of them from tokens and a per-example mean; the offline
simulator (:class:`~deltaexit.calibration.simulate.ExitTable`, flat tokens indexed by example) and
real generation (:class:`~deltaexit.calibration.risk.GenerationLosses`, ``[examples, tokens]``
continuations, through :func:`token_disagreement` and friends) both use it.

Example:
    >>> import torch
    >>> early = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    >>> full = torch.tensor([[1, 2, 0, 4], [5, 6, 7, 8]])
    >>> token_disagreement(early, full).tolist()
    [0.25, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "LOSSES",
    "check_loss",
    "continuation_losses",
    "example_losses",
    "risk_consistency",
    "sequence_disagreement",
    "token_disagreement",
]

#: The loss names, in the order the docs list them.
LOSSES: tuple[str, ...] = ("textual", "sequence", "risk")

#: ``mean(x) -> [examples]``: the per-example mean (float64) of a per-token bool tensor.
PerExampleMean = Callable[[torch.Tensor], torch.Tensor]


def check_loss(loss: str, has_references: bool | None = None) -> str:
    """Raise a clear error unless ``loss`` is a known name (and ``"risk"`` has references).

    Args:
        loss: The loss name.
        has_references: Whether references are available (None: not checked).

    Example:
        >>> check_loss("sequence")
        'sequence'
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if loss == "risk" and has_references is False:
        raise ValueError("loss='risk' (risk consistency) needs references=: one reference continuation per example")
    return loss


def example_losses(
    loss: str,
    early: torch.Tensor,
    full: torch.Tensor,
    mean: PerExampleMean,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[examples]`` float64 losses from per-token early and full predictions.

    Args:
        loss: ``"textual"``, ``"sequence"`` or ``"risk"``.
        early: The early-exit tokens.
        full: The full model's tokens (same shape).
        mean: The per-example mean of a bool tensor shaped like ``early``.
        reference: The reference tokens (``"risk"`` only).

    Example:
        >>> e, f = torch.tensor([[1, 0]]), torch.tensor([[1, 2]])
        >>> example_losses("sequence", e, f, lambda x: x.to(torch.float64).mean(dim=1)).tolist()
        [1.0]
    """
    check_loss(loss, None if loss != "risk" else reference is not None)
    if loss == "textual":
        return mean(early != full)
    if loss == "sequence":
        return (mean(early != full) > 0).to(torch.float64)
    assert reference is not None
    return (mean(early != reference) - mean(full != reference)).clamp(0.0, 1.0)


def _check_pair(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"continuations must be two [examples, tokens] tensors of the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if mask is None:
        mask = torch.ones(a.shape, dtype=torch.bool, device=a.device)
    mask = mask.bool()
    if mask.shape != a.shape:
        raise ValueError(f"mask must be {tuple(a.shape)}, got {tuple(mask.shape)}")
    empty = ~mask.any(dim=1)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} example(s) have no token to compare (all masked)")
    return mask


def continuation_losses(
    loss: str,
    early: torch.Tensor,
    full: torch.Tensor,
    mask: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[n]`` losses (on CPU) of ``[n, T]`` continuations, over the positions where ``mask`` is True."""
    mask = _check_pair(early, full, mask)
    if reference is not None:
        _check_pair(early, reference, mask)
    count = mask.sum(dim=1).to(torch.float64)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (x & mask).sum(dim=1).to(torch.float64) / count

    return example_losses(loss, early, full, mean, reference).cpu()


def token_disagreement(early: torch.Tensor, full: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` share of (unmasked) positions where ``early`` and ``full`` differ (the ``"textual"`` loss)."""
    return continuation_losses("textual", early, full, mask)


def sequence_disagreement(early: torch.Tensor, full: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` 1.0 where the continuations differ at any (unmasked) position, else 0.0."""
    return continuation_losses("sequence", early, full, mask)


def risk_consistency(
    early: torch.Tensor, full: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[n]`` CALM's risk consistency: ``max(0, err(early, ref) - err(full, ref))`` in [0, 1].

    Example:
        >>> ref = torch.tensor([[1, 2, 3, 4]])
        >>> risk_consistency(torch.tensor([[1, 0, 3, 4]]), ref, ref).tolist()
        [0.25]
    """
    return continuation_losses("risk", early, full, mask, reference)
