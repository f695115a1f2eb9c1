"""KV-cache helpers the KV policies share: checking, cropping and viewing a cache, and K/V-only block calls.

The policies themselves are classes in :mod:`deltaexit.generation.policy` (one module each). Every policy keeps
all layers' caches at the same length after every step. The only thing a policy needs from an architecture is
that each attention block stores its keys/values with ``cache.update(k, v, layer_idx)`` in a full-length
:class:`transformers.DynamicCache` layer, which holds for every architecture in
:data:`deltaexit.testing.ARCHITECTURES`. Layers whose cache is a recurrent state (linear attention, Mamba SSM and
conv states, short convolutions: ``transformers``' ``LinearAttentionLayer`` family) and layers with no cache at
all (``DummyLayer``: MLP/MoE-only blocks) are kept consistent by :mod:`deltaexit.generation.recurrent`; they have
no length, so :func:`cache_lengths` and :func:`crop_cache` see the key/value layers only. Anything else (static or
quantised caches, KV shared between layers) is detected after the prompt by :func:`check_cache` and refused with a
clear error.

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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
    get_layer_types_and_kwargs,
)

from deltaexit.generation.skipped import SkippedLayer
from deltaexit.structure import query_projection

__all__ = [
    "RECURRENT_LAYER_TYPES",
    "SUPPORTED_LAYERS",
    "SUPPORTED_LAYER_TYPES",
    "KVStored",
    "UnsupportedCacheError",
    "cache_layers",
    "cache_length",
    "cache_lengths",
    "cache_view",
    "check_cache",
    "config_layer_types",
    "crop_cache",
    "fresh_cache",
    "has_kv",
    "has_state",
    "layers_of",
    "set_cache_length",
    "store_kv_only",
]

#: The layer types of ``transformers``' configs whose cache layer holds a recurrent state.
RECURRENT_LAYER_TYPES = frozenset({"conv", "linear_attention", "hybrid", "hybrid_sliding"})
#: The config layer types whose cache layers early exit keeps consistent (``dummy``: no cache, e.g. MLP-only blocks).
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "dummy"}).union(
    RECURRENT_LAYER_TYPES
)
#: Cache layer classes early exit keeps consistent (the sliding ones are replaced by full-length ones first).
SUPPORTED_LAYERS = (DynamicLayer, LinearAttentionLayer, LinearAttentionAndFullAttentionLayer, DummyLayer, SkippedLayer)


class UnsupportedCacheError(ValueError):
    """The model's cache cannot be kept consistent under early exit."""


class KVStored(Exception):
    """Raised right after a block's attention stored its keys/values, to skip the rest of the block."""


def config_layer_types(config: Any) -> list[str]:
    """The cache layer types ``transformers`` derives from a model config (``[]`` where it cannot)."""
    if config is None:
        return []
    try:
        return list(get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0])
    except (AttributeError, TypeError, ValueError, KeyError, IndexError):
        return []


def _full_length(layer: Any) -> Any:
    """A croppable full-length stand-in for a sliding-window cache layer (the mask keeps the window)."""
    if type(layer) is DynamicSlidingWindowLayer:
        return DynamicLayer()
    if type(layer) is LinearAttentionAndSlidingWindowAttentionLayer:
        return LinearAttentionAndFullAttentionLayer(number_of_states=layer.number_of_states)
    return layer


def fresh_cache(config: Any = None, types: list[str] | None = None) -> DynamicCache:
    """A :class:`DynamicCache` whose layers all keep every position (croppable).

    Sliding-window layers still attend only within their window: the window is applied by the model's mask. Given
    the model's ``config``, a model with recurrent layers (linear attention, Mamba, short convolutions) gets the
    cache layers ``transformers`` would give it (recurrent-state layers, no-cache layers for MLP/MoE-only blocks),
    sliding ones made full-length; any other model gets lazily created full-length layers.

    Example:
        >>> from deltaexit.testing import tiny_config
        >>> [type(layer).__name__ for layer in fresh_cache(tiny_config("llama")).layers]  # created lazily
        []

    ``types`` (:func:`config_layer_types` of ``config``, when the caller keeps them) saves deriving them again.
    """
    types = config_layer_types(config) if types is None else types
    shared = "reuse" in (getattr(config, "kv_sharing_modes", None) or ())
    needs_layers = RECURRENT_LAYER_TYPES.intersection(types) or ("dummy" in types and not shared)
    if not needs_layers or not set(types) <= set(DYNAMIC_LAYER_TYPE_MAPPING):
        return DynamicCache()
    cache = DynamicCache(config=config)
    cache.layers = [_full_length(layer) for layer in layers_of(cache)]
    return cache


