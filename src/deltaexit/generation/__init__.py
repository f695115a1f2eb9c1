"""Early-exit generation: the :class:`EarlyExit` loop, KV policies, thresholds and outputs.

Example:
    >>> from deltaexit.generation import EarlyExit, DecayingThreshold   # doctest: +SKIP
"""

from deltaexit.exits import (
    ConstantThreshold,
    DecayingThreshold,
    PerLayerThreshold,
    ThresholdSchedule,
    as_schedule,
)
from deltaexit.generation.cost import CostModel
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.kv import KV_POLICIES, UnsupportedCacheError
from deltaexit.generation.outputs import EarlyExitOutput, GenerationStats

__all__ = [
    "KV_POLICIES",
    "ConstantThreshold",
    "CostModel",
    "DecayingThreshold",
    "EarlyExit",
    "EarlyExitOutput",
    "GenerationStats",
    "PerLayerThreshold",
    "ThresholdSchedule",
    "UnsupportedCacheError",
    "as_schedule",
]
