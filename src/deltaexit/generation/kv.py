"""KV-cache helpers the KV policies share: checking, cropping and viewing a cache, and K/V-only block calls.

The policies themselves are classes in :mod:`deltaexit.generation.policy` (one module each). Every policy keeps
all layers' caches at the same length after every step. The only thing a policy needs from an architecture is
that each attention block stores its keys/values with ``cache.update(k, v, layer_idx)`` in a full-length
:class:`transformers.DynamicCache` layer, which holds for every architecture in
:data:`deltaexit.testing.ARCHITECTURES`. Layers whose cache is a recurrent state (linear attention, Mamba SSM and
conv states, short convolutions: ``transformers``' ``LinearAttentionLayer`` family) and layers with no cache at
all (``DummyLayer``: MLP/MoE-only blocks) are kept consistent by :mod:`deltaexit.generation.recurrent`; they have
no length, so :func:`cache_lengths` and :func:`crop_cache` see the key/value layers only. Indexed layers
(DeepSeek Sparse Attention's ``DynamicIndexedLayer``: keys/values plus the lightning indexer's keys, one per
position) are key/value layers whose indexer keys :func:`crop_cache` and :func:`cache_view` crop and view with them,
and which :func:`store_kv_only` lets the block write before stopping it. Two shapes are read from the cache after
the prompt by :func:`check_cache`: a constant number of positions every layer holds besides the tokens (CPM-Ant
prepends its prompt tokens to every sequence: :func:`cache_offset`; lengths taken and given here are tokens), and
blocks that write several cache layers (LongCat-Flash's two attention sublayers: found from the ``layer_idx`` of
the modules in each block, :func:`block_layers`). Blocks that reuse the keys/values an earlier block of the same
forward stores (Gemma-3n's KV sharing) have no cache layer of their own (``DummyLayer``); anything else (static or
quantised caches) is detected there too and refused with a clear error.

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
    DynamicIndexedLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
    get_layer_types_and_kwargs,
)

from deltaexit.generation.sidestate import SideStateLayer
from deltaexit.generation.skipped import SkippedLayer
from deltaexit.generation.windowed import CacheWindowLayer
from deltaexit.structure import query_projection

__all__ = [
    "INDEXED_LAYER_TYPES",
    "RECURRENT_LAYER_TYPES",
    "SUPPORTED_LAYERS",
    "SUPPORTED_LAYER_TYPES",
    "KVStored",
    "UnsupportedCacheError",
    "block_layers",
    "cache_layers",
    "cache_length",
    "cache_lengths",
    "cache_offset",
    "cache_view",
    "check_cache",
    "config_layer_types",
    "crop_cache",
    "fresh_cache",
    "has_kv",
    "has_state",
    "is_opaque",
    "layers_of",
    "note_opaque_state",
    "noting_writes",
    "opaque_layer_types",
    "set_cache_length",
    "store_kv_only",
]

#: The layer types of ``transformers``' configs whose cache layer holds a recurrent state.
RECURRENT_LAYER_TYPES = frozenset({"conv", "linear_attention", "hybrid", "hybrid_sliding"})
#: The layer types whose cache layer keeps, besides keys/values, an indexer's keys per position (DeepSeek Sparse
#: Attention's lightning indexer: ``transformers``' ``DynamicIndexedLayer``, written by ``cache.update_indexer``).
INDEXED_LAYER_TYPES = frozenset({"indexed_attention"})
#: The config layer types whose cache layers early exit keeps consistent (``dummy``: no cache, e.g. MLP-only blocks).
SUPPORTED_LAYER_TYPES = (
    frozenset({"full_attention", "sliding_attention", "chunked_attention", "dummy"})
    .union(RECURRENT_LAYER_TYPES)
    .union(INDEXED_LAYER_TYPES)
)
#: Cache layer classes early exit keeps consistent (the sliding ones are replaced by full-length ones first).
SUPPORTED_LAYERS = (
    DynamicLayer,
    DynamicIndexedLayer,
    CacheWindowLayer,
    LinearAttentionLayer,
    LinearAttentionAndFullAttentionLayer,
    DummyLayer,
    SkippedLayer,
    SideStateLayer,
)


#: Cache layer classes ``fresh_cache`` replaces by croppable ones (not opaque, see :func:`is_opaque`).
_REPLACED = (DynamicSlidingWindowLayer, LinearAttentionAndSlidingWindowAttentionLayer)


def is_opaque(layer: Any) -> bool:
    """Whether a cache layer is one of a model's own classes (registered by its modeling file with ``_layer_type``,
    e.g. DeepSeek-V4's compressed-attention layers, which keep the last ``sliding_window - 1`` keys besides
    compressor buffers, entry counts and overlap states): it cannot be cropped back, so early exit treats it as a
    *state*, snapshot whole (every tensor it holds) and restored, like a recurrent layer
    (:mod:`deltaexit.generation.recurrent`)."""
    cls = type(layer)
    known = cls in SUPPORTED_LAYERS or cls in _REPLACED or isinstance(layer, LinearAttentionCacheLayerMixin)
    return not known and getattr(cls, "_layer_type", None) is not None


def opaque_layer_types(types: Iterable[str]) -> set[str]:
    """The config layer types among ``types`` whose cache layer class is :func:`is_opaque` (registered by a
    modeling file that is imported)."""
    found = set()
    for name in set(types) - SUPPORTED_LAYER_TYPES:
        cls = DYNAMIC_LAYER_TYPE_MAPPING.get(name)
        known = cls is None or cls in SUPPORTED_LAYERS or cls in _REPLACED
        if not known and getattr(cls, "_layer_type", None) == name:
            found.add(name)
    return found


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


def _full_length(layer: Any, window: int | None = None) -> Any:
    """A croppable full-length stand-in for a sliding-window cache layer (the mask keeps the window; with the
    ``window`` only the cache applies, a :class:`~deltaexit.generation.windowed.CacheWindowLayer`)."""
    if type(layer) is DynamicSlidingWindowLayer:
        return DynamicLayer() if window is None else CacheWindowLayer(layer.sliding_window)
    if type(layer) is LinearAttentionAndSlidingWindowAttentionLayer:
        return LinearAttentionAndFullAttentionLayer(number_of_states=layer.number_of_states)
    return layer


def fresh_cache(config: Any = None, types: list[str] | None = None, window: int | None = None) -> DynamicCache:
    """A :class:`DynamicCache` whose layers all keep every position (croppable).

    Sliding-window layers still attend only within their window: the window is applied by the model's mask. Given
    the model's ``config``, a model with recurrent layers (linear attention, Mamba, short convolutions) or indexed
    ones (DeepSeek Sparse Attention) gets the cache layers ``transformers`` would give it (recurrent-state layers,
    indexer-key layers, no-cache layers for MLP/MoE-only blocks and for blocks that reuse an earlier block's keys and
    values), sliding ones made full-length; any other model gets lazily created full-length layers.

    Example:
        >>> from deltaexit.testing import tiny_config
        >>> [type(layer).__name__ for layer in fresh_cache(tiny_config("llama")).layers]  # created lazily
        []

    ``types`` (:func:`config_layer_types` of ``config``, when the caller keeps them) saves deriving them again.
    ``window`` (:func:`deltaexit.generation.checks.cache_window`: a window only the cache applies) makes the
    sliding layers :class:`~deltaexit.generation.windowed.CacheWindowLayer` objects.
    """
    types = config_layer_types(config) if types is None else types
    needs_layers = RECURRENT_LAYER_TYPES.union(INDEXED_LAYER_TYPES, {"dummy"}).intersection(
        types
    ) or opaque_layer_types(types)
    if window is None and (not needs_layers or not set(types) <= set(DYNAMIC_LAYER_TYPE_MAPPING)):
        return DynamicCache()
    cache = DynamicCache(config=config)
    cache.layers = [_full_length(layer, window) for layer in layers_of(cache)]
    return cache


def has_kv(layer: Any) -> bool:
    """Whether a cache layer stores keys/values (a length along the sequence) that can be cropped back
    (not an :func:`is_opaque` one)."""
    return isinstance(layer, DynamicLayer) and not is_opaque(layer)


def has_state(layer: Any) -> bool:
    """Whether a cache layer holds a recurrent state (conv and/or recurrent tensors, no length), or is
    :func:`is_opaque` (a state as a whole)."""
    return isinstance(layer, LinearAttentionCacheLayerMixin) or is_opaque(layer)


def _layer_summary(layers: Iterable[Any]) -> list[str]:
    return sorted({type(layer).__name__ for layer in layers})


def check_cache(cache: Any, num_layers: int, length: int, blocks: Iterable[nn.Module] | None = None) -> None:
    """Raise :class:`UnsupportedCacheError` unless ``cache`` has ``num_layers`` supported layers (or, given the
    ``blocks``, key/value layers that their attention modules' ``layer_idx`` split among them in order:
    :func:`block_layers`) and every key/value layer holds ``length`` tokens, or ``length`` plus one constant
    (positions the model prepends to every sequence: CPM-Ant's prompt tokens; :func:`cache_offset`); remember
    ``length`` (:func:`cache_length`)."""
    if not isinstance(cache, DynamicCache):
        raise UnsupportedCacheError(
            f"early-exit generation needs a transformers DynamicCache; got {type(cache).__name__}. "
            "Do not pass cache_implementation=... or a static/quantised cache."
        )
    layers = getattr(cache, "layers", [])
    owned = _owned_layers(blocks, layers) if blocks is not None and len(layers) != num_layers else None
    if (len(layers) != num_layers and owned is None) or any(
        type(layer) not in SUPPORTED_LAYERS and not is_opaque(layer) for layer in layers
    ):
        raise UnsupportedCacheError(
            f"this model's cache has {len(layers)} layers of kinds {_layer_summary(layers)} for {num_layers} "
            "blocks; early exit needs one cache layer per block, each a full-length DynamicLayer (or "
            "DynamicIndexedLayer), a recurrent LinearAttentionLayer (or LinearAttentionAndFullAttentionLayer) or a "
            "DummyLayer, or key/value layers that the blocks' attention modules name by layer_idx in block order "
            "(models with KV shared between layers or custom caches are not supported)."
        )
    if owned is not None:
        _BLOCK_LAYERS[cache] = owned
    lengths = cache_lengths(cache)
    offset = lengths[0] - length if lengths else 0  # positions the model prepends to every sequence (CPM-Ant)
    if offset < 0 or any(n != length + offset for n in lengths):
        raise UnsupportedCacheError(
            f"cache lengths {lengths} after the prompt; expected {length} in every layer (or the same constant "
            "more in every layer: positions the model prepends to each sequence)"
        )
    _OFFSETS[cache] = offset
    set_cache_length(cache, length)


#: The cache layers each block writes, per cache, where blocks write several (see :func:`check_cache`).
_BLOCK_LAYERS: weakref.WeakKeyDictionary[DynamicCache, list[list[int]]] = weakref.WeakKeyDictionary()


def _owned_layers(blocks: Iterable[nn.Module], layers: list[Any]) -> list[list[int]] | None:
    """Each block's cache layers, from the ``layer_idx`` of the modules inside it (LongCat-Flash's two attention
    sublayers: ``2i`` and ``2i + 1``); None unless they are key/value layers that split ``range(len(layers))`` among
    the blocks in order, each block at least one."""
    owned = []
    for block in blocks:
        found = {getattr(m, "layer_idx", None) for m in block.modules() if m is not block}
        owned.append(sorted(i for i in found if isinstance(i, int) and not isinstance(i, bool)))
    flat = [i for idxs in owned for i in idxs]
    if flat != list(range(len(layers))) or not all(owned) or not all(has_kv(layer) for layer in layers):
        return None
    return owned


def block_layers(cache: DynamicCache, block: int) -> list[int]:
    """The cache layers block ``block`` writes: ``[block]``, but in models whose blocks hold several attention
    sublayers (one cache layer each), those, in order."""
    owned = _BLOCK_LAYERS.get(cache)
    return owned[block] if owned is not None else [block]


#: Tokens in a cache with no key/value layer (pure SSM models): recurrent states have no length to read.
_LENGTHS: weakref.WeakKeyDictionary[DynamicCache, int] = weakref.WeakKeyDictionary()


#: Positions a model's key/value layers hold before its first token (see :func:`check_cache`), per cache.
_OFFSETS: weakref.WeakKeyDictionary[DynamicCache, int] = weakref.WeakKeyDictionary()


def cache_offset(cache: DynamicCache) -> int:
    """Positions every key/value layer holds besides the tokens (0 but for models that prepend positions to every
    sequence, read by :func:`check_cache` after the prompt); the lengths :func:`cache_length`, :func:`crop_cache`
    and :func:`cache_view` take and give are tokens, the layers hold ``cache_offset`` more."""
    return _OFFSETS.get(cache, 0)


def set_cache_length(cache: DynamicCache, length: int) -> None:
    """Note that ``cache`` now holds ``length`` tokens (read back by :func:`cache_length`)."""
    offset = cache_offset(cache)
    if offset and any(n != length + offset for n in cache_lengths(cache)):  # the offset did not stay constant
        raise UnsupportedCacheError(
            f"cache lengths {cache_lengths(cache)} for {length} tokens; expected {length + offset} in every layer "
            f"(the {offset} positions the model held after the prompt besides its tokens did not stay constant)"
        )
    _LENGTHS[cache] = length


def cache_length(cache: DynamicCache) -> int:
    """Tokens in the cache: its first key/value layer's length, else (recurrent layers only) the one last noted
    with :func:`set_cache_length`."""
    for layer in layers_of(cache):
        if has_kv(layer):
            return int(layer.get_seq_length()) - cache_offset(cache)
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
    """Keep the first ``length`` tokens of the key/value layers of the given blocks (all layers by default; and the
    :func:`cache_offset` positions before them); recurrent states are rolled back by
    :mod:`deltaexit.generation.recurrent`."""
    all_layers = layers_of(cache)
    length += cache_offset(cache)
    owned = range(len(all_layers)) if layers is None else [i for b in layers for i in block_layers(cache, b)]
    for idx in owned:
        layer = all_layers[idx]
        if not has_kv(layer):
            continue
        extra = layer.get_seq_length() - length
        if extra > 0:
            DynamicLayer.crop(layer, -extra)  # the key/value part only (a hybrid layer's state is not croppable)
        if isinstance(layer, DynamicIndexedLayer):
            _crop_indexer(layer, length)


def _crop_indexer(layer: DynamicIndexedLayer, length: int) -> None:
    """Keep the first ``length`` positions of an indexed layer's indexer keys (and indexer positions, if kept)."""
    keys = layer.indexer_keys
    if keys is not None and keys.dim() == 3 and keys.shape[1] > length:
        layer.indexer_keys = keys[:, :length]
    positions = layer.indexer_position_ids
    if positions is not None and positions.shape[-1] > length:
        layer.indexer_position_ids = positions[..., :length]


