"""Caches of models that keep no ``transformers`` cache: a forward's own recurrent ``state``, or no cache at all.

* **A forward's own state** (RWKV's ``state=``: a list of tensors whose last dimension is the layer, each block
  updating its slice in place). After the prompt, :func:`state_cache` wraps that list in a ``DynamicCache`` of
  ``LinearAttentionLayer`` objects whose recurrent states are *views* of the model's tensors (layer ``i``'s state
  ``k`` is ``state[k][..., i]``): the recurrent-state machinery of :mod:`deltaexit.generation.recurrent` then
  snapshots, restores (in place, so into the model's own tensors) and advances them as it does any recurrent layer.
* **A cache class of the model's own holding per-layer recurrent states** (xLSTM's ``xLSTMCache``: ``rnn_state``,
  a dict from layer to a tuple of state tensors, which the model's loop overwrites in place with what each block
  returns). After the prompt, :func:`own_state_cache` wraps it in an :class:`OwnStateCache`: recurrent layers whose
  states *are* the model's tensors, and every other attribute (``rnn_state``, ...) read from the model's cache, so
  the model's forward takes it where it took its own.
* **A cache class of its own** (MiniMax's ``MiniMaxCache``: a ``DynamicCache`` subclass, the only class its forward
  accepts, keeping its linear-attention states in a side list beside the layers). :func:`own_cache_class` finds the
  class from the forwards' ``cache`` annotations; early exit builds that class, and after the prompt
  :func:`side_state_cache` views the side list's entries as recurrent layers
  (:class:`~deltaexit.generation.sidestate.SideStateLayer`).
* **No cache at all** (``openai-gpt``: ``model.generate`` runs the whole sequence again each step).
  :class:`PrefixCache` is a cache of no-cache layers that only counts tokens; every scan and verify pass then
  runs the blocks over the whole sequence from position 0, as ``model.generate`` does, and keeps the new
  positions (:func:`recomputes_prefix`).

Example:
    >>> import torch
    >>> state = [torch.zeros(1, 4, 3), torch.zeros(1, 4, 3)]  # [batch, hidden, layers]
    >>> cache = state_cache(state, num_layers=3)
    >>> state[1][:, :, 2] = 1.0  # a block writes its slice in place
    >>> cache.layers[2].recurrent_states[1].sum().item()
    4.0
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer, DynamicLayer, LinearAttentionLayer

from deltaexit.generation.kv import UnsupportedCacheError, has_kv
from deltaexit.generation.sidestate import SideStateLayer, is_side_list

__all__ = [
    "STATE_ARGUMENTS",
    "OwnStateCache",
    "PrefixCache",
    "StateCache",
    "forward_parameters",
    "own_cache_class",
    "own_state_cache",
    "recomputes_prefix",
    "side_state_cache",
    "state_argument",
    "state_cache",
]

#: Forward arguments (of ``transformers``' deprecated cache names) that hold a model's own recurrent state.
STATE_ARGUMENTS = ("state",)


def forward_parameters(model: Any) -> set[str]:
    """The names of ``model.forward``'s parameters (empty where it has none to read)."""
    forward = getattr(model, "forward", None)
    try:
        return set(inspect.signature(forward).parameters) if callable(forward) else set()
    except (TypeError, ValueError):
        return set()


def state_argument(model: Any) -> str | None:
    """The forward argument that holds ``model``'s own recurrent state (e.g. RWKV's ``state``), for a model whose
    forward takes no ``cache``; else None."""
    params = forward_parameters(model)
    if {"cache", "past_key_values"}.intersection(params):
        return None
    return next((name for name in STATE_ARGUMENTS if name in params), None)


def recomputes_prefix(model: Any) -> bool:
    """Whether ``model``'s forward takes neither a cache nor a state of its own: every step runs the whole sequence.

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> recomputes_prefix(tiny_model("llama"))
        False
    """
    params = forward_parameters(model)
    return "input_ids" in params and not {"cache", "past_key_values"}.intersection(params) and not state_argument(model)


def state_cache(state: Any, num_layers: int) -> DynamicCache:
    """A ``DynamicCache`` of recurrent layers viewing a model's own ``state`` (tensors whose last dimension is the
    layer); raises :class:`~deltaexit.generation.kv.UnsupportedCacheError` for any other kind of state."""
    tensors = list(state) if isinstance(state, (list, tuple)) else []
    if not tensors or any(not isinstance(t, torch.Tensor) or t.shape[-1] != num_layers for t in tensors):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in tensors]
        raise UnsupportedCacheError(
            f"the model's own state ({type(state).__name__} of {shapes}) is not a list of tensors whose last "
            f"dimension is the layer ({num_layers}): no KV policy (verify, propagate, recompute) can keep it "
            "consistent under early exit. Use model.generate."
        )
    cache = StateCache()
    # views: each block writes its layer's slice in place
    cache.layers = _recurrent_layers([[tensor[..., i] for tensor in tensors] for i in range(num_layers)])
    return cache


def _recurrent_layers(states: list[list[torch.Tensor]]) -> list[Any]:
    """One recurrent cache layer per entry of ``states``, holding that entry's tensors themselves (not copies) as its
    recurrent states ``0, 1, ...``: the model's blocks write them in place, and the recurrent-state machinery
    snapshots and restores them in place."""
    layers: list[Any] = []
    for tensors in states:
        layer = LinearAttentionLayer(number_of_states=len(tensors))
        for k, tensor in enumerate(tensors):
            layer.recurrent_states[k] = tensor
        layers.append(layer)
    return layers


class StateCache(DynamicCache):
    """A ``DynamicCache`` whose recurrent layers view a model's own state (:func:`state_cache`)."""


