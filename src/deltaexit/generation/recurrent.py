"""Recurrent cache layers under early exit: snapshot, restore and advance their states.

Linear attention (Gated DeltaNet, Lightning), Mamba/Mamba2 SSMs and short convolutions keep a *state* per layer in
``transformers``' ``LinearAttentionLayer`` cache layers (conv states and recurrent states), not keys/values per
position: such a state cannot be cropped back to an earlier length. A model's own cache-layer class
(:func:`deltaexit.generation.kv.is_opaque`, e.g. DeepSeek-V4's compressed-attention layers, which keep only the last
``sliding_window - 1`` keys besides compressor buffers, entry counts and overlap states) is such a state too: its
snapshot is a copy of every tensor among its attributes, and inside ``cache_view`` at the snapshot's length it looks
as it did then (the mask and positions recorded for a verify pass). The KV policies keep these layers consistent as
follows:

* ``verify``: :class:`RecurrentRound` snapshots every recurrent state before the drafts, restores the deep layers'
  before the verify pass and, when drafts are rejected, restores every layer's and re-runs the recurrent blocks on
  the accepted tokens (their inputs are the round's own block inputs, so the rest of the model does not run again).
* ``recompute``: the states are snapshot where the held-back tokens start and restored when a token exits; the
  held-back tokens then run through every layer, in order, with the next token that goes to full depth.
* Some implementations cannot continue a state over several tokens at once (``transformers``' Mamba v1 mixer
  restarts its scan from zero when given more than one token): :func:`continues_chunks` finds out once per model
  with a probe, and ``verify``'s verify pass and rollback and ``recompute``'s held-back tokens then run one token
  at a time.
* ``propagate``: a skipped recurrent layer's state is advanced from the exit state
  (:func:`advance_state`, the analogue of a K/V-only call): the block runs until its mixer stored the new
  recurrent state, and is stopped there.

Example:
    >>> import torch
    >>> from transformers import DynamicCache
    >>> from transformers.cache_utils import LinearAttentionLayer
    >>> cache = DynamicCache()
    >>> cache.layers = [LinearAttentionLayer()]
    >>> _ = cache.update_recurrent_state(torch.zeros(1, 2), 0)
    >>> snap = take_snapshot(cache, 5)
    >>> _ = cache.update_recurrent_state(torch.ones(1, 2), 0)
    >>> restore(cache, snap)
    >>> cache.layers[0].recurrent_states[0].tolist(), snap.length
    ([[0.0, 0.0]], 5)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from deltaexit.generation.checks import key_selecting_attention
from deltaexit.generation.kv import (
    cache_view,
    fresh_cache,
    has_kv,
    has_state,
    is_opaque,
    layers_of,
    note_opaque_state,
)
from deltaexit.generation.statecache import StateCache, own_cache_class, side_state_cache
from deltaexit.generation.windowed import CacheWindowLayer

__all__ = [
    "RecurrentRound",
    "Snapshot",
    "StateStored",
    "advance_state",
    "continues_chunks",
    "recurrent_layers",
    "restore",
    "steps_one_at_a_time",
    "take_snapshot",
]


class StateStored(Exception):
    """Raised right after a block's mixer stored its recurrent state, to skip the rest of the block."""


def recurrent_layers(cache: DynamicCache) -> list[int]:
    """Indices of the cache layers that hold a recurrent state."""
    return [i for i, layer in enumerate(layers_of(cache)) if has_state(layer)]


def _copy(states: dict[int, torch.Tensor | None]) -> dict[int, torch.Tensor | None]:
    return {i: None if t is None else t.clone() for i, t in states.items()}


@dataclass
class _Saved:
    """One layer's states and flags."""

    conv: dict[int, torch.Tensor | None]
    recurrent: dict[int, torch.Tensor | None]
    flags: dict[str, dict[int, Any]]
    whole: dict[str, Any] | None = None  # an opaque layer's attributes (kv.is_opaque), every tensor copied


