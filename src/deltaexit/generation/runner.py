"""Run a causal LM's decoder blocks one at a time, with the model's own prologue.

The model's forward computes, before its block loop, everything the blocks need
(embeddings, rotary tables, causal/sliding masks, alibi, ...). :class:`BlockRunner`
lets the model's own forward do that work, with the block list temporarily swapped
for lightweight recorders that store the exact arguments each block would receive
and abort the forward at the last one. The caller then runs the real blocks itself,
as many as it wants, with those arguments. No per-architecture forward code is
forked: whatever the model passes its blocks, the runner passes too.

Some models hand a block's extra outputs to the next block besides the hidden state (GLM-5 and Hunyuan's sparse
attention layers reuse the previous layer's top-k selection, Zaya its router states). The probe finds which
arguments those are (:attr:`BlockRunner.feeds`); when the runner runs such a block right after the block before it,
it passes the extra outputs of that run, as the model's loop does. A pass that would start at such a block starts
at the first block of its chain instead (:meth:`BlockRunner.chain_start`).

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=2)
    >>> runner = BlockRunner(model)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> handle = runner.probe_output_type()  # one real forward tells the runner the blocks' output type
    >>> with torch.no_grad():
    ...     full = model(ids, output_hidden_states=True).hidden_states[-1]
    >>> handle.remove()
    >>> with torch.no_grad():
    ...     h, calls = runner.record(input_ids=ids, use_cache=False)
    ...     for layer in range(runner.num_layers):
    ...         h = runner.run_block(layer, h, calls[layer])
    >>> torch.allclose(runner.structure.final_norm(h), full, atol=1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from deltaexit.structure import (
    ModelStructure,
    StructureError,
    block_input,
    block_output,
    find_structure,
    with_block_input,
)

__all__ = ["BlockCall", "BlockRunner"]


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class BlockCall:
    """The positional and keyword arguments the model passes one block in one forward."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Recorded(Exception):
    """Raised by the last recorder to abort the model's forward once every call is stored."""


class _Recorder(nn.Module):
    """Stands in for one block during a recording pass; unknown attributes come from the block."""

    def __init__(
        self,
        block: nn.Module,
        index: int,
        sink: list[BlockCall | None],
        last: bool,
        returns_tuple: bool,
        arity: int = 1,
    ):
        super().__init__()
        object.__setattr__(self, "_padding", (None,) * max(arity - 1, 0))  # the block's other outputs (unused)
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_sink", sink)
        object.__setattr__(self, "_last", last)
        object.__setattr__(self, "_returns_tuple", returns_tuple)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._sink[self._index] = BlockCall(args, kwargs)
        if self._last:
            raise _Recorded
        hidden = block_input(args, kwargs)
        return (hidden, *self._padding) if self._returns_tuple else hidden


