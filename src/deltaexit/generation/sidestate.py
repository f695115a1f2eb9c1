"""Recurrent states a cache class of its own keeps beside its layers, viewed as recurrent cache layers.

MiniMax's ``MiniMaxCache`` (a ``DynamicCache`` subclass, the only cache its forward accepts) keeps each Lightning
attention block's state in a side list (``linear_cache[i]``, written by ``set_linear_cache``; ``[]`` for the blocks
without one) outside its layers. A :class:`SideStateLayer` in layer ``i`` views entry ``i`` of such a list as its
recurrent state ``0``: reading it reads the list, writing it writes the list. The recurrent-state machinery of
:mod:`deltaexit.generation.recurrent` then snapshots, restores and advances those states as it does any
``LinearAttentionLayer``'s, and the key/value layers stay plain ``DynamicLayer`` objects that
:func:`~deltaexit.generation.kv.crop_cache` crops directly (never through the class's own ``crop``).

Example:
    >>> import torch
    >>> states = [[], torch.zeros(1, 2)]
    >>> layer = SideStateLayer(states, 1)
    >>> layer.recurrent_states[0] = torch.ones(1, 2)
    >>> states[1].tolist()
    [[1.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from transformers.cache_utils import LinearAttentionLayer

__all__ = ["SideStateLayer", "is_side_list"]


class _SideSlot(MutableMapping[int, Any]):
    """State ``0`` of a :class:`SideStateLayer`: entry ``index`` of the cache's side list."""

    def __init__(self, states: list[Any], index: int) -> None:
        self.states = states
        self.index = index

    def __getitem__(self, key: int) -> torch.Tensor | None:
        if key != 0:
            raise KeyError(key)
        value = self.states[self.index]
        return value if isinstance(value, torch.Tensor) else None

    def __setitem__(self, key: int, value: Any) -> None:
        if key != 0:
            raise KeyError(key)
        self.states[self.index] = value

    def __delitem__(self, key: int) -> None:
        raise TypeError("a side-list state cannot be deleted")

    def __iter__(self) -> Iterator[int]:
        return iter((0,))

    def __len__(self) -> int:
        return 1


class SideStateLayer(LinearAttentionLayer):
    """A recurrent cache layer whose one recurrent state is entry ``index`` of a cache's side list (``states``)."""

    def __init__(self, states: list[Any], index: int) -> None:
        super().__init__(number_of_states=1)
        self.recurrent_states = _SideSlot(states, index)  # type: ignore[assignment]


def is_side_list(value: Any, num_layers: int) -> bool:
    """Whether ``value`` looks like a per-block side list of states: a list of at most ``num_layers`` entries, each
    a tensor or empty (``[]``/None, a block without one), at least one a tensor."""
    if not isinstance(value, list) or not value or len(value) > num_layers:
        return False
    if not all(isinstance(v, torch.Tensor) or v is None or (isinstance(v, list) and not v) for v in value):
        return False
    return any(isinstance(v, torch.Tensor) for v in value)
