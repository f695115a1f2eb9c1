"""Calibrated early exit: thresholds with a (delta, epsilon) guarantee via Learn-then-Test.

* :func:`calibrate` (also ``dx.calibrate``): the most aggressive certified threshold.
* :class:`CalibrationResult`: what was certified; saves/loads as JSON (+ safetensors).
* :mod:`~deltaexit.calibration.bounds`: Hoeffding, Bentkus and Hoeffding–Bentkus p-values.
* :mod:`~deltaexit.calibration.ltt`: fixed-sequence Learn-then-Test over ordered candidates.
* :mod:`~deltaexit.calibration.risk`: per-example losses; the generation adapter.
* :mod:`~deltaexit.calibration.simulate`: the offline exit simulator (one forward per sweep).

Example:
    >>> import deltaexit as dx
    >>> result = dx.calibrate(model, prompts, delta=0.05, epsilon=0.1)  # doctest: +SKIP
"""

from deltaexit.calibration.api import calibrate, candidate_thresholds, make_threshold, quantile_levels
from deltaexit.calibration.bounds import (
    bentkus_pvalue,
    hb_pvalue,
    hoeffding_pvalue,
    min_examples,
    upper_confidence_bound,
)
from deltaexit.calibration.ltt import (
    InsufficientCalibrationData,
    LTTOutcome,
    fixed_sequence_test,
    learn_then_test,
)
from deltaexit.calibration.result import CalibrationFileError, CalibrationResult
from deltaexit.calibration.risk import (
    GenerationLosses,
    risk_consistency,
    sequence_disagreement,
    token_disagreement,
)
from deltaexit.calibration.simulate import (
    CalmDecay,
    ExitTable,
    continuation_table,
    exit_table,
    greedy_continuations,
)

__all__ = [
    "CalibrationFileError",
    "CalibrationResult",
    "CalmDecay",
    "ExitTable",
    "GenerationLosses",
    "InsufficientCalibrationData",
    "LTTOutcome",
    "bentkus_pvalue",
    "calibrate",
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
    "quantile_levels",
    "risk_consistency",
    "sequence_disagreement",
    "token_disagreement",
    "upper_confidence_bound",
]