#: An earlier state of each opaque layer (:func:`is_opaque`), per cache: ``{layer index: (tokens, attributes)}``.
_OPAQUE_STATES: weakref.WeakKeyDictionary[DynamicCache, dict[int, tuple[int, dict[str, Any]]]] = (
    weakref.WeakKeyDictionary()
)


def note_opaque_state(cache: DynamicCache, idx: int, length: int, attributes: dict[str, Any]) -> None:
    """Note that opaque layer ``idx`` had ``attributes`` (copies) when ``cache`` held ``length`` tokens: inside
    :func:`cache_view` at that length, the layer looks as it did then (the recurrent module's snapshots note
    theirs)."""
    _OPAQUE_STATES.setdefault(cache, {})[idx] = (length, attributes)


def _opaque_view(cache: DynamicCache, idx: int, layer: Any, length: int) -> Any:
    """``layer`` as it was at ``length`` tokens, where a state noted then is known (else ``layer`` itself)."""
    noted = _OPAQUE_STATES.get(cache, {}).get(idx)
    if noted is None or noted[0] != length or layer.get_seq_length() == length:
        return layer
    shallow = copy.copy(layer)
    vars(shallow).update(noted[1])  # read-only: the recording pass writes nothing
    return shallow


@contextmanager
def cache_view(cache: DynamicCache, length: int) -> Iterator[None]:
    """Make ``cache`` look ``length`` tokens long (read-only views) inside the block; restore after."""
    real = layers_of(cache)
    length += cache_offset(cache)
    view: list[Any] = []
    for idx, layer in enumerate(real):
        if is_opaque(layer):  # the mask and positions it gives are those of the noted earlier state
            view.append(_opaque_view(cache, idx, layer, length))
        elif has_kv(layer) and layer.get_seq_length() > length:
            shallow = copy.copy(layer)
            shallow.keys = cast(torch.Tensor, layer.keys)[..., :length, :]
            shallow.values = cast(torch.Tensor, layer.values)[..., :length, :]
            if isinstance(shallow, DynamicIndexedLayer):
                _crop_indexer(shallow, length)  # slices: the real layer keeps its indexer keys
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


