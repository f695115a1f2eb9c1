"""Candidate-set lens decisions: score only ``K`` rows of the LM head after a token's first scored layer.

"Looking Beyond the Top-1" (ICML 2025) found that the lens's top-k tokens settle, in order, early in the
network. A candidate-set measure (``candidates=K`` on ``softmax-max``, ``softmax-gap`` and ``lens-mlp``) takes
the top-``K`` token ids from the full lens at a token's first scored layer (whose full logits also give the
exit token if it exits there) and at every later layer reads only those ``K`` logits
(:meth:`deltaexit.lens.Lens.candidate_logits`: ``K * hidden`` multiply-adds instead of ``vocab * hidden``),
scoring from the softmax over them. The exit token itself always comes from the exact full lens at the exit
layer. The ids travel on :attr:`LayerState.candidates <deltaexit.measures.base.LayerState.candidates>`: the
caller hands a scored layer's state on with :meth:`LayerState.take_from
<deltaexit.measures.base.LayerState.take_from>`.

Example:
    >>> import torch
    >>> from deltaexit.lens import Lens
    >>> from deltaexit.measures.base import LayerState, get_measure
    >>> from deltaexit.testing import tiny_model
    >>> lens = Lens.from_model(tiny_model("llama", hidden=32))
    >>> m = get_measure("softmax-max", candidates=8)
    >>> first = LayerState(layer=0, h_out=torch.randn(3, 32), lens=lens)
    >>> later = LayerState(layer=1, h_out=torch.randn(3, 32), lens=lens)
    >>> with torch.no_grad():
    ...     s0 = m.score(first)                      # full lens: picks 8 candidates per token
    ...     s1 = m.score(later.take_from(first))     # 8 rows of the head per token
    >>> first.candidates.shape, later.cached_logits is None, bool((s1 <= 1).all())
    (torch.Size([3, 8]), True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltaexit.measures.base import LayerState

__all__ = [
    "CANDIDATE_CHUNK_TOKENS",
    "candidate_head_flops",
    "candidate_logits",
    "carry_candidates",
    "check_candidates",
    "check_candidates_for_vocab",
    "pick_candidates",
]

#: Tokens per full-lens call when candidates are picked for many tokens at once (their logits are not kept).
CANDIDATE_CHUNK_TOKENS = 4096


def check_candidates(candidates: int | None, *, minimum: int = 1) -> int | None:
    """``candidates`` as an int (or None = the full vocabulary), refusing values below ``minimum``.

    Example:
        >>> check_candidates(0)
        Traceback (most recent call last):
        ...
        ValueError: candidates must be an int >= 1 (e.g. candidates=64), or None for the full vocabulary; got 0
    """
    if candidates is None:
        return None
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < minimum:
        raise ValueError(
            f"candidates must be an int >= {minimum} (e.g. candidates=64), or None for the full vocabulary; "
            f"got {candidates!r}"
        )
    return int(candidates)


def check_candidates_for_vocab(candidates: int | None, vocab_size: int) -> None:
    """Raise a ``ValueError`` unless ``candidates`` is None or below ``vocab_size``."""
    if candidates is not None and candidates >= vocab_size:
        raise ValueError(
            f"candidates={candidates} is not smaller than the vocabulary ({vocab_size} tokens): pass "
            f"candidates < {vocab_size} (e.g. 64), or candidates=None to score the full vocabulary"
        )


def candidate_head_flops(hidden_size: int, candidates: int) -> float:
    """FLOPs of ``K`` rows of the lens for one token: final norm, ``K`` dot products, softmax over ``K``."""
    return 2.0 * hidden_size * candidates + 5.0 * hidden_size + 3.0 * candidates


def pick_candidates(state: LayerState, k: int) -> torch.Tensor:
    """Top-``k`` lens token ids of ``state.h_out`` (``[..., k]``), stored on ``state.candidates``.

    Up to :data:`CANDIDATE_CHUNK_TOKENS` tokens read ``state.logits`` (so the full logits stay cached for an exit
    at this layer); more tokens are done in chunks whose logits are not kept.

    Raises:
        ValueError: ``k`` is not below the vocabulary.
    """
    h = state.h_out
    if state.cached_logits is not None or h.reshape(-1, h.shape[-1]).shape[0] <= CANDIDATE_CHUNK_TOKENS:
        logits = state.logits
        check_candidates_for_vocab(k, logits.shape[-1])
        ids = logits.topk(k, dim=-1).indices
    else:
        if state.lens is None:
            raise ValueError("this measure needs the lens; build the state with lens=dx.Lens.from_model(model)")
        check_candidates_for_vocab(k, state.lens.vocab_size)
        flat = h.reshape(-1, h.shape[-1])
        parts = [state.lens(flat[i : i + CANDIDATE_CHUNK_TOKENS]).topk(k, dim=-1).indices
                 for i in range(0, flat.shape[0], CANDIDATE_CHUNK_TOKENS)]  # fmt: skip
        ids = torch.cat(parts).reshape(*h.shape[:-1], k)
    state.candidates = ids
    return ids


def candidate_logits(state: LayerState, k: int) -> torch.Tensor:
    """``state``'s lens logits at its candidates, picking ``k`` of them first if it has none (``[..., k]``)."""
    if state.candidates is None:
        pick_candidates(state, k)
    elif state.candidates.shape[-1] != k:
        raise ValueError(f"the state carries {state.candidates.shape[-1]} candidates, the measure wants {k}")
    return state.candidate_logits


def carry_candidates(states: Sequence[LayerState], k: int) -> list[LayerState]:
    """Offline: pick ``k`` candidates at the first (lowest-layer) state of the same tokens, hand them to the others.

    Sets :attr:`~deltaexit.measures.base.LayerState.candidates` on every state (the lowest one keeps ids it
    already has for this ``k``).

    Returns:
        The states in layer order.
    """
    ordered = sorted(states, key=lambda s: s.layer)
    if ordered:
        first = ordered[0]
        if first.candidates is None or first.candidates.shape[-1] != k:
            pick_candidates(first, k)
        for state in ordered[1:]:
            state.candidates = first.candidates
    return ordered