def _copied(value: Any) -> Any:
    """``value`` with every tensor inside (dicts, lists, tuples) cloned; anything else shared."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copied(v) for v in value)
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value`` (an object's attributes, dicts, lists, tuples), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


_FLAGS = ("has_previous_state", "is_conv_states_initialized", "is_recurrent_states_initialized", "conv_kernel_size")


@dataclass
class Snapshot:
    """Copies of the recurrent layers' states when the cache held ``length`` tokens."""

    length: int
    layers: dict[int, _Saved] = field(default_factory=dict)


def take_snapshot(cache: DynamicCache, length: int, layers: Iterable[int] | None = None) -> Snapshot:
    """Copy the recurrent states of ``layers`` (every recurrent layer by default); the cache holds ``length``."""
    snap = Snapshot(length)
    for idx in layers if layers is not None else recurrent_layers(cache):
        layer = layers_of(cache)[idx]
        if is_opaque(layer):  # a state as a whole: every attribute, tensors copied
            snap.layers[idx] = _Saved({}, {}, {}, _copied(vars(layer)))
            note_opaque_state(cache, idx, length, snap.layers[idx].whole or {})
            continue
        flags = {name: dict(getattr(layer, name)) for name in _FLAGS}
        snap.layers[idx] = _Saved(_copy(layer.conv_states), _copy(layer.recurrent_states), flags)
    return snap


def _put(current: dict[int, torch.Tensor | None], saved: dict[int, torch.Tensor | None]) -> None:
    for i, t in saved.items():
        now = current.get(i)
        if t is None:
            current[i] = None
        elif now is not None and now.shape == t.shape:
            now.copy_(t)  # in place: keeps the tensor the layer (and any static address) uses
        else:
            current[i] = t.clone()


def restore(cache: DynamicCache, snapshot: Snapshot, layers: Iterable[int] | None = None) -> None:
    """Put the snapshot's states back in ``layers`` (every layer it holds by default); the snapshot stays valid."""
    wanted = snapshot.layers.keys() if layers is None else [i for i in layers if i in snapshot.layers]
    for idx in wanted:
        layer, saved = layers_of(cache)[idx], snapshot.layers[idx]
        if saved.whole is not None:
            vars(layer).update(_copied(saved.whole))
            continue
        _put(layer.conv_states, saved.conv)
        _put(layer.recurrent_states, saved.recurrent)
        for name, values in saved.flags.items():
            getattr(layer, name).update(values)


def advance_state(cache: DynamicCache, layer_idx: int, run_block: Callable[[], Any]) -> bool:
    """Run ``run_block`` until its mixer stored the recurrent state of ``layer_idx`` (``propagate``'s analogue of a
    K/V-only call); the rest of the block (its output projection, MLP and residual) is skipped. A layer that also
    stores keys/values, has conv states only (short convolutions) or is opaque (kv.is_opaque: its state is
    written in several steps), runs the whole block. Returns whether the
    block was stopped early."""
    layer = layers_of(cache)[layer_idx]
    if has_kv(layer) or is_opaque(layer) or not any(layer.is_recurrent_states_initialized.values()):
        run_block()
        return False
    original = cache.update_recurrent_state

    def update_then_stop(states: Any, idx: int, *args: Any, **kwargs: Any) -> Any:
        out = original(states, idx, *args, **kwargs)
        if idx == layer_idx:
            raise StateStored
        return out

    cache.update_recurrent_state = update_then_stop  # type: ignore[method-assign, assignment]
    try:
        run_block()
    except StateStored:
        return True
    finally:
        del cache.update_recurrent_state
    return False


_CONTINUES: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _state_tensors(cache: DynamicCache) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for idx in recurrent_layers(cache):
        layer = layers_of(cache)[idx]
        if is_opaque(layer):
            found += [t.float() for t in _tensors(vars(layer))]
            continue
        found += [t.float() for t in layer.recurrent_states.values() if t is not None]
        found += [t[..., -layer.conv_kernel_size[i] :].float() for i, t in layer.conv_states.items() if t is not None]
    return found