class BlockRunner:
    """Records the model's per-block arguments for a forward and runs blocks one by one.

    Args:
        model: A ``transformers`` causal LM.
        structure: Its :class:`~deltaexit.structure.ModelStructure` (found if not given).
    """

    def __init__(self, model: nn.Module, structure: ModelStructure | None = None) -> None:
        self.model = model
        self.structure = structure if structure is not None else find_structure(model)
        self.blocks = self.structure.blocks
        self.num_layers = self.structure.num_layers
        self._parent, self._attr = self._locate_block_list()
        self.returns_tuple: bool | None = None
        self.output_arity = 1  # entries of a block's output tuple (the model's loop may unpack them all)
        self.call_counts: list[int] | None = None
        self.carried: list[int] = []  # blocks whose input takes the previous block's extra outputs
        #: Per such block: (keyword name or positional index, index among the previous block's extra outputs).
        self.feeds: dict[int, list[tuple[str | int, int]]] = {}
        self._last: tuple[int, tuple[Any, ...]] | None = None  # the block run last and its extra outputs
        self._sink: list[BlockCall | None] = [None] * self.num_layers
        self._recorders: nn.ModuleList | None = None  # built once (per output type), reused every step

    def _locate_block_list(self) -> tuple[nn.Module, str]:
        for _name, module in self.model.named_modules():
            for child_name, child in module.named_children():
                if child is self.blocks:
                    return module, child_name
        raise StructureError(
            "the block list is not an attribute of a module inside the model; early-exit generation needs to "
            "swap it during a recording pass. Pass blocks='<dotted path>' to dx.find_structure."
        )

    def probe_output_type(self) -> Any:
        """Forward hooks (one returned handle) that note block 0's output type and tuple length, how often each block
        runs and whether a block's extra outputs feed the next block (:meth:`check_called_once`); remove after one
        forward."""
        self.call_counts = [0] * self.num_layers
        self.carried = []
        self.feeds = {}
        extras: dict[int, dict[int, int]] = {}

        def note(_module: nn.Module, _args: Any, output: Any) -> None:
            self.returns_tuple = not isinstance(output, torch.Tensor)
            self.output_arity = len(output) if isinstance(output, tuple) else 1

        def after(index: int, _module: nn.Module, _args: Any, output: Any) -> None:
            self.call_counts[index] += 1  # type: ignore[index]
            rest = output[1:] if isinstance(output, tuple) else ()
            extras[index] = {id(x): k for k, x in enumerate(rest) if isinstance(x, torch.Tensor)}

        def before(index: int, _module: nn.Module, args: Any, kwargs: Any) -> None:
            fed = extras.get(index - 1, {})
            slots: list[tuple[str | int, int]] = [(pos, fed[id(x)]) for pos, x in enumerate(args) if id(x) in fed]
            slots += [(name, fed[id(x)]) for name, x in kwargs.items() if id(x) in fed]
            if slots:
                self.carried.append(index)
                self.feeds[index] = slots

        handles = [self.blocks[0].register_forward_hook(note)]
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_hook(partial(after, i)))
            handles.append(block.register_forward_pre_hook(partial(before, i), with_kwargs=True))
        return _Handles(handles)

    def check_called_once(self) -> None:
        """Raise :class:`~deltaexit.structure.StructureError` unless the probed forward ran every block once (a
        looped, recurrent-depth model runs some blocks several times per forward)."""
        counts = self.call_counts
        name = type(self.model).__name__
        if counts is not None and any(n != 1 for n in counts):
            again = [i for i, n in enumerate(counts) if n != 1]
            times = "/".join(str(n) for n in sorted({counts[i] for i in again}))
            raise StructureError(
                f"{name}'s forward ran blocks {again} {times} times (a looped, recurrent-depth model): early exit runs "
                "each block of the list once, in order, so none of the KV policies (verify, propagate, recompute) "
                "supports it. Use model.generate."
            )

    def check_fed(self, stateful: list[int]) -> None:
        """Raise :class:`~deltaexit.structure.StructureError` if a block whose cache is a recurrent state (its
        ``stateful`` layers) takes an extra output of the block before it: its state is re-run on its own (rejected
        drafts, held-back tokens), without the previous block's outputs for those tokens."""
        fed = sorted(set(self.feeds).intersection(stateful))
        if fed:
            raise StructureError(
                f"{type(self.model).__name__}'s blocks {fed} hold a recurrent state and take an extra output of the "
                "block before them besides the hidden state: early exit re-runs recurrent blocks on their own, "
                "without those outputs, so none of the KV policies (verify, propagate, recompute) supports it. Use "
                "model.generate."
            )

    def chain_start(self, layer: int) -> int:
        """Where a pass that should start at block ``layer`` starts: the first block of the chain of blocks up to
        ``layer`` each fed by the block before it (``layer`` itself where it takes nothing from block ``layer - 1``),
        so that every block of the pass gets the extra outputs it takes."""
        while layer in self.feeds:
            layer -= 1
        return layer

    def record(self, **model_inputs: Any) -> tuple[torch.Tensor, list[BlockCall]]:
        """Run the model's forward up to its block loop; return block 0's input and every block's arguments."""
        if self.returns_tuple is None:
            raise RuntimeError("internal: run one real forward with probe_output_type() attached before record()")
        sink = self._sink
        self._last = None  # a new pass: no block of it has run yet
        for i in range(self.num_layers):
            sink[i] = None
        recorders = self._recorders
        if recorders is None or recorders[0]._returns_tuple != bool(self.returns_tuple):
            n = self.num_layers
            recorders = nn.ModuleList(
                [
                    _Recorder(block, i, sink, i == n - 1, bool(self.returns_tuple), self.output_arity)
                    for i, block in enumerate(self.blocks)
                ]
            )
            self._recorders = recorders
        setattr(self._parent, self._attr, recorders)
        try:
            self.model(**model_inputs)
        except _Recorded:
            pass
        else:
            raise StructureError(
                "the model's forward did not call its last block; early-exit generation cannot record the block "
                "arguments for this architecture."
            )
        finally:
            setattr(self._parent, self._attr, self.blocks)
        if any(call is None for call in sink):
            missing = [i for i, c in enumerate(sink) if c is None]
            raise StructureError(f"the model's forward skipped blocks {missing}; unsupported architecture")
        calls = cast(list[BlockCall], list(sink))
        return block_input(calls[0].args, calls[0].kwargs), calls

    def run_block(self, layer: int, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """Run real block ``layer`` on ``hidden`` with the arguments the model would pass it (and, run right after
        block ``layer - 1``, that run's extra outputs where block ``layer`` takes them: :attr:`feeds`)."""
        args, kwargs = with_block_input(call.args, call.kwargs, hidden)
        last, self._last = self._last, None
        feeds = self.feeds.get(layer)
        if feeds and last is not None and last[0] == layer - 1:
            args = _fed(args, kwargs, feeds, last[1])
        out = self.blocks[layer](*args, **kwargs)
        if layer + 1 in self.feeds and isinstance(out, tuple):
            self._last = (layer, out[1:])
        return block_output(out)


def _fed(args: tuple[Any, ...], kwargs: dict[str, Any], feeds: list[tuple[str | int, int]], extras: tuple) -> tuple:
    """``args`` with the fed positions set from ``extras``; ``kwargs`` (a copy) set in place."""
    positional = list(args)
    for slot, k in feeds:
        if k >= len(extras):
            continue
        if isinstance(slot, str):
            kwargs[slot] = extras[k]
        elif slot < len(positional):
            positional[slot] = extras[k]
    return tuple(positional)
