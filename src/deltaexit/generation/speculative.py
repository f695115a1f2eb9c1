"""Acceptance rules for self-speculative decoding: exact for greedy and for sampling.

Drafts ``x_1..x_k`` come from early exits; the full model gives target scores at the ``k + 1`` positions.
Greedy keeps the longest prefix equal to the target argmax. Sampling uses the standard speculative rule
(accept ``x_j`` with probability ``min(1, p_j(x_j) / q_j(x_j))``; on the first rejection sample from
``norm(max(p_j - q_j, 0))``), so every emitted token is distributed as the full model's.

Example:
    >>> import torch
    >>> greedy_accept(torch.tensor([[5, 6, 7]]), torch.tensor([[5, 6, 9, 1]]))
    tensor([2])
"""

from __future__ import annotations

import torch

__all__ = ["greedy_accept", "residual_distribution", "speculative_token"]


def greedy_accept(drafts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Accepted draft count per row: the length of the prefix where ``drafts == targets[:, :k]``.

    Args:
        drafts: ``[batch, k]`` draft tokens.
        targets: ``[batch, >= k]`` the full model's greedy tokens at the same positions.
    """
    k = drafts.shape[1]
    if k == 0:
        return torch.zeros(drafts.shape[0], dtype=torch.long, device=drafts.device)
    match = (drafts == targets[:, :k]).long()
    return match.cumprod(dim=1).sum(dim=1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(p - q, 0))`` row-wise; falls back to ``p`` where the residual has no mass."""
    r = (p - q).clamp_min(0)
    mass = r.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(1e-30), p)


def speculative_token(
    draft: torch.Tensor, p: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One position of speculative sampling: keep ``draft`` or resample from the residual.

    Args:
        draft: ``[batch]`` draft tokens, drawn from ``q``.
        p: ``[batch, vocab]`` target probabilities (the full model, after the logits processors).
        q: ``[batch, vocab]`` draft probabilities.

    Returns:
        ``(accepted [batch] bool, token [batch])``; the token is distributed as ``p`` (given the prefix).
    """
    p_x = p.gather(1, draft[:, None])[:, 0].float()
    q_x = q.gather(1, draft[:, None])[:, 0].float()
    accepted = torch.rand(p_x.shape, device=p_x.device) < p_x / q_x.clamp_min(1e-30)
    resampled = torch.multinomial(residual_distribution(p.float(), q.float()), 1).squeeze(1)
    return accepted, torch.where(accepted, draft, resampled)
