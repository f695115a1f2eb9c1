"""deltaexit: token-level early exit for HuggingFace causal LMs, driven by the residual delta.

The names below are imported lazily (PEP 562): ``import deltaexit`` is cheap, and
``dx.X`` loads the submodule that defines ``X`` on first use.

Example:
    >>> import torch
    >>> import deltaexit as dx
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> with dx.collect(model, topk=1) as trace:
    ...     _ = model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    >>> sat = dx.saturation(trace)
    >>> sat.saturation_layer.shape  # one exit layer per token
    torch.Size([1, 4])
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from deltaexit._version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below imports on demand
    from deltaexit.analysis import AnalyzeConfig, analyze
    from deltaexit.calibration import (
        CalibrationFileError,
        CalibrationResult,
        InsufficientCalibrationData,
        calibrate,
    )
    from deltaexit.collector import FEATURES, Collector, NonFiniteError, Record, Trace, TraceError, collect
    from deltaexit.evaluation import evaluate_measures, evaluate_scores
    from deltaexit.exits import DecayingThreshold
    from deltaexit.features import StateSet, collect_states
    from deltaexit.generation import EarlyExit, EarlyExitOutput, GenerationStats
    from deltaexit.lens import Lens
    from deltaexit.measures import (
        ConfidenceMeasure,
        LayerState,
        MeasureFileError,
        TrainableMeasure,
        available_measures,
        get_measure,
        load_measure,
        register_measure,
    )
    from deltaexit.reference import load_reference, reference_path
    from deltaexit.saturation import Saturation, saturation, saturation_from_topk
    from deltaexit.stream_analysis import analyze_shards
    from deltaexit.streaming import (
        CollectConfig,
        Manifest,
        ManifestError,
        ShardDataset,
        collect_to_disk,
        iter_batches,
        load_features,
        merge_manifests,
    )
    from deltaexit.structure import ModelStructure, StructureError, find_structure
    from deltaexit.tuning import TuneConfig, TuneResult, tune

#: Where each public name lives: ``dx.NAME`` is ``importlib.import_module(EXPORTS[NAME]).NAME``.
EXPORTS: dict[str, str] = {
    "AnalyzeConfig": "deltaexit.analysis",
    "analyze": "deltaexit.analysis",
    "CalibrationFileError": "deltaexit.calibration",
    "CalibrationResult": "deltaexit.calibration",
    "InsufficientCalibrationData": "deltaexit.calibration",
    "calibrate": "deltaexit.calibration",
    "FEATURES": "deltaexit.collector",
    "Collector": "deltaexit.collector",
    "NonFiniteError": "deltaexit.collector",
    "Record": "deltaexit.collector",
    "Trace": "deltaexit.collector",
    "TraceError": "deltaexit.collector",
    "collect": "deltaexit.collector",
    "evaluate_measures": "deltaexit.evaluation",
    "evaluate_scores": "deltaexit.evaluation",
    "DecayingThreshold": "deltaexit.exits",
    "StateSet": "deltaexit.features",
    "collect_states": "deltaexit.features",
    "EarlyExit": "deltaexit.generation",
    "EarlyExitOutput": "deltaexit.generation",
    "GenerationStats": "deltaexit.generation",
    "Lens": "deltaexit.lens",
    "ConfidenceMeasure": "deltaexit.measures",
    "LayerState": "deltaexit.measures",
    "MeasureFileError": "deltaexit.measures",
    "TrainableMeasure": "deltaexit.measures",
    "available_measures": "deltaexit.measures",
    "get_measure": "deltaexit.measures",
    "load_measure": "deltaexit.measures",
    "register_measure": "deltaexit.measures",
    "load_reference": "deltaexit.reference",
    "reference_path": "deltaexit.reference",
    "Saturation": "deltaexit.saturation",
    "saturation": "deltaexit.saturation",
    "saturation_from_topk": "deltaexit.saturation",
    "analyze_shards": "deltaexit.stream_analysis",
    "Manifest": "deltaexit.streaming",
    "ManifestError": "deltaexit.streaming",
    "ShardDataset": "deltaexit.streaming",
    "CollectConfig": "deltaexit.streaming",
    "collect_to_disk": "deltaexit.streaming",
    "iter_batches": "deltaexit.streaming",
    "load_features": "deltaexit.streaming",
    "merge_manifests": "deltaexit.streaming",
    "ModelStructure": "deltaexit.structure",
    "StructureError": "deltaexit.structure",
    "find_structure": "deltaexit.structure",
    "TuneConfig": "deltaexit.tuning",
    "TuneResult": "deltaexit.tuning",
    "tune": "deltaexit.tuning",
}

__all__ = [
    "FEATURES",
    "AnalyzeConfig",
    "CalibrationFileError",
    "CalibrationResult",
    "CollectConfig",
    "Collector",
    "ConfidenceMeasure",
    "DecayingThreshold",
    "EarlyExit",
    "EarlyExitOutput",
    "GenerationStats",
    "InsufficientCalibrationData",
    "LayerState",
    "Lens",
    "Manifest",
    "ManifestError",
    "MeasureFileError",
    "ModelStructure",
    "NonFiniteError",
    "Record",
    "Saturation",
    "ShardDataset",
    "StateSet",
    "StructureError",
    "Trace",
    "TraceError",
    "TrainableMeasure",
    "TuneConfig",
    "TuneResult",
    "__version__",
    "analyze",
    "analyze_shards",
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
    "tune",
]


def __getattr__(name: str) -> Any:
    """Import the submodule defining ``name`` on first access (PEP 562), then cache the value here.

    A submodule name (``dx.generation``, ``dx.measures`` ...) imports that submodule, as an eager package would.
    """
    module_name = EXPORTS.get(name)
    if module_name is not None:
        value = getattr(importlib.import_module(module_name), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's own names plus every lazily exported one."""
    return sorted(set(globals()) | set(__all__))


class _Facade(types.ModuleType):
    """The package module: an exported name shadows the submodule of the same name (``dx.saturation``).

    Importing ``deltaexit.saturation`` makes the import system set the package attribute ``saturation`` to the
    submodule; the eager facade used to overwrite it with the function, and this keeps that meaning.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Facade