def continues_chunks(model: Any) -> bool:
    """Whether ``model``'s recurrent layers continue their states over several tokens in one forward as they do one
    token at a time (True for a model with no recurrent layer). Found once per model: two tokens after a 4-token
    prompt, in one forward and in two, must leave the same states (within float tolerance)."""
    if model in _CONTINUES:
        return _CONTINUES[model]
    own = own_cache_class(model)  # a class of its own (MiniMax's): its states appear as the blocks run
    caches = (own(), own()) if own is not None else (fresh_cache(model.config), fresh_cache(model.config))
    if own is None and not recurrent_layers(caches[0]):
        _CONTINUES[model] = True
        return True
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    param = next(model.parameters())
    ids = (torch.arange(6, device=param.device)[None] * 7 + 3) % vocab
    with torch.no_grad():
        model(ids[:, :4], cache=caches[0], use_cache=True)
        model(ids[:, 4:], cache=caches[0], use_cache=True)
        model(ids[:, :4], cache=caches[1], use_cache=True)
        for i in (4, 5):
            model(ids[:, i : i + 1], cache=caches[1], use_cache=True)
    if own is not None:
        layers = int(model.config.get_text_config(decoder=True).num_hidden_layers)
        for cache in caches:
            side_state_cache(cache, max(layers, len(cache.layers)))
    tolerance = 1e-3 if param.dtype == torch.float32 else 3e-2
    ok = all(
        a.shape == b.shape and (b.numel() == 0 or bool((a - b).abs().max() <= tolerance * (b.abs().max() + 1e-6)))
        for a, b in zip(_state_tensors(caches[0]), _state_tensors(caches[1]), strict=True)
    )
    _CONTINUES[model] = ok
    return ok


_SELECTING: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def steps_one_at_a_time(model: Any, cache: DynamicCache) -> bool:
    """Whether several new tokens must run one at a time for the model to compute what its one-token steps
    (``model.generate``'s) compute: recurrent layers that do not :func:`continues_chunks`, attention that picks
    cached keys by a score (:func:`deltaexit.generation.checks.key_selecting_attention`, e.g. Doge's), a window
    only the cache applies (:class:`~deltaexit.generation.windowed.CacheWindowLayer`, e.g. moshi's), or a model's
    own state (:class:`~deltaexit.generation.statecache.StateCache`, e.g. RWKV's, whose one-token path at batch > 1
    is not its multi-token path)."""
    if isinstance(cache, StateCache) or any(isinstance(layer, CacheWindowLayer) for layer in layers_of(cache)):
        return True
    if isinstance(model, nn.Module):
        if model not in _SELECTING:
            _SELECTING[model] = key_selecting_attention(model) is not None
        if _SELECTING[model]:
            return True
    return bool(recurrent_layers(cache)) and model is not None and not continues_chunks(model)


