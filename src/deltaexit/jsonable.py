"""Make results valid JSON: non-finite floats (NaN, inf) become None, tuples become lists.

Example:
    >>> json_clean({"auroc": float("nan"), "threshold": float("-inf"), "f1": [0.5, (1.0,)]})
    {'auroc': None, 'threshold': None, 'f1': [0.5, [1.0]]}
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["json_clean"]


def json_clean(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None, recursively through dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
