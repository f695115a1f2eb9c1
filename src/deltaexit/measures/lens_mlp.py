"""``lens-mlp``: a small MLP on logit-lens summary features (:mod:`deltaexit.measures.lens_features`).

Example:
    >>> import torch
    >>> from deltaexit.lens import Lens
    >>> from deltaexit.measures.base import LayerState
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=2, hidden=32)
    >>> g = torch.Generator().manual_seed(0)
    >>> h = torch.randn(40, 32, generator=g)
    >>> state = LayerState(layer=0, h_in=h, h_out=2 * h, lens=Lens.from_model(model))
    >>> m = LensMLP(max_epochs=1)
    >>> m.needs("lens"), m.needs("h_in"), m.class_weight
    (True, True, None)
    >>> with torch.no_grad():
    ...     x = m.raw_features(state)
    >>> m.fit([state], [x[:, 0] > x[:, 0].median()]).score(state).shape
    torch.Size([40])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from deltaexit.measures.base import LayerState, register_measure
from deltaexit.measures.candidates import (
    candidate_head_flops,
    carry_candidates,
    check_candidates,
    check_candidates_for_vocab,
)
from deltaexit.measures.cost import lens_head_flops
from deltaexit.measures.lens_features import LENS_FEATURE_NAMES, lens_features_chunked
from deltaexit.measures.trainable import TrainableMeasure

__all__ = ["LensMLP"]


@register_measure
class LensMLP(TrainableMeasure):
    """A small MLP on logit-lens summary features (:func:`~deltaexit.measures.lens_features.lens_features`).

    It is CALM's learned classifier fed what the softmax response, "Looking Beyond the Top-1" and state
    propagation look at, plus how the lens's prediction moved in the last block.

    Takes the parameters of :class:`~deltaexit.measures.trainable.TrainableMeasure`, with
    ``features="lens"`` (the only choice) and ``class_weight=None``: the score is then the log-odds
    of the posterior "safe to exit", so one threshold means about the same risk at every layer
    (class-balanced fits rank tokens within a layer but shift the scale from layer to layer). Costs
    one lens call per scored layer: the early-exit loop hands the previous layer's lens logits on
    (``LayerState(logits_in=...)``); only the first scored layer of a step also runs the lens on its ``h_in``.

    With ``candidates=K`` the features are computed over each token's ``K`` candidate tokens (the top-``K`` of
    the full lens at its first scored layer; :mod:`deltaexit.measures.candidates`): ``K`` rows of the head per
    later decision. Fit and score with the same ``candidates``: :meth:`fit_features` picks them at the lowest layer
    of the given states and hands them to the others.
    """

    name: ClassVar[str] = "lens-mlp"
    needs_lens: ClassVar[bool] = True

    def __init__(
        self,
        *,
        features: str = "lens",
        hidden_units: int = 64,
        per_layer: bool = False,
        label: str = "next",
        max_epochs: int = 30,
        batch_size: int = 1024,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        val_fraction: float = 0.15,
        patience: int = 4,
        seed: int = 0,
        class_weight: str | None = None,
        verbose: bool = False,
        candidates: int | None = None,
    ) -> None:
        self.candidates = check_candidates(candidates, minimum=4)
        super().__init__(
            features=features, hidden_units=hidden_units, per_layer=per_layer, label=label, max_epochs=max_epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, val_fraction=val_fraction, patience=patience,
            seed=seed, class_weight=class_weight, verbose=verbose,
        )  # fmt: skip

    def _assign_params(self, **params: Any) -> None:
        self.candidates = check_candidates(params.get("candidates", self.candidates), minimum=4)
        super()._assign_params(**params)

    @property
    def display_name(self) -> str:
        """As :attr:`TrainableMeasure.display_name`, with ``@K`` for a candidate set (e.g. ``lens-mlp@64``)."""
        name = super().display_name
        return name if self.candidates is None else f"{name}@{self.candidates}"

    def raw_features(self, state: LayerState) -> torch.Tensor:
        """Lens features, in chunks of tokens so a fit on many tokens never holds all their logits."""
        return lens_features_chunked(state, candidates=self.candidates)

    def fit_features(self, states: Sequence[LayerState]) -> list[torch.Tensor]:
        """As :meth:`TrainableMeasure.fit_features`; with ``candidates``, the lowest layer's state picks each
        token's candidates and the other states (the same tokens at later layers) take them over."""
        states = list(states)
        if self.candidates is not None and states:
            carry_candidates(states, self.candidates)
        return super().fit_features(states)

    def check_sizes(self, hidden_size: int, vocab_size: int) -> None:
        check_candidates_for_vocab(self.candidates, vocab_size)

    def flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        n_in = len(LENS_FEATURE_NAMES)
        h = self.hidden_units
        n = vocab_size if self.candidates is None else self.candidates
        head = (
            lens_head_flops(hidden_size, vocab_size)
            if self.candidates is None
            else candidate_head_flops(hidden_size, n)
        )
        # log-softmax of both layers' logits, top-k, gathers, entropy and KL over the vocabulary (or candidates)
        lens_stats = 14.0 * n
        states = 10.0 * hidden_size  # delta, two norms, cosine
        mlp = 2.0 * n_in + 2.0 * n_in * h + 12.0 * h + 1.0
        return head + lens_stats + states + mlp

    def setup_flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        if self.candidates is None:
            return 0.0
        # the full head and a top-K at the first scored layer, plus K rows for its h_in (no earlier layer hands
        # them on), instead of the K rows a later decision reads
        return lens_head_flops(hidden_size, vocab_size) + vocab_size * math.log2(self.candidates)
