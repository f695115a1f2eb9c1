"""A full-length, croppable cache layer that shows its block the keys a sliding-window layer would return.

Some models apply their sliding window only through ``transformers``' ``DynamicSlidingWindowLayer``: its
``update`` returns the last ``sliding_window - 1`` cached keys/values followed by the new ones (it drops the
older ones), and its ``get_mask_sizes`` sizes the (plain causal) mask for exactly those keys. Early exit needs
layers it can crop back (rejected drafts, held-back tokens), so :class:`CacheWindowLayer` keeps every position,
like a ``DynamicLayer``, and returns from ``update`` (and reports to the mask) what the sliding layer would have:
the same keys, values and mask, step for step, as ``model.generate``'s cache.

A multi-token pass over such a layer differs from one-token steps (each token of the pass sees the window before
the pass plus the pass's earlier tokens), as it does in ``transformers``: ``verify`` checks its drafts one token at
a time on these caches (:func:`deltaexit.generation.recurrent.steps_one_at_a_time`).

Example:
    >>> import torch
    >>> layer = CacheWindowLayer(sliding_window=3)
    >>> keys, _ = layer.update(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2))  # a prompt: every key
    >>> keys.shape[-2], layer.get_mask_sizes(1)
    (5, (3, 3))
    >>> keys, _ = layer.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))  # a step: window - 1 past + new
    >>> keys.shape[-2], layer.get_seq_length()
    (3, 6)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

__all__ = ["CacheWindowLayer"]


class CacheWindowLayer(DynamicLayer):
    """A ``DynamicLayer`` (every position kept, croppable) whose ``update`` and mask sizes are a sliding layer's.

    Args:
        sliding_window: The window of the ``DynamicSlidingWindowLayer`` it stands in for.
    """

    is_sliding = True

    def __init__(self, sliding_window: int) -> None:
        super().__init__()
        self.sliding_window = int(sliding_window)

    def _past_shown(self, past: int) -> int:
        """How many of ``past`` cached positions a sliding layer still holds (it keeps ``window - 1``)."""
        return past if self.sliding_window <= 1 else min(past, self.sliding_window - 1)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (all positions kept); return the sliding layer's: its kept past, then the new."""
        past = self.get_seq_length()
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        first = past - self._past_shown(past)
        return keys[..., first:, :], values[..., first:, :]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The sliding layer's key length and offset for the mask (``DynamicSlidingWindowLayer.get_mask_sizes``)."""
        past = self.get_seq_length()
        shown = self._past_shown(past)
        return shown + query_length, past - shown
