"""KV-cache helpers the KV policies share: checking, cropping and viewing a cache, and K/V-only block calls.

The policies themselves are classes in :mod:`deltaexit.generation.policy` (one module each). Every policy keeps
all layers' caches at the same length after every step. The only thing a policy needs from an architecture is
that each attention block stores its keys/values with ``cache.update(k, v, layer_idx)`` in a full-length
:class:`transformers.DynamicCache` layer, which holds for every architecture in
:data:`deltaexit.testing.ARCHITECTURES`; anything else (linear attention, static or quantised caches, KV shared
between layers) is detected after the prompt by :func:`check_cache` and refused with a clear error.

:func:`store_kv_only` (``propagate``'s K/V-only calls) can skip the query projection where the block's attention
has a separate one (:func:`deltaexit.structure.query_projection`): for the duration of the call it is swapped for
a stand-in that returns zeros of the right shape, since the queries are never used. The keys/values stored are
bit-for-bit those of the full projection and the model is restored after every call.

Example:
    >>> import torch
    >>> cache = fresh_cache()
    >>> for layer in range(3):
    ...     _ = cache.update(torch.zeros(1, 2, 12, 4), torch.zeros(1, 2, 12, 4), layer)
    >>> crop_cache(cache, 10)
    >>> cache_lengths(cache)
    [10, 10, 10]
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from deltaexit.structure import query_projection

__all__ = [
    "KVStored",
    "UnsupportedCacheError",
    "cache_layers",
    "cache_lengths",
    "cache_view",
    "check_cache",
    "crop_cache",
    "fresh_cache",
    "store_kv_only",
]


class UnsupportedCacheError(ValueError):
    """The model's cache cannot be kept consistent under early exit."""


class KVStored(Exception):
    """Raised right after a block's attention stored its keys/values, to skip the rest of the block."""


def fresh_cache() -> DynamicCache:
    """A :class:`DynamicCache` whose layers all keep every position (croppable).

    Sliding-window layers still attend only within their window: the window is applied by the model's mask.
    """
    return DynamicCache()


def check_cache(cache: Any, num_layers: int, length: int) -> None:
    """Raise :class:`UnsupportedCacheError` unless ``cache`` has ``num_layers`` full layers of ``length`` tokens."""
    if not isinstance(cache, DynamicCache):
        raise UnsupportedCacheError(
            f"early-exit generation needs a transformers DynamicCache; got {type(cache).__name__}. "
            "Do not pass cache_implementation=... or a static/quantised cache."
        )
    layers = getattr(cache, "layers", [])
    if len(layers) != num_layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise UnsupportedCacheError(
            f"this model's cache has {len(layers)} layers of kinds {kinds} for {num_layers} blocks; early exit "
            "needs one full-length DynamicLayer per block (models with linear attention, KV shared between "
            "layers or custom caches are not supported)."
        )
    lengths = cache_lengths(cache)
    if any(n != length for n in lengths):
        raise UnsupportedCacheError(f"cache lengths {lengths} after the prompt; expected {length} in every layer")


def cache_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers (full-length ``DynamicLayer`` objects once :func:`check_cache` passed)."""
    return cast(list[DynamicLayer], cache.layers)


def cache_lengths(cache: DynamicCache) -> list[int]:
    """The number of cached positions in each layer."""
    return [layer.get_seq_length() for layer in cache_layers(cache)]


def crop_cache(cache: DynamicCache, length: int, layers: range | None = None) -> None:
    """Keep the first ``length`` positions of the given layers (all by default)."""
    all_layers = cache_layers(cache)
    for idx in layers if layers is not None else range(len(all_layers)):
        layer = all_layers[idx]
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


@contextmanager
def cache_view(cache: DynamicCache, length: int) -> Iterator[None]:
    """Make ``cache`` look ``length`` positions long (read-only views) inside the block; restore after."""
    real = cache.layers
    view: list[Any] = []
    for layer in cache_layers(cache):
        if layer.get_seq_length() > length:
            shallow = copy.copy(layer)
            shallow.keys = cast(torch.Tensor, layer.keys)[..., :length, :]
            shallow.values = cast(torch.Tensor, layer.values)[..., :length, :]
            view.append(shallow)
        else:
            view.append(layer)
    cache.layers = view
    try:
        yield
    finally:
        cache.layers = real


class _ZeroQuery(nn.Module):
    """Stands in for a query projection during a K/V-only call: zeros of the projection's output shape."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return x.new_zeros((*x.shape[:-1], self.out_features), dtype=dtype)


@dataclass
class _QuerySlot:
    """Where a block's query projection lives, the projection itself and its stand-in."""

    parent: nn.Module
    name: str
    original: nn.Module
    stand_in: _ZeroQuery


_QUERY_SLOTS: weakref.WeakKeyDictionary[nn.Module, _QuerySlot | None] = weakref.WeakKeyDictionary()


def _query_slot(block: nn.Module) -> _QuerySlot | None:
    """The block's query-projection slot (found once and cached; found again if the projection was replaced)."""
    if block in _QUERY_SLOTS:
        slot = _QUERY_SLOTS[block]
        if slot is None or slot.parent._modules.get(slot.name) is slot.original:
            return slot
    found = query_projection(block)
    if found is None:
        slot = None
    else:
        parent, name = found
        original: Any = parent._modules[name]
        slot = _QuerySlot(parent, name, original, _ZeroQuery(int(original.out_features)))
    _QUERY_SLOTS[block] = slot
    return slot


def store_kv_only(
    cache: DynamicCache,
    layer_idx: int,
    run_block: Callable[[], Any],
    block: nn.Module | None = None,
    *,
    query_skip: bool = True,
) -> None:
    """Run ``run_block`` only until its attention has stored keys/values for ``layer_idx`` (CALM propagation).

    The block computes its input norm and key/value projections (and rotary embedding) exactly as usual; the
    attention itself, the MLP and the residual update are skipped. Given the ``block`` module that ``run_block``
    runs, and with ``query_skip`` on, its separate query projection (if it has one) is replaced by zeros for
    the duration of the call, as the queries are never used; the original module is put back in every case.
    """
    slot = _query_slot(block) if query_skip and block is not None else None
    original = cache.update

    def update_then_stop(key_states: Any, value_states: Any, idx: int, *args: Any, **kwargs: Any) -> Any:
        out = original(key_states, value_states, idx, *args, **kwargs)
        if idx == layer_idx:
            raise KVStored
        return out

    cache.update = update_then_stop  # type: ignore[method-assign, assignment]
    if slot is not None:
        slot.parent._modules[slot.name] = slot.stand_in
    try:
        run_block()
    except KVStored:
        return
    finally:
        del cache.update
        if slot is not None:
            slot.parent._modules[slot.name] = slot.original
    raise UnsupportedCacheError(
        f"block {layer_idx} finished without storing keys/values through cache.update(..., layer_idx={layer_idx}); "
        "kv='propagate' is not supported for this architecture. Use kv='verify' or kv='recompute'."
    )