#: The ``Cache`` methods through which a block writes its own cache layer, with the position of their ``layer_idx``
#: argument (``update_indexer``: a DeepSeek-Sparse-Attention indexer's keys, stored after the attention's K/V).
_CACHE_WRITES = {"update": 2, "update_indexer": 1}

#: Per cache: the writes each layer's block made in the prompt's full forward (:func:`noting_writes`).
_LAYER_WRITES: weakref.WeakKeyDictionary[DynamicCache, dict[int, frozenset[str]]] = weakref.WeakKeyDictionary()


def _expected_writes(cache: DynamicCache, layer_idx: int) -> frozenset[str]:
    """The cache writes block ``layer_idx`` makes for its layer: those it made in the prompt's forward, else those
    its layer's kind takes (keys/values, and indexer keys on an indexed layer)."""
    noted = _LAYER_WRITES.get(cache, {}).get(layer_idx)
    if noted:
        return noted
    layers = layers_of(cache)
    indexed = layer_idx < len(layers) and isinstance(layers[layer_idx], DynamicIndexedLayer)
    return frozenset({"update", "update_indexer"}) if indexed else frozenset({"update"})


def _wrap_writes(cache: DynamicCache, seen: Callable[[str, Any], None]) -> None:
    """Make ``cache``'s write methods call ``seen(name, layer_idx)`` after each write (undone by
    :func:`_unwrap_writes`)."""
    for name, position in _CACHE_WRITES.items():
        original = getattr(cache, name)

        def write(*args: Any, _original: Any = original, _name: str = name, _pos: int = position, **kwargs: Any) -> Any:
            out = _original(*args, **kwargs)
            seen(_name, args[_pos] if len(args) > _pos else kwargs.get("layer_idx"))
            return out

        setattr(cache, name, write)


