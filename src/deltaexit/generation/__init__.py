"""Early-exit generation: the :class:`EarlyExit` loop, KV policies, thresholds and outputs.

Example:
    >>> from deltaexit.generation import EarlyExit, Verify, get_policy
    >>> get_policy("propagate")
    Propagate(query_skip=True)
"""

# The shipped KV policies, registered in this order (the default first); a new policy is a new module here.
from deltaexit.generation.verify import Verify  # isort: skip
from deltaexit.generation.propagate import Propagate  # isort: skip
from deltaexit.generation.recompute import Recompute  # isort: skip
from deltaexit.generation.tolerant import Tolerant  # isort: skip

# isort: split
from deltaexit.exits import (
    ConstantThreshold,
    DecayingThreshold,
    PerLayerThreshold,
    ThresholdSchedule,
    as_schedule,
)
from deltaexit.generation.cost import CostModel
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.kv import UnsupportedCacheError
from deltaexit.generation.outputs import EarlyExitOutput, GenerationStats
from deltaexit.generation.policy import KV_POLICIES, KVPolicy, get_policy, register_policy

__all__ = [
    "KV_POLICIES",
    "ConstantThreshold",
    "CostModel",
    "DecayingThreshold",
    "EarlyExit",
    "EarlyExitOutput",
    "GenerationStats",
    "KVPolicy",
    "PerLayerThreshold",
    "Propagate",
    "Recompute",
    "ThresholdSchedule",
    "Tolerant",
    "UnsupportedCacheError",
    "Verify",
    "as_schedule",
    "get_policy",
    "register_policy",
]
