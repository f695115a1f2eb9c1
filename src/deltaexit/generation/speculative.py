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

__all__ = ["greedy_accept", "residual_distribution", "sample_accept"]


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


def sample_accept(
    drafts: torch.Tensor, q_draft: torch.Tensor, p_target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative acceptance for sampling.

    Args:
        drafts: ``[batch, k]`` draft tokens.
        q_draft: ``[batch, k]`` the draft distribution's probability of each draft token.
        p_target: ``[batch, k]`` the target distribution's probability of each draft token.

    Returns:
        ``(accepted_count [batch], accept_mask [batch, k])``: ``accept_mask[:, j]`` says whether draft ``j``
        passes its own test (rows keep only the prefix before their first failure).
    """
    k = drafts.shape[1]
    if k == 0:
        empty = torch.zeros(drafts.shape[0], 0, dtype=torch.bool, device=drafts.device)
        return torch.zeros(drafts.shape[0], dtype=torch.long, device=drafts.device), empty
    u = torch.rand(drafts.shape, device=drafts.device, dtype=torch.float32)
    ratio = p_target.float() / q_draft.float().clamp_min(1e-30)
    ok = u < ratio
    return ok.long().cumprod(dim=1).sum(dim=1), ok
