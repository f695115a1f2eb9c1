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

from typing import ClassVar

import torch

from deltaexit.measures.base import LayerState, register_measure
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
    ) -> None:
        super().__init__(
            features=features, hidden_units=hidden_units, per_layer=per_layer, label=label, max_epochs=max_epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, val_fraction=val_fraction, patience=patience,
            seed=seed, class_weight=class_weight, verbose=verbose,
        )  # fmt: skip

    def raw_features(self, state: LayerState) -> torch.Tensor:
        """Lens features, in chunks of tokens so a fit on many tokens never holds all their logits."""
        return lens_features_chunked(state)

    def flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        n_in = len(LENS_FEATURE_NAMES)
        h = self.hidden_units
        head = lens_head_flops(hidden_size, vocab_size)
        # log-softmax of both layers' logits, top-k, gathers, entropy and KL over the vocabulary
        lens_stats = 14.0 * vocab_size
        states = 10.0 * hidden_size  # delta, two norms, cosine
        mlp = 2.0 * n_in + 2.0 * n_in * h + 12.0 * h + 1.0
        return head + lens_stats + states + mlp
