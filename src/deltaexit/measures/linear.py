"""``linear``: CALM's early-exit classifier, logistic regression on the delta (default) or on ``h``.

Example:
    >>> m = LinearExit(features="h")
    >>> m.display_name, m.inputs, m.hidden_units
    ('linear(h)', ('h_out',), 0)
"""

from __future__ import annotations

from typing import ClassVar

from deltaexit.measures.base import register_measure
from deltaexit.measures.trainable import TrainableMeasure

__all__ = ["LinearExit"]


@register_measure
class LinearExit(TrainableMeasure):
    """CALM's early-exit classifier: logistic regression on ``delta`` (default) or ``h`` (``features="h"``).

    Takes the parameters of :class:`~deltaexit.measures.trainable.TrainableMeasure`, with ``hidden_units=0``.
    """

    name: ClassVar[str] = "linear"

    def __init__(
        self,
        *,
        features: str = "delta",
        hidden_units: int = 0,
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
