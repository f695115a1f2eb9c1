"""deltaexit: token-level early exit for HuggingFace causal LMs, driven by the residual delta.

Example:
    >>> import deltaexit as dx
    >>> with dx.collect(model) as trace:          # doctest: +SKIP
    ...     model(input_ids=ids, attention_mask=mask)
    >>> lens = dx.Lens.from_model(model)          # doctest: +SKIP
    >>> sat = dx.saturation(trace, lens)          # doctest: +SKIP
"""

from deltaexit._version import __version__
from deltaexit.calibration import CalibrationResult, calibrate
from deltaexit.collector import FEATURES, Collector, Record, Trace, TraceError, collect
from deltaexit.generation import DecayingThreshold, EarlyExit, EarlyExitOutput, GenerationStats
from deltaexit.lens import Lens
from deltaexit.saturation import Saturation, saturation, saturation_from_topk
from deltaexit.structure import ModelStructure, StructureError, find_structure

__all__ = [
    "FEATURES",
    "CalibrationResult",
    "Collector",
    "DecayingThreshold",
    "EarlyExit",
    "EarlyExitOutput",
    "GenerationStats",
    "Lens",
    "ModelStructure",
    "Record",
    "Saturation",
    "StructureError",
    "Trace",
    "TraceError",
    "__version__",
    "calibrate",
    "collect",
    "find_structure",
    "saturation",
    "saturation_from_topk",
]
