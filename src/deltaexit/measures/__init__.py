"""Confidence measures: one interface (:class:`ConfidenceMeasure`), a registry by name."""

from deltaexit.measures.base import (
    ConfidenceMeasure,
    LayerState,
    available_measures,
    get_measure,
    register_measure,
)

__all__ = [
    "ConfidenceMeasure",
    "LayerState",
    "available_measures",
    "get_measure",
    "register_measure",
]
