"""``hdelta-mlp``: a small MLP on ``[h_out, delta]`` of block ``l``.

Example:
    >>> m = HDeltaMLP()
    >>> m.display_name, m.inputs
    ('hdelta-mlp', ('h_out', 'delta'))
"""

from __future__ import annotations

from typing import ClassVar

from deltaexit.measures.base import register_measure
from deltaexit.measures.trainable import TrainableMeasure

__all__ = ["HDeltaMLP"]


@register_measure
class HDeltaMLP(TrainableMeasure):
    """A small MLP on ``[h_out, delta]`` of block ``l`` (the note's next step 1).

    Takes the parameters of :class:`~deltaexit.measures.trainable.TrainableMeasure`, with ``features="h+delta"``.
    """

    name: ClassVar[str] = "hdelta-mlp"

    def __init__(
        self,
        *,
        features: str = "h+delta",
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
        class_weight: str | None = "balanced",
        verbose: bool = False,
    ) -> None:
        super().__init__(
            features=features, hidden_units=hidden_units, per_layer=per_layer, label=label, max_epochs=max_epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, val_fraction=val_fraction, patience=patience,
            seed=seed, class_weight=class_weight, verbose=verbose,
        )  # fmt: skip
