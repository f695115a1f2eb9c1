"""Layers kept as parts in parallel per-layer lists: one virtual block per layer.

Some decoders have no block module: one module holds each layer's parts in parallel ``nn.ModuleList``s of the same
length (XLM's ``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2``) and its forward wires layer ``i``'s parts
together itself, all of layer ``i``'s calls before any of layer ``i + 1``'s. The residual stream still passes from
layer to layer: it enters a layer as the input of the layer's first part, and (where the layer ends with its last
part, as XLM's post-norm layers do) leaves it as the output of its last part.

:class:`ParallelBlock` is such a layer as a block: a module that holds the layer's parts (their parameters are the
block's) and whose hooks are the parts' own: :meth:`ParallelBlock.register_forward_pre_hook` registers on the first
part called (it sees the stream entering the layer), :meth:`ParallelBlock.register_forward_hook` on the last one
(it sees the stream the layer leaves, once it has left). Everything that only observes blocks (collecting, the
structure check, exit losses) works through it; a virtual block cannot be *run* on its own (the model's forward holds
the wiring) nor have its output replaced, so early exit and layer dropout refuse it. :func:`parallel_blocks` finds
the layers' call order on one forward and checks that each layer's output is the next layer's input.

Example:
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> cfg = AutoConfig.for_model("xlm", emb_dim=32, n_layers=2, n_heads=4, vocab_size=64, causal=True)
    >>> model = AutoModelForCausalLM.from_config(cfg)
    >>> names = ("attentions", "layer_norm1", "ffns", "layer_norm2")
    >>> lists = [(f"transformer.{n}", getattr(model.transformer, n)) for n in names]
    >>> blocks = parallel_blocks(model, lists, torch.tensor([[5, 6, 7]]))
    >>> len(blocks), blocks.path, type(blocks[0].entry).__name__, type(blocks[0].exit).__name__
    (2, 'transformer.{attentions,layer_norm1,ffns,layer_norm2}', 'MultiHeadAttention', 'LayerNorm')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ParallelBlock", "ParallelBlocks", "block_exits", "parallel_blocks"]


class JoinedHandle:
    """Several hook handles removed as one (what a :class:`ParallelBlock`'s forward hook registers)."""

    def __init__(self, handles: Sequence[RemovableHandle]) -> None:
        self.handles = list(handles)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> JoinedHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class ParallelBlock(nn.Module):
    """One layer whose parts sit in parallel per-layer lists, as a block (see the module docstring).

    A forward hook on it sees the last part's output once the stream leaves the layer: it runs when the next layer's
    first part is called (or the lists' parent module returns, after the last layer), so a change the forward makes
    to that tensor in place between two layers (XLM's ``tensor *= mask``, zeroing padded positions) is in it. Such a
    hook cannot replace the output (it returns None).

    Args:
        parts: ``(name, module)`` of the layer's parts in the order the model's forward calls them.
        layer: The layer's index (for messages).
    """

    def __init__(self, parts: Sequence[tuple[str, nn.Module]], layer: int = 0) -> None:
        super().__init__()
        if not parts:
            raise ValueError("a parallel block needs at least one part")
        for name, part in parts:
            self.add_module(name, part)
        self.layer = layer
        # Where the stream has left the layer: the next layer's first part and the lists' parent (in a tuple, so
        # that nn.Module does not register them as this block's submodules).
        self._leaves: tuple[nn.Module | None, nn.Module | None] = (None, None)

    def leaves_into(self, following: nn.Module | None, parent: nn.Module | None) -> None:
        """Where the stream has left the layer: ``following`` (the next layer's first part, None after the last)
        is called, or ``parent`` (the module whose forward wires the lists) returns."""
        self._leaves = (following, parent)

    @property
    def entry(self) -> nn.Module:
        """The part called first: its input is the residual stream entering the layer."""
        return next(iter(self._modules.values()))  # type: ignore[return-value]

    @property
    def exit(self) -> nn.Module:
        """The part called last: its output is the residual stream leaving the layer."""
        return list(self._modules.values())[-1]  # type: ignore[return-value]

    def register_forward_hook(  # type: ignore[override]
        self, hook: Callable[..., Any], *, prepend: bool = False, with_kwargs: bool = False, always_call: bool = False
    ) -> JoinedHandle:
        """A forward hook on the layer's last part, run once the stream has left the layer (see the class)."""
        pending: list[tuple] = []

        def hold(*call: Any) -> None:
            pending[:] = [call]

        def flush(*_: Any) -> None:
            if not pending:
                return
            if hook(*pending.pop()) is not None:
                raise RuntimeError(
                    f"a forward hook on virtual block {self.layer} returned a value: the stream leaving a layer of "
                    "parallel per-layer lists cannot be replaced by a hook (it runs after the layer's last part)."
                )

        handles = [
            self.exit.register_forward_hook(hold, prepend=prepend, with_kwargs=with_kwargs, always_call=always_call)
        ]
        following, parent = self._leaves
        if following is not None:
            handles.append(following.register_forward_pre_hook(flush, prepend=True))
        if parent is not None:  # after the last layer; a forward that starts anew drops what a failed one left
            handles.append(parent.register_forward_hook(flush, prepend=True))
            handles.append(parent.register_forward_pre_hook(lambda *_: pending.clear(), prepend=True))
        return JoinedHandle(handles)

    def register_forward_pre_hook(  # type: ignore[override]
        self, hook: Callable[..., Any], *, prepend: bool = False, with_kwargs: bool = False
    ) -> RemovableHandle:
        """A forward pre-hook on the layer's first part (its input: the stream entering the layer)."""
        return self.entry.register_forward_pre_hook(hook, prepend=prepend, with_kwargs=with_kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = ", ".join(self._modules)
        raise RuntimeError(
            f"layer {self.layer} is a virtual block over the parts {names} of parallel per-layer lists: the model's "
            "own forward wires them together, so the layer cannot be run as one module (hook it instead)."
        )


class ParallelBlocks(nn.ModuleList):
    """The virtual blocks of a model that keeps its layers' parts in parallel lists under one parent module.

    Args:
        lists: ``(dotted path, list)`` of the parallel lists in the order the forward calls each layer's parts; the
            paths share one parent.
        parent: The module that holds the lists (whose forward wires them).
    """

    def __init__(self, lists: Sequence[tuple[str, nn.ModuleList]], parent: nn.Module) -> None:
        names = [path.rpartition(".")[2] for path, _ in lists]
        n = len(lists[0][1]) if lists else 0
        blocks = [ParallelBlock([(name, m[i]) for name, (_, m) in zip(names, lists)], i) for i in range(n)]
        for i, block in enumerate(blocks):
            block.leaves_into(blocks[i + 1].entry if i + 1 < n else None, parent)
        super().__init__(blocks)
        prefix = lists[0][0].rpartition(".")[0] if lists else ""
        self.lists = tuple(path for path, _ in lists)
        #: ``'transformer.{attentions,layer_norm1,ffns,layer_norm2}'``: where the parts are (for messages).
        self.path = (f"{prefix}." if prefix else "") + "{" + ",".join(names) + "}"


def block_exits(blocks: Iterable[nn.Module]) -> list[nn.Module]:
    """The modules whose calls return each block's output: a :class:`ParallelBlock`'s last part, else the block.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> block_exits([lin]) == [lin]
        True
    """
    return [b.exit if isinstance(b, ParallelBlock) else b for b in blocks]


def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _output_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


@dataclass
class _Trace:
    """What one forward showed of the parallel lists' entries: ``(list, layer)`` per call in order, and each
    entry's first tensor input and its output (the tensors themselves, kept alive: compared by identity)."""

    calls: list[tuple[int, int]] = field(default_factory=list)
    inputs: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict)
    outputs: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict)

    def enter(self, key: tuple[int, int], args: tuple, kwargs: dict) -> None:
        self.calls.append(key)
        self.inputs[key] = _first_tensor(args, kwargs)

    def leave(self, key: tuple[int, int], output: object) -> None:
        self.outputs[key] = _output_tensor(output)


