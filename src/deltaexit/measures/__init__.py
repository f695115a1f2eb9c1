"""Confidence measures: one interface (:class:`ConfidenceMeasure`), a registry by name.

Built in (higher score = safer to exit):

- ``softmax-max``, ``softmax-gap``: CALM's softmax response on the lens after block ``l``.
- ``state-cosine``: CALM's state propagation, ``cos(h_in, h_out)`` of block ``l``.
- ``delta-norm`` (``-‖delta‖``), ``delta-ratio`` (``-‖delta‖/‖h_in‖``).
- ``linear``: logistic exit classifier (on ``delta`` by default, or ``h``).
- ``delta-mlp``: small MLP on the delta; ``hdelta-mlp``: MLP on ``[h, delta]``.
- ``lens-mlp``: small MLP on logit-lens summary features and their change over the last block.

Example:
    >>> from deltaexit.measures import available_measures
    >>> "delta-mlp" in available_measures()
    True
"""

from deltaexit.measures.base import (
    ConfidenceMeasure,
    LayerState,
    available_measures,
    get_measure,
    register_measure,
)
from deltaexit.measures.cost import block_flops_per_token, measure_cost
from deltaexit.measures.simple import DeltaNorm, DeltaRatio, SoftmaxGap, SoftmaxMax, StateCosine
from deltaexit.measures.trainable import (
    FORMAT_VERSION,
    DeltaMLP,
    ExitNet,
    HDeltaMLP,
    LensMLP,
    LinearExit,
    MeasureFileError,
    TrainableMeasure,
    lens_features,
    load_measure,
)

__all__ = [
    "FORMAT_VERSION",
    "ConfidenceMeasure",
    "DeltaMLP",
    "DeltaNorm",
    "DeltaRatio",
    "ExitNet",
    "HDeltaMLP",
    "LayerState",
    "LensMLP",
    "LinearExit",
    "MeasureFileError",
    "SoftmaxGap",
    "SoftmaxMax",
    "StateCosine",
    "TrainableMeasure",
    "available_measures",
    "block_flops_per_token",
    "get_measure",
    "lens_features",
    "load_measure",
    "measure_cost",
    "register_measure",
]