def _layer_states(value: Any, num_layers: int) -> list[list[torch.Tensor]] | None:
    """``value``'s per-layer state tensors where it holds ``num_layers`` tuples of tensors (a dict by layer or a
    list), else None."""
    if isinstance(value, dict) and sorted(value) == list(range(num_layers)):
        entries = [value[i] for i in range(num_layers)]
    elif isinstance(value, (list, tuple)) and len(value) == num_layers:
        entries = list(value)
    else:
        return None
    if not all(isinstance(e, (list, tuple)) and e and all(isinstance(t, torch.Tensor) for t in e) for e in entries):
        return None
    return [list(e) for e in entries]


def own_state_cache(own: Any, num_layers: int) -> OwnStateCache:
    """An :class:`OwnStateCache` over a model's own cache object ``own`` whose one attribute holding per-layer
    tuples of tensors is its recurrent state (xLSTM's ``rnn_state``); raises
    :class:`~deltaexit.generation.kv.UnsupportedCacheError` for any other cache class.

    Example:
        >>> import torch
        >>> class Own:
        ...     def __init__(self):
        ...         self.rnn_state = {i: (torch.zeros(1, 2), torch.zeros(1)) for i in range(2)}
        >>> own = Own()
        >>> cache = own_state_cache(own, num_layers=2)
        >>> own.rnn_state[1][0].fill_(3.0).sum().item(), cache.layers[1].recurrent_states[0].sum().item()
        (6.0, 6.0)
        >>> cache.rnn_state is own.rnn_state
        True
    """
    found = {
        name: states for name, value in vars(own).items() if (states := _layer_states(value, num_layers)) is not None
    }
    if len(found) != 1:
        raise UnsupportedCacheError(
            f"{type(own).__name__} (the model's own cache class) holds no single per-layer recurrent state (found "
            f"{sorted(found) or 'none'} among its attributes {sorted(vars(own))}, each a tuple of tensors per each of "
            f"the {num_layers} layers): no KV policy (verify, propagate, recompute) can keep it consistent under "
            "early exit. Use model.generate."
        )
    (states,) = found.values()
    cache = OwnStateCache(own)
    cache.layers = _recurrent_layers(states)  # the model's own tensors: its loop writes them in place
    return cache


class OwnStateCache(StateCache):
    """A :class:`StateCache` over a model's own cache object (:func:`own_state_cache`): attributes it lacks are read
    from that object, so the model's forward can use it as its own cache."""

    def __init__(self, own: Any) -> None:
        super().__init__()
        self.own = own

    def __getattr__(self, name: str) -> Any:
        if name == "own" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.own, name)


class PrefixCache(DynamicCache):
    """The cache of a model that keeps none: one no-cache layer per block; it only counts the tokens seen
    (:func:`~deltaexit.generation.kv.set_cache_length`), and the blocks run over the whole sequence every time."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.layers = [DummyLayer() for _ in range(num_layers)]


#: Forward arguments through which a module takes the cache (their annotations name the class it requires).
_CACHE_ARGUMENTS = ("cache", "past_key_values")
_OWN_CLASSES: dict[type, type[DynamicCache] | None] = {}


def _annotated_caches(module: Any) -> set[type[DynamicCache]]:
    """The ``DynamicCache`` subclasses (not ``DynamicCache`` itself) ``module``'s forward annotates its cache with."""
    try:
        hints = typing.get_type_hints(type(module).forward)
    except Exception:  # an annotation that does not resolve names no class
        return set()
    found = set()
    for name in _CACHE_ARGUMENTS:
        hint = hints.get(name)
        for cls in typing.get_args(hint) or (hint,):
            if isinstance(cls, type) and issubclass(cls, DynamicCache) and cls is not DynamicCache:
                found.add(cls)
    return found


def own_cache_class(model: Any) -> type[DynamicCache] | None:
    """The ``DynamicCache`` subclass ``model``'s forward requires, for a model ``transformers`` gives no plain
    ``DynamicCache`` (its modules' forwards annotate their cache with exactly one such class, e.g. MiniMax's
    ``MiniMaxCache``); else None.

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> own_cache_class(tiny_model("llama")) is None
        True
    """
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if not callable(supports) or supports() or not isinstance(model, torch.nn.Module):
        return None
    key = type(model)
    if key not in _OWN_CLASSES:
        found: set[type[DynamicCache]] = set()
        for module in model.modules():
            found |= _annotated_caches(module)
        _OWN_CLASSES[key] = found.pop() if len(found) == 1 else None
    return _OWN_CLASSES[key]


def side_state_cache(cache: DynamicCache, num_layers: int) -> None:
    """View the per-block states ``cache`` keeps in side lists beside its layers (MiniMax's ``linear_cache``) as
    recurrent layers, in place: layer ``i`` becomes a :class:`~deltaexit.generation.sidestate.SideStateLayer` of the
    list's entry ``i`` where that is a tensor, and the layer list is padded to ``num_layers`` with (empty) key/value
    layers. Raises :class:`~deltaexit.generation.kv.UnsupportedCacheError` for a block that keeps both a side state
    and keys/values."""
    layers: list[Any] = list(cache.layers)
    for name, value in vars(cache).items():
        if name == "layers" or not is_side_list(value, num_layers):
            continue
        layers += [DynamicLayer() for _ in range(len(layers), num_layers)]
        for i, state in enumerate(value):
            if not isinstance(state, torch.Tensor):
                continue
            if has_kv(layers[i]) and layers[i].get_seq_length() > 0:
                raise UnsupportedCacheError(
                    f"block {i} keeps both keys/values and a state in {type(cache).__name__}.{name}; early exit "
                    "cannot keep such a cache consistent. Use model.generate."
                )
            layers[i] = SideStateLayer(value, i)
    cache.layers = layers
