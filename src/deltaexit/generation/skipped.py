"""Blocks the model itself skips on token ids alone, under early-exit generation.

Some causal LMs skip blocks when a forward has only text inputs: Mllama's cross-attention blocks run only with
image features (``cross_attention_states``). On such a forward each skipped block is an identity map of the
residual stream (:attr:`deltaexit.structure.ModelStructure.skipped`). Early exit generates from token ids alone,
so it skips them exactly as the model does (:class:`~deltaexit.generation.runner.BlockRunner` passes the state
through), never exits after one, and gives their cache layers a :class:`SkippedLayer`: a no-cache layer that
every KV policy passes over and that the model reads as "holds nothing".

Example:
    >>> from transformers import DynamicCache
    >>> cache = DynamicCache()
    >>> fill_skipped_layers(cache, frozenset({0}), 1)
    >>> [type(layer).__name__ for layer in cache.layers]
    ['SkippedLayer']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers.cache_utils import DummyLayer

__all__ = ["TEXT_INPUTS", "SkippedLayer", "check_text_only", "fill_skipped_layers"]

#: Model keywords of a text-only forward (anything else given as a tensor may make a skipped block run).
TEXT_INPUTS = frozenset(
    {"input_ids", "attention_mask", "position_ids", "token_type_ids", "cache", "past_key_values", "cache_position"}
)


class SkippedLayer(DummyLayer):
    """The cache layer of a block the model skips on token ids alone: stores nothing, and reads as never filled
    (``is_initialized`` False, no keys), so the model goes on skipping its block."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.is_initialized = False

    def get_seq_length(self) -> int:
        return 0


def _is_empty(layer: Any) -> bool:
    keys = getattr(layer, "keys", None)
    return not getattr(layer, "is_initialized", False) or not isinstance(keys, torch.Tensor) or keys.numel() == 0


def fill_skipped_layers(cache: Any, skipped: Iterable[int], num_layers: int) -> None:
    """Give each skipped block of ``cache`` (a ``DynamicCache`` after the prompt) a :class:`SkippedLayer`, padding
    its layer list to ``num_layers`` (a lazily built cache has none for trailing blocks that never ran).

    Raises ``ValueError`` if a skipped block's layer holds states (the block ran: given image features?)."""
    skipped = sorted(set(skipped))
    layers = getattr(cache, "layers", None)
    if not skipped or not isinstance(layers, list):
        return
    full = [i for i in skipped if i < len(layers) and not _is_empty(layers[i])]
    if full:
        raise ValueError(
            f"the cache layers of blocks {full} hold states, but the model skips those blocks on token ids alone "
            "(structure.skipped): early exit generates from token ids alone; use model.generate for image inputs."
        )
    while len(layers) < num_layers and len(layers) in skipped:
        layers.append(SkippedLayer())
    for i in skipped:
        if i < len(layers):
            layers[i] = SkippedLayer()


def check_text_only(kwargs: dict[str, Any], skipped: Iterable[int]) -> None:
    """Refuse tensor inputs other than the text ones when the model skips blocks without them (``ValueError``,
    raised before any block runs): those blocks would run on the prompt, and early exit skips them."""
    blocks = sorted(set(skipped))
    extra = sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in TEXT_INPUTS)
    if blocks and extra:
        raise ValueError(
            f"EarlyExit: this model skips blocks {blocks} on token ids alone (e.g. cross-attention blocks without "
            f"image features) and early exit generates from token ids alone; got {', '.join(extra)}. Pass the text "
            "inputs only, or use model.generate for image inputs."
        )
