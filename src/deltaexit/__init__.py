"""deltaexit: token-level early exit for HuggingFace causal LMs, driven by the residual delta.

Example:
    >>> import deltaexit as dx
    >>> with dx.collect(model) as trace:          # doctest: +SKIP
    ...     model(input_ids=ids, attention_mask=mask)
    >>> lens = dx.Lens.from_model(model)          # doctest: +SKIP
    >>> sat = dx.saturation(trace, lens)          # doctest: +SKIP
"""

from deltaexit._version import __version__
from deltaexit.collector import FEATURES, Collector, Record, Trace, TraceError, collect
from deltaexit.lens import Lens
from deltaexit.saturation import Saturation, saturation, saturation_from_topk
from deltaexit.streaming import (
    Manifest,
    ManifestError,
    ShardDataset,
    collect_to_disk,
    iter_batches,
    load_features,
    merge_manifests,
)
from deltaexit.structure import ModelStructure, StructureError, find_structure

__all__ = [
    "FEATURES",
    "Collector",
    "Lens",
    "Manifest",
    "ManifestError",
    "ModelStructure",
    "Record",
    "Saturation",
    "ShardDataset",
    "StructureError",
    "Trace",
    "TraceError",
    "__version__",
    "collect",
    "collect_to_disk",
    "find_structure",
    "iter_batches",
    "load_features",
    "merge_manifests",
    "saturation",
    "saturation_from_topk",
]