class RecurrentRound:
    """``verify``'s recurrent-state bookkeeping for one draft/verify round (see the module docstring).

    Args:
        cache: The call's cache (its recurrent layers are snapshot now, before the drafts).
        start: Tokens in the cache.
        stepwise: Run several tokens one at a time (the model does not :func:`continues_chunks`).
    """

    def __init__(self, cache: DynamicCache, start: int, stepwise: bool = False) -> None:
        self.cache = cache
        self.start = start
        self.stepwise = stepwise
        self.snapshot = take_snapshot(cache, start)
        self.inputs: dict[int, torch.Tensor] = {}  # the verify pass's block inputs, [B, n_chunk, H], by layer
        self.pieces: dict[int, list[torch.Tensor]] = {}  # the same, one per token (:meth:`run_deep`)

    @classmethod
    def begin(cls, cache: DynamicCache, start: int, model: Any = None) -> RecurrentRound | None:
        """A round for ``cache``; None when it has no recurrent layer and its tokens need not run one at a time
        (:func:`steps_one_at_a_time`): nothing to do."""
        stepwise = model is not None and steps_one_at_a_time(model, cache)
        if not recurrent_layers(cache) and not stepwise:
            return None
        return cls(cache, start, stepwise=stepwise)

    def segments(self, n: int) -> list[tuple[int, int]]:
        """The pieces ``n`` chunk tokens run in: one, or one per token (:attr:`stepwise`)."""
        return [(i, i + 1) for i in range(n)] if self.stepwise else [(0, n)]

    def run_deep(self, scan: Any, stats: Any, ids, kwargs, draft_states, depth: int) -> torch.Tensor:
        """``verify``'s pass over the chunk from block ``depth`` on, one token at a time (:attr:`stepwise`): the
        chunk's last-block outputs ``[B, n_chunk, H]``; each block's input is kept in :attr:`pieces`, per token.

        Each token's output is its last position: a block may widen a one-token input, as ``model.generate``'s
        one-token steps do (RWKV's one-token path broadcasts its state over the batch at batch > 1), and the
        blocks here get exactly what they get there."""
        n_chunk = ids.shape[1] - self.start
        outs: list[torch.Tensor] = []
        pieces: dict[int, list[torch.Tensor]] = {}
        for i, _ in self.segments(n_chunk):
            with cache_view(self.cache, self.start + i):
                hidden, calls = scan.runner.record(**scan.model_inputs(ids, kwargs, self.start + i, self.start + i + 1))
            inputs: dict[int, torch.Tensor] = {}
            h = hidden if depth == 0 else draft_states[i][depth]
            outs.append(scan.run_blocks(h, calls, range(depth, scan.num_layers), stats, inputs)[:, -1:])
            for layer, x in inputs.items():
                pieces.setdefault(layer, []).append(x)
        self.pieces = pieces
        return torch.cat(outs, dim=1)

    def reset(self, layers: Iterable[int]) -> None:
        """Put ``layers``' states back to the round's start (before the verify pass runs them on the chunk)."""
        restore(self.cache, self.snapshot, layers)

    def keep(
        self, scan: Any, stats: Any, draft_states: list[list[torch.Tensor]], depth: int, ids, kwargs, kept: int
    ) -> None:
        """Leave the recurrent states after the first ``kept`` chunk tokens (the rest were rejected).

        Args:
            scan: The exit scan (its runner and recording).
            stats: The call's stats (the re-run blocks are counted in ``blocks_run``).
            draft_states: Each draft scan's block outputs (``states[l]`` = input of block ``l``).
            depth: The shallowest draft exit (blocks below it have the drafts' inputs; the others the verify
                pass's, in :attr:`inputs`).
            ids: The chunk's ids; ``kwargs``: the model kwargs that go with them.
            kept: Chunk tokens that stay in the cache.
        """
        n_chunk = ids.shape[1] - self.start
        if kept >= n_chunk or not self.snapshot.layers:
            return
        restore(self.cache, self.snapshot)
        layers = list(self.snapshot.layers)
        if scan.runner.carried:  # blocks that take the block before's extra output: every block up to them, in order
            layers = list(range(max(layers) + 1))
        for idx in layers:
            layer = layers_of(self.cache)[idx]
            if has_kv(layer):  # a hybrid (or re-run key/value) layer: its keys/values are stored again
                extra = layer.get_seq_length() - self.start
                if extra > 0:
                    DynamicLayer.crop(layer, -extra)
        for a, b in self.segments(kept):
            with cache_view(self.cache, self.start + a):
                _, calls = scan.runner.record(**scan.model_inputs(ids, kwargs, self.start + a, self.start + b))
            for idx in layers:
                if idx < depth:
                    h = torch.cat([states[idx] for states in draft_states[a:b]], dim=1)
                else:
                    h = self.pieces[idx][a] if self.stepwise else self.inputs[idx][:, a:b]
                scan.runner.run_block(idx, h, calls[idx])
                stats.blocks_run += 1
                stats.token_blocks_run += b - a