def _trace(model: nn.Module, lists: Sequence[tuple[str, nn.ModuleList]], ids: torch.Tensor) -> _Trace | None:
    """Every entry's calls on a cacheless eval forward on ``ids`` (None if that forward fails). The model is left with
    no hooks and in its training mode."""
    trace = _Trace()
    handles = []
    for j, (_, m) in enumerate(lists):
        for i, entry in enumerate(m):
            key = (j, i)
            handles.append(
                entry.register_forward_pre_hook(lambda _m, a, k, key=key: trace.enter(key, a, k), with_kwargs=True)
            )
            handles.append(entry.register_forward_hook(lambda _m, _a, out, key=key: trace.leave(key, out)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception:  # a forward that fails here is reported by the structure check
        return None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return trace


def _layer_order(trace: _Trace, num_lists: int, num_layers: int) -> list[int] | str | None:
    """The lists' call order within a layer when every layer calls each list's entry once, in the same order; None
    when the lists are not called layer by layer; else why they are one layer's parts but no block."""
    if len(set(trace.calls)) != num_lists * num_layers:
        return None
    layers = [i for _, i in trace.calls]
    if layers != sorted(layers):
        return None
    per_layer = [[j for j, i in trace.calls if i == layer] for layer in range(num_layers)]
    first = per_layer[0]
    if any(p != first for p in per_layer) or len(first) != num_lists:
        counts = sorted({len(p) for p in per_layer})
        return (
            f"each layer makes {'/'.join(map(str, counts))} calls to its {num_lists} parts, not one call each in one "
            "order (a layer calls a part twice, or the layers call their parts in different orders)"
        )
    return first


def _chain_break(trace: _Trace, order: list[int], num_layers: int) -> str | None:
    """Why layer ``i + 1``'s first part does not take the very tensor layer ``i``'s last part returned (None if each
    does: the stream passes from layer to layer with no step outside the parts, but changes made to it in place)."""
    first, last = order[0], order[-1]
    for layer in range(num_layers - 1):
        out, nxt = trace.outputs.get((last, layer)), trace.inputs.get((first, layer + 1))
        if out is None or nxt is None or out is not nxt:
            return (
                f"layer {layer + 1}'s first part does not take the tensor layer {layer}'s last part returned (the "
                "stream leaves a layer through a step outside its parts, e.g. a residual added after the last one)"
            )
    return None


def parallel_blocks(
    model: nn.Module, lists: Sequence[tuple[str, nn.ModuleList]], ids: torch.Tensor
) -> ParallelBlocks | str | None:
    """The virtual blocks over parallel per-layer ``lists`` (one parent, one length), found on one forward.

    Returns None when one cacheless forward on ``ids`` does not call every entry of every list layer by layer (all
    of layer ``i``'s calls before any of layer ``i + 1``'s): the lists are not the parts of one layer each. Returns a
    string saying why when they are, but no block can stand for a layer: a layer calls a part twice, the layers call
    their parts in different orders, or the next layer's first part does not take the tensor the last part returned.
    Else the :class:`ParallelBlocks`, the lists in the order each layer calls them. The model is left with no hooks
    and in its training mode.

    Args:
        model: The causal LM.
        lists: ``(dotted path in model, list)`` of the candidate lists.
        ids: ``[1, seq]`` token ids of the dummy forward.
    """
    parents = {path.rpartition(".")[0] for path, _ in lists}
    if len(lists) < 2 or len({len(m) for _, m in lists}) != 1 or len(parents) != 1:
        return None
    num_layers = len(lists[0][1])
    trace = _trace(model, lists, ids)
    if trace is None:
        return None
    order = _layer_order(trace, len(lists), num_layers)
    if order is None or isinstance(order, str):
        return order
    broken = _chain_break(trace, order, num_layers)
    if broken is not None:
        return broken
    parent = parents.pop()
    return ParallelBlocks([lists[j] for j in order], model.get_submodule(parent) if parent else model)