def _unwrap_writes(cache: DynamicCache) -> None:
    for name in _CACHE_WRITES:
        if name in vars(cache):
            delattr(cache, name)


@contextmanager
def noting_writes(cache: Any) -> Iterator[None]:
    """Note, per layer, which cache writes the blocks make inside the block (the prompt's full forward), so that
    :func:`store_kv_only` stops a block after the last write it really makes (an indexed layer may reuse another
    layer's selection and never write indexer keys)."""
    if not isinstance(cache, DynamicCache):
        yield
        return
    writes: dict[int, set[str]] = {}
    _wrap_writes(cache, lambda name, idx: writes.setdefault(idx, set()).add(name))
    try:
        yield
    finally:
        _unwrap_writes(cache)
    _LAYER_WRITES[cache] = {idx: frozenset(names) for idx, names in writes.items()}


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
    attention itself, the MLP and the residual update are skipped. The block is stopped after the last cache write
    of its layer's kind: ``cache.update`` (keys/values) and, on an indexed layer (DeepSeek Sparse Attention),
    ``cache.update_indexer`` (the indexer's keys, written after the keys/values), or the writes the block made in
    the prompt's forward where :func:`noting_writes` noted them (an indexed layer that reuses another layer's
    selection writes no indexer keys).
    Given the ``block`` module that ``run_block`` runs, and with ``query_skip`` on, its separate query projection
    (if it has one) is replaced by zeros for the duration of the call, as the queries are never used; the original
    module is put back in every case.
    """
    slot = _query_slot(block) if query_skip and block is not None else None
    expected = _expected_writes(cache, layer_idx)
    seen: set[str] = set()

    def stop_after_last(name: str, idx: Any) -> None:
        if idx == layer_idx:
            seen.add(name)
            if expected <= seen:
                raise KVStored

    _wrap_writes(cache, stop_after_last)
    if slot is not None:
        slot.parent._modules[slot.name] = slot.stand_in
    try:
        run_block()
    except KVStored:
        return
    finally:
        _unwrap_writes(cache)
        if slot is not None:
            slot.parent._modules[slot.name] = slot.original
    if "update" not in seen:  # (a block that stored its keys/values but not all expected writes ran whole: fine)
        raise UnsupportedCacheError(
            f"block {layer_idx} finished without storing keys/values through cache.update(..., layer_idx="
            f"{layer_idx}); kv='propagate' is not supported for this architecture. Use kv='verify' or kv='recompute'."
        )
