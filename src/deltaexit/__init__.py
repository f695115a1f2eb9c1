"""deltaexit: token-level early exit for HuggingFace causal LMs, driven by the residual delta.

Example:
    >>> import deltaexit as dx
    >>> with dx.collect(model) as trace:          # doctest: +SKIP
    ...     model(input_ids=ids, attention_mask=mask)
    >>> lens = dx.Lens.from_model(model)          # doctest: +SKIP
    >>> sat = dx.saturation(trace, lens)          # doctest: +SKIP
"""

from deltaexit._version import __version__
from deltaexit.analysis import analyze
from deltaexit.calibration import CalibrationResult, calibrate
from deltaexit.collector import FEATURES, Collector, Record, Trace, TraceError, collect
from deltaexit.evaluation import evaluate_measures, evaluate_scores
from deltaexit.features import StateSet, collect_states
from deltaexit.generation import DecayingThreshold, EarlyExit, EarlyExitOutput, GenerationStats
from deltaexit.lens import Lens
from deltaexit.measures import (
    ConfidenceMeasure,
    LayerState,
    TrainableMeasure,
    available_measures,
    get_measure,
    load_measure,
    register_measure,
)
from deltaexit.reference import load_reference, reference_path
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
    "CalibrationResult",
    "Collector",
    "ConfidenceMeasure",
    "DecayingThreshold",
    "EarlyExit",
    "EarlyExitOutput",
    "GenerationStats",
    "LayerState",
    "Lens",
    "Manifest",
    "ManifestError",
    "ModelStructure",
    "Record",
    "Saturation",
    "ShardDataset",
    "StateSet",
    "StructureError",
    "Trace",
    "TraceError",
    "TrainableMeasure",
    "__version__",
    "analyze",
    "available_measures",
    "calibrate",
    "collect",
    "collect_states",
    "collect_to_disk",
    "evaluate_measures",
    "evaluate_scores",
    "find_structure",
    "get_measure",
    "iter_batches",
    "load_features",
    "load_measure",
    "load_reference",
    "merge_manifests",
    "reference_path",
    "register_measure",
    "saturation",
    "saturation_from_topk",
]
