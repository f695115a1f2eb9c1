"""``delta-mlp``: the thesis, a small MLP on block ``l``'s delta vector.

Example:
    >>> m = DeltaMLP(per_layer=True)
    >>> m.display_name, m.inputs, m.hidden_units
    ('delta-mlp/per-layer', ('delta',), 64)
"""

from __future__ import annotations

from typing import ClassVar

from deltaexit.measures.base import register_measure
from deltaexit.measures.trainable import TrainableMeasure

__all__ = ["DeltaMLP"]


@register_measure
class DeltaMLP(TrainableMeasure):
    """The thesis: a small MLP (64 GELU units) on block ``l``'s delta vector.

    Its parameters are :class:`~deltaexit.measures.trainable.TrainableMeasure`'s, with the same defaults.
    """

    name: ClassVar[str] = "delta-mlp"
