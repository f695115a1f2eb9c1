"""Logit-lens summary features of the state after block ``l`` and of its change over that block.

These are what CALM's softmax response and "Looking Beyond the Top-1" read off the lens, plus how
the prediction moved in the last block; the ``lens-mlp`` measure learns an exit classifier on them.

Example:
    >>> import torch
    >>> from deltaexit.lens import Lens
    >>> from deltaexit.measures.base import LayerState
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=2, hidden=32)
    >>> h = torch.randn(3, 32)
    >>> with torch.no_grad():
    ...     x = lens_features(LayerState(layer=0, h_in=h, h_out=2 * h, lens=Lens.from_model(model)))
    >>> x.shape == (3, len(LENS_FEATURE_NAMES))
    True
"""

from __future__ import annotations

import torch

from deltaexit.measures.base import LayerState
from deltaexit.measures.candidates import candidate_logits, pick_candidates

__all__ = ["LENS_CHUNK", "LENS_FEATURE_NAMES", "lens_features", "lens_features_chunked"]

#: Tokens per lens call when lens features are computed for many tokens at once.
LENS_CHUNK = 4096
#: Names of the columns :func:`lens_features` returns (``k = 4``).
LENS_FEATURE_NAMES: tuple[str, ...] = (
    "p1", "p2", "p3", "p4", "p1_minus_p2", "entropy", "log_p1",
    "prev_top1_same", "prev_p_of_top1", "p_of_prev_top1", "kl_to_prev",
    "delta_norm", "h_out_norm", "cos_h_in_h_out",
)  # fmt: skip


def lens_features(state: LayerState, k: int = 4, *, candidates: int | None = None) -> torch.Tensor:
    """Summary features of the logit lens after block ``l`` and of its change from block ``l - 1``.

    Columns (:data:`LENS_FEATURE_NAMES` for ``k = 4``): the top-``k`` lens probabilities, top-1 minus
    top-2, entropy, log-probability of the top-1; whether the previous layer's lens (of ``h_in``) had
    the same top-1, the previous layer's probability of the current top-1, the current probability
    of the previous top-1, ``KL(current || previous)``; ``‖delta‖``, ``‖h_out‖`` and
    ``cos(h_in, h_out)``. The lens of ``h_in`` is ``state.logits_in`` (handed on when cached).

    Args:
        state: The state after block ``l`` (with ``h_in`` and the lens).
        k: Top probabilities to report.
        candidates: None: the distributions over the full vocabulary. ``K``: over the state's ``K``
            candidate tokens (picked from the full lens if the state carries none;
            :mod:`deltaexit.measures.candidates`), both layers' lens read at those rows only.

    Returns:
        ``[..., 2k + 6]`` float32.
    """
    if state.h_in is None:
        raise ValueError("lens features need h_in (the state before the block)")
    if candidates is None:
        logits, logits_in = state.logits, state.logits_in
    else:
        logits = candidate_logits(state, candidates)
        logits_in = state.candidate_logits_in
    logp = torch.log_softmax(logits.float(), dim=-1)
    if logp.shape[-1] < k:
        raise ValueError(f"lens features need a vocabulary of at least {k} tokens, got {logp.shape[-1]}")
    probs = logp.exp()
    top = probs.topk(k, dim=-1)
    top1 = top.indices[..., :1]
    logp_prev = torch.log_softmax(logits_in.float(), dim=-1)
    prev_top1 = logp_prev.argmax(dim=-1, keepdim=True)
    h_in, h_out = state.h_in.float(), state.h_out.float()
    delta = h_out - h_in
    return torch.cat(
        [
            top.values,
            top.values[..., :1] - top.values[..., 1:2],
            -(probs * logp).sum(dim=-1, keepdim=True),
            logp.gather(-1, top1),
            (prev_top1 == top1).float(),
            logp_prev.gather(-1, top1).exp(),
            probs.gather(-1, prev_top1),
            (probs * (logp - logp_prev)).sum(dim=-1, keepdim=True),
            delta.norm(dim=-1, keepdim=True),
            h_out.norm(dim=-1, keepdim=True),
            torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)[..., None],
        ],
        dim=-1,
    )


def _rows(x: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if x is None else x.reshape(-1, x.shape[-1])[part]


def lens_features_chunked(state: LayerState, chunk: int = LENS_CHUNK, *, candidates: int | None = None) -> torch.Tensor:
    """:func:`lens_features` in chunks of ``chunk`` tokens, so many tokens never hold all their logits at once.

    Cached logits and candidate ids on ``state`` are sliced along (candidates are picked for all tokens first);
    the result equals :func:`lens_features` of the whole state.
    """
    h_out = state.h_out.reshape(-1, state.h_out.shape[-1])
    if h_out.shape[0] <= chunk:
        return lens_features(state, candidates=candidates)
    if state.h_in is None:
        raise ValueError("lens features need h_in (the state before the block)")
    if candidates is not None and state.candidates is None:
        pick_candidates(state, candidates)
    h_in = state.h_in.reshape(-1, state.h_in.shape[-1])
    parts = []
    for start in range(0, h_out.shape[0], chunk):
        part = slice(start, start + chunk)
        piece = LayerState(
            layer=state.layer, h_out=h_out[part], h_in=h_in[part], lens=state.lens,
            logits=_rows(state.cached_logits, part), logits_in=_rows(state.cached_logits_in, part),
            candidates=_rows(state.candidates, part),
        )  # fmt: skip
        piece.cached_candidate_logits = _rows(state.cached_candidate_logits, part)
        piece.cached_candidate_logits_in = _rows(state.cached_candidate_logits_in, part)
        parts.append(lens_features(piece, candidates=candidates))
    return torch.cat(parts).reshape(*state.h_out.shape[:-1], -1)
