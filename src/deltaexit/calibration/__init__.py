"""Calibrated early exit: thresholds with a (delta, epsilon) guarantee via Learn-then-Test.

* :func:`calibrate` (also ``dx.calibrate``): the most aggressive certified threshold; its settings
  are a :class:`CalibrationConfig` (or keywords).
* :class:`CalibrationResult`: what was certified; saves/loads as JSON (+ safetensors).
* :mod:`~deltaexit.calibration.bounds`: Hoeffding, Bentkus and Hoeffding–Bentkus p-values.
* :mod:`~deltaexit.calibration.ltt`: fixed-sequence Learn-then-Test over ordered candidates.
* :mod:`~deltaexit.calibration.losses`: the per-example losses (``"textual"``, ``"sequence"``, ``"risk"``).
* :mod:`~deltaexit.calibration.risk`: the generation adapter (real early-exit generation's losses).
* :mod:`~deltaexit.calibration.simulate`: the offline exit simulator (one forward per sweep).
* :mod:`~deltaexit.calibration.tolerant`: Learn-then-Test of ``kv="tolerant"``'s acceptance ratio
  (:func:`calibrate_tolerant` on a :func:`tolerance_table`).

Example:
    >>> import torch
    >>> result = calibrate(losses=lambda t: torch.zeros(100), thresholds=[1.0, 0.5], delta=0.05, epsilon=0.1,
    ...                    progress=False)
    >>> result.threshold, result.certified
    (0.5, True)
"""

from deltaexit.calibration.api import (
    CalibrationConfig,
    calibrate,
    candidate_thresholds,
    make_threshold,
    prompts_needed,
    quantile_levels,
)
from deltaexit.calibration.bounds import (
    bentkus_pvalue,
    hb_pvalue,
    hoeffding_pvalue,
    min_examples,
    upper_confidence_bound,
)
from deltaexit.calibration.losses import LOSSES, risk_consistency, sequence_disagreement, token_disagreement
from deltaexit.calibration.ltt import (
    InsufficientCalibrationData,
    LTTOutcome,
    fixed_sequence_test,
    learn_then_test,
)
from deltaexit.calibration.result import CalibrationFileError, CalibrationResult
from deltaexit.calibration.risk import GenerationLosses
from deltaexit.calibration.simulate import (
    CalmDecay,
    ExitTable,
    continuation_table,
    exit_table,
    greedy_continuations,
)
from deltaexit.calibration.tolerant import ToleranceTable, calibrate_tolerant, tolerance_table

__all__ = [
    "LOSSES",
    "CalibrationConfig",
    "CalibrationFileError",
    "CalibrationResult",
    "CalmDecay",
    "ExitTable",
    "GenerationLosses",
    "InsufficientCalibrationData",
    "LTTOutcome",
    "ToleranceTable",
    "bentkus_pvalue",
    "calibrate",
    "calibrate_tolerant",
    "candidate_thresholds",
    "continuation_table",
    "exit_table",
    "fixed_sequence_test",
    "greedy_continuations",
    "hb_pvalue",
    "hoeffding_pvalue",
    "learn_then_test",
    "make_threshold",
    "min_examples",
    "prompts_needed",
    "quantile_levels",
    "risk_consistency",
    "sequence_disagreement",
    "token_disagreement",
    "tolerance_table",
    "upper_confidence_bound",
]
