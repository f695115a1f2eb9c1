"""Confidence measures: one interface (:class:`ConfidenceMeasure`), a registry by name.

Built in (higher score = safer to exit):

- ``softmax-max``, ``softmax-gap``: CALM's softmax response on the lens after block ``l``.
- ``state-cosine``: CALM's state propagation, ``cos(h_in, h_out)`` of block ``l``.
- ``delta-norm`` (``-‖delta‖``), ``delta-ratio`` (``-‖delta‖/‖h_in‖``).
- ``linear``: logistic exit classifier (on ``delta`` by default, or ``h``).
- ``delta-mlp``: small MLP on the delta; ``hdelta-mlp``: MLP on ``[h, delta]``.
- ``lens-mlp``: small MLP on logit-lens summary features and their change over the last block.

Modules: ``base`` (the interface, :class:`LayerState`, the registry), ``simple`` (training-free
measures), ``cost`` (FLOPs), ``lens_features``, ``nets`` (:class:`ExitNet`), ``fit`` (the training
function), ``stream_fit`` (the same training out of core, from a stream of batches or shards, on one or
many ``torch.distributed`` ranks), ``fitted`` (the fitted state and its files), ``trainable`` (the
trainable base and :func:`load_measure`), and one module per trainable measure.

Trainable measures fit in memory, ``measure.fit(states, labels)``, or out of core,
``measure.fit(dx.ShardDataset("feats/"))`` (any re-iterable of ``(states, labels)`` batches too).

Example:
    >>> from deltaexit.measures import available_measures
    >>> "delta-mlp" in available_measures()
    True
"""

from deltaexit.measures.base import (
    INPUT_NAMES,
    ConfidenceMeasure,
    LayerState,
    available_measures,
    get_measure,
    register_measure,
)
from deltaexit.measures.cost import block_flops_per_token, lens_head_flops, measure_cost
from deltaexit.measures.delta_mlp import DeltaMLP
from deltaexit.measures.fit import FitSettings, fit_exit_net
from deltaexit.measures.fitted import FORMAT_VERSION, FittedState, MeasureFileError
from deltaexit.measures.hdelta_mlp import HDeltaMLP
from deltaexit.measures.lens_features import LENS_FEATURE_NAMES, lens_features, lens_features_chunked
from deltaexit.measures.lens_mlp import LensMLP
from deltaexit.measures.linear import LinearExit
from deltaexit.measures.nets import ExitNet
from deltaexit.measures.simple import DeltaNorm, DeltaRatio, SoftmaxGap, SoftmaxMax, StateCosine
from deltaexit.measures.stream_fit import DEFAULT_SHUFFLE_ROWS, Chunk, FitSource, fit_exit_net_stream
from deltaexit.measures.trainable import TrainableMeasure, load_measure

__all__ = [
    "DEFAULT_SHUFFLE_ROWS",
    "FORMAT_VERSION",
    "INPUT_NAMES",
    "LENS_FEATURE_NAMES",
    "Chunk",
    "ConfidenceMeasure",
    "DeltaMLP",
    "DeltaNorm",
    "DeltaRatio",
    "ExitNet",
    "FitSettings",
    "FitSource",
    "FittedState",
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
    "fit_exit_net",
    "fit_exit_net_stream",
    "get_measure",
    "lens_features",
    "lens_features_chunked",
    "lens_head_flops",
    "load_measure",
    "measure_cost",
    "register_measure",
]