def has_kv(layer: Any) -> bool:
    """Whether a cache layer stores keys/values (a length along the sequence)."""
    return isinstance(layer, DynamicLayer)


def has_state(layer: Any) -> bool:
    """Whether a cache layer holds a recurrent state (conv and/or recurrent tensors, no length)."""
    return isinstance(layer, LinearAttentionCacheLayerMixin)


def _layer_summary(layers: Iterable[Any]) -> list[str]:
    return sorted({type(layer).__name__ for layer in layers})


def check_cache(cache: Any, num_layers: int, length: int) -> None:
    """Raise :class:`UnsupportedCacheError` unless ``cache`` has ``num_layers`` supported layers and every key/value
    layer holds ``length`` tokens; remember ``length`` (:func:`cache_length`)."""
    if not isinstance(cache, DynamicCache):
        raise UnsupportedCacheError(
            f"early-exit generation needs a transformers DynamicCache; got {type(cache).__name__}. "
            "Do not pass cache_implementation=... or a static/quantised cache."
        )
    layers = getattr(cache, "layers", [])
    if len(layers) != num_layers or any(type(layer) not in SUPPORTED_LAYERS for layer in layers):
        raise UnsupportedCacheError(
            f"this model's cache has {len(layers)} layers of kinds {_layer_summary(layers)} for {num_layers} "
            "blocks; early exit needs one cache layer per block, each a full-length DynamicLayer, a recurrent "
            "LinearAttentionLayer (or LinearAttentionAndFullAttentionLayer) or a DummyLayer (models with KV shared "
            "between layers or custom caches are not supported)."
        )
    lengths = cache_lengths(cache)
    if any(n != length for n in lengths):
        raise UnsupportedCacheError(f"cache lengths {lengths} after the prompt; expected {length} in every layer")
    set_cache_length(cache, length)


#: Tokens in a cache with no key/value layer (pure SSM models): recurrent states have no length to read.
_LENGTHS: weakref.WeakKeyDictionary[DynamicCache, int] = weakref.WeakKeyDictionary()


def set_cache_length(cache: DynamicCache, length: int) -> None:
    """Note that ``cache`` now holds ``length`` tokens (read back by :func:`cache_length`)."""
    _LENGTHS[cache] = length


def cache_length(cache: DynamicCache) -> int:
    """Tokens in the cache: its first key/value layer's length, else (recurrent layers only) the one last noted
    with :func:`set_cache_length`."""
    for layer in layers_of(cache):
        if has_kv(layer):
            return int(layer.get_seq_length())
    if cache in _LENGTHS:
        return _LENGTHS[cache]
    raise UnsupportedCacheError("internal: the length of a cache with recurrent layers only was never noted")


def layers_of(cache: DynamicCache) -> list[Any]:
    """The cache's layers, of any kind (key/value, recurrent, no-cache)."""
    return cast(list[Any], cache.layers)


def cache_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's key/value layers (full-length ``DynamicLayer`` objects once :func:`check_cache` passed)."""
    return [layer for layer in layers_of(cache) if has_kv(layer)]


def cache_lengths(cache: DynamicCache) -> list[int]:
    """The number of cached positions in each key/value layer (recurrent and no-cache layers have none)."""
    return [layer.get_seq_length() for layer in cache_layers(cache)]


def crop_cache(cache: DynamicCache, length: int, layers: range | None = None) -> None:
    """Keep the first ``length`` positions of the given key/value layers (all by default); recurrent states are
    rolled back by :mod:`deltaexit.generation.recurrent`."""
    all_layers = layers_of(cache)
    for idx in layers if layers is not None else range(len(all_layers)):
        layer = all_layers[idx]
        if not has_kv(layer):
            continue
        extra = layer.get_seq_length() - length
        if extra > 0:
            DynamicLayer.crop(layer, -extra)  # the key/value part only (a hybrid layer's state is not croppable)


@contextmanager
def cache_view(cache: DynamicCache, length: int) -> Iterator[None]:
    """Make ``cache`` look ``length`` positions long (read-only views) inside the block; restore after."""
    real = layers_of(cache)
    view: list[Any] = []
    for layer in real:
        if has_kv(layer) and layer.get_seq_length() > length:
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
