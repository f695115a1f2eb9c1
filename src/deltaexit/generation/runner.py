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
argument that is (:attr:`BlockRunner.carried`, a :class:`Carry` per block); when the runner runs such a block, it
passes the extra output of the block run last, as the model's loop does. A pass that would start at such a block starts
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

from collections.abc import MutableMapping
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from deltaexit.parallel import ParallelBlocks
from deltaexit.structure import (
    ModelStructure,
    StructureError,
    block_input,
    find_structure,
    with_block_input,
)

__all__ = ["SKIPPED_CALL", "BlockCall", "BlockRunner", "Carry"]


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class BlockCall:
    """The positional and keyword arguments the model passes one block in one forward.

    ``skipped``: the model's forward did not call the block (one it skips on token ids alone,
    ``structure.skipped``): running it is the identity.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    skipped: bool = False


#: The call of a block the model's forward skips: :meth:`BlockRunner.run_block` passes the state through.
SKIPPED_CALL = BlockCall((), {}, skipped=True)


@dataclass(frozen=True)
class Carry:
    """Where a block takes an extra output of the block before it besides the hidden state (e.g. Zaya's router
    states): item ``output`` of that block's output tuple goes in as positional argument ``arg`` or keyword ``key``.

    Example:
        >>> Carry(output=1, arg=1).into((0, None, 2), {}, ("h", "router"))
        ((0, 'router', 2), {})
    """

    output: int
    arg: int | None = None
    key: str | None = None

    def into(self, args: tuple[Any, ...], kwargs: dict[str, Any], previous: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the carried value taken from ``previous`` (the block before's output tuple)."""
        if not isinstance(previous, tuple) or len(previous) <= self.output:
            raise RuntimeError("internal: a carried block ran before the block whose output it takes")
        value = previous[self.output]
        if self.arg is not None:
            return (*args[: self.arg], value, *args[self.arg + 1 :]), kwargs
        return args, {**kwargs, str(self.key): value}

    def taken_from(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The argument at this slot of a block call (None where the call has none)."""
        if self.arg is not None:
            return args[self.arg] if self.arg < len(args) else None
        return kwargs.get(str(self.key))


def _handed_on(output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Carry, ...]:
    """The items of a block's output tuple that are one of its own arguments, handed on unchanged to the next block
    (e.g. RWKV's ``state`` list, which every block updates in place): item ``output``, argument ``arg``/``key``."""
    if not isinstance(output, tuple):
        return ()
    slots = {id(x): Carry(0, arg=i) for i, x in enumerate(args) if i > 0}
    slots.update({id(x): Carry(0, key=k) for k, x in kwargs.items() if k != "hidden_states"})
    found = []
    for j, x in enumerate(output[1:], 1):
        if x is not None and not isinstance(x, (bool, int, float, str)) and id(x) in slots:
            slot = slots[id(x)]
            found.append(Carry(j, arg=slot.arg, key=slot.key))
    return tuple(found)


def _tensors(x: Any) -> list[torch.Tensor] | None:
    """``x``'s tensors where it is a non-empty tuple or list of tensors, else None."""
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    return None


def _returned_states(output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Carry, ...]:
    """The items of a block's output tuple that are a new value of one of its state arguments (a tuple of tensors of
    the same shapes, e.g. xLSTM's ``state``): item ``output``, argument ``arg``/``key``. Candidates only: the probe
    keeps those the model's loop then copies into the argument's tensors (:meth:`BlockRunner.probe_output_type`)."""
    if not isinstance(output, tuple):
        return ()
    slots = [(Carry(0, arg=i), x) for i, x in enumerate(args) if i > 0]
    slots += [(Carry(0, key=k), x) for k, x in kwargs.items() if k != "hidden_states"]
    found = []
    for j, out in enumerate(output[1:], 1):
        new = _tensors(out)
        for slot, x in slots:
            old = _tensors(x)
            if new and old and x is not out and [t.shape for t in old] == [t.shape for t in new]:
                found.append(Carry(j, arg=slot.arg, key=slot.key))
                break
    return tuple(found)


def _copied_back(carries: tuple[Carry, ...], output: Any, args: Any, kwargs: Any) -> tuple[Carry, ...]:
    """Those of ``carries`` whose argument tensors now equal the block's returned ones (the loop copied them in)."""
    kept = []
    for carry in carries:
        old, new = _tensors(carry.taken_from(args, kwargs)) or [], _tensors(output[carry.output]) or []
        if old and len(old) == len(new) and all(torch.equal(a, b) for a, b in zip(old, new, strict=True)):
            kept.append(carry)
    return tuple(kept)


def _same_stream(previous: Any, args: Any, kwargs: Any) -> bool:
    """Whether a block's hidden-state argument is (the value of) ``previous``, the block before's output."""
    try:
        hidden = block_input(args, kwargs)
    except StructureError:
        return True  # no hidden states to compare: nothing to say
    if hidden is previous or not isinstance(hidden, torch.Tensor) or not isinstance(previous, torch.Tensor):
        return True
    previous = previous.to(hidden.device, hidden.dtype)
    if hidden.dim() == previous.dim() >= 2 and hidden.shape[1] < previous.shape[1]:
        # the prompt's forward kept only the last positions' logits and cut the sequence before a block (Gemma-4
        # does before its KV-sharing blocks): the recording pass keeps every position (logits_to_keep=0) and refuses
        # a cut there by name, so only the positions kept are compared
        previous = previous[:, previous.shape[1] - hidden.shape[1] :]
    return hidden.shape == previous.shape and torch.equal(hidden, previous)


def _carry_in(fed: dict[int, int], args: Any, kwargs: Any) -> Carry | None:
    """Which argument of a block call (other than its hidden states) is one of the tensors in ``fed`` (``id`` ->
    index in the block before's output tuple)."""
    for i, x in enumerate(args):
        if i > 0 and id(x) in fed:
            return Carry(fed[id(x)], arg=i)
    for key, x in kwargs.items():
        if (args or key != "hidden_states") and id(x) in fed:
            return Carry(fed[id(x)], key=key)
    return None


def _mappings(args: Any, kwargs: Any) -> list[Any]:
    """The mutable mappings among a block call's arguments (e.g. ``transformers``' ``KVSharingDict``)."""
    return [x for x in (*args, *kwargs.values()) if isinstance(x, MutableMapping)]


def _changed(mapping: Any, before: dict[Any, Any]) -> bool:
    """Whether ``mapping`` has other keys, or other objects under them, than ``before`` (a copy taken earlier)."""
    return mapping.keys() != before.keys() or any(mapping[key] is not value for key, value in before.items())


class _SharedWrites:
    """Which blocks write into a mapping that a later block of the same forward is passed (KV shared between
    layers: Gemma-3n's and Gemma-4's ``shared_kv_states``, stored by one block and read by later ones)."""

    def __init__(self) -> None:
        self.before: dict[int, list[tuple[Any, dict[Any, Any]]]] = {}
        self.written_by: dict[int, set[int]] = {}  # id(mapping) -> blocks that changed it
        self.writers: set[int] = set()  # blocks whose writes a later block was passed

    def enter(self, index: int, args: Any, kwargs: Any) -> None:
        found = _mappings(args, kwargs)
        for mapping in found:
            self.writers |= self.written_by.get(id(mapping), set())
        self.before[index] = [(mapping, dict(mapping)) for mapping in found]

    def exit(self, index: int) -> None:
        for mapping, contents in self.before.pop(index, []):
            if _changed(mapping, contents):
                self.written_by.setdefault(id(mapping), set()).add(index)


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
        handed_on: tuple[Carry, ...] = (),
    ):
        super().__init__()
        object.__setattr__(self, "_padding", (None,) * max(arity - 1, 0))  # the block's other outputs (unused)
        object.__setattr__(self, "_handed_on", handed_on)  # outputs that are an argument, handed on unchanged
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
        if not self._returns_tuple:
            return hidden
        out = [hidden, *self._padding]
        for carry in self._handed_on:
            out[carry.output] = carry.taken_from(args, kwargs)
        return tuple(out)


def _check_plain_readout(model: nn.Module, structure: ModelStructure) -> None:
    """Raise :class:`~deltaexit.structure.StructureError` (before any block runs) for blocks that do not pass the
    residual stream the head reads as one ``[batch, seq, hidden]`` tensor (see :class:`~deltaexit.readout.Readout`)."""
    readout = structure.readout
    if readout.identity:
        return
    if len(readout.outputs) > 1:
        how = f"in {len(readout.outputs)} streams of each block's output (items {list(readout.outputs)}), concatenated"
    elif readout.segments > 1:
        how = f"as segment {readout.segment} of {readout.segments} streams along each block's sequence axis"
    else:
        how = "sequence-first ([seq, batch, hidden]) in each block's output"
    raise StructureError(
        f"{type(model).__name__}'s blocks hold the residual stream its head reads {how}: early exit runs the blocks "
        "on one [batch, seq, hidden] tensor and reads each exit off it, so none of the KV policies (verify, propagate, "
        "recompute) supports this model. dx.collect and the exact lens work on it (through the structure's readout); "
        "use model.generate to generate."
    )


def _check_block_modules(model: nn.Module, structure: ModelStructure) -> None:
    """Raise :class:`~deltaexit.structure.StructureError` (before any block runs) for virtual blocks over parallel
    per-layer lists (:class:`~deltaexit.parallel.ParallelBlocks`): the model's forward wires each layer's parts, so
    a layer cannot be recorded or run as one module call."""
    if not isinstance(structure.blocks, ParallelBlocks):
        return
    raise StructureError(
        f"{type(model).__name__}'s layers are not block modules: its forward wires each layer's parts, kept in "
        f"parallel lists {structure.block_path!r}, together itself. dx.collect and the exact lens work on it (through "
        "hooks on each layer's first and last part), but early exit records each block's arguments and runs the "
        "blocks one module call at a time, so none of the KV policies (verify, propagate, recompute) supports this "
        "model. Use model.generate."
    )


def _check_same_positions(hidden: torch.Tensor, calls: list[BlockCall], structure: ModelStructure) -> None:
    """Raise :class:`~deltaexit.structure.StructureError` where the forward passed a block fewer (or more) positions
    than the first block: the runner runs every block on the state of the block before."""
    for i, call in enumerate(calls):
        if call.skipped:
            continue
        n = structure.stream_input(call.args, call.kwargs).shape[1]
        if n != hidden.shape[1]:
            raise StructureError(
                f"the model's forward passed block {i} {n} positions and the first block {hidden.shape[1]}: it cuts "
                "the sequence inside its block loop, so early exit cannot run its blocks one after another on one "
                "state. Use model.generate."
            )


class BlockRunner:
    """Records the model's per-block arguments for a forward and runs blocks one by one.

    Args:
        model: A ``transformers`` causal LM.
        structure: Its :class:`~deltaexit.structure.ModelStructure` (found if not given).
    """

    def __init__(self, model: nn.Module, structure: ModelStructure | None = None) -> None:
        self.model = model
        self.structure = structure if structure is not None else find_structure(model)
        _check_plain_readout(model, self.structure)
        _check_block_modules(model, self.structure)
        self.blocks = self.structure.blocks
        self.num_layers = self.structure.num_layers
        self.skipped = frozenset(self.structure.skipped)  # blocks the model skips on token ids alone
        self._last_run = max(i for i in range(self.num_layers) if i not in self.skipped)
        self._parent, self._attr = self._locate_block_list()
        self.returns_tuple: bool | None = None
        self.output_arity = 1  # entries of a block's output tuple (the model's loop may unpack them all)
        self.call_counts: list[int] | None = None
        self.carried: dict[int, Carry] = {}  # blocks whose input takes the block before's extra output
        self.handed_on: tuple[Carry, ...] = ()  # block outputs that are one of its arguments (the recorders return it)
        self.returns_state: tuple[Carry, ...] = ()  # block outputs the model's loop copies into a state argument
        self.changed: list[int] = []  # blocks whose input is not the output before (the loop changed it)
        self.shared_writers: frozenset[int] = frozenset()  # blocks that store state later blocks read (probed)
        self._previous: Any = None  # the output of the last block run (what a carried block takes)
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
        runs and whether a block's extra outputs feed the next block (:attr:`carried`, handed on by
        :meth:`run_block`) and which blocks store state into a mapping a later block is passed
        (:attr:`shared_writers`); remove after one forward."""
        self.call_counts = [0] * self.num_layers
        self.carried = {}
        self.changed = []
        self._recorders = None  # rebuilt with what this probe finds
        outs: dict[int, Any] = {}  # the last block output not yet compared with the next block's input
        extras: dict[int, dict[int, int]] = {}
        first: list[Any] = [(), {}, None]  # block 0's arguments and output
        self.returns_state = ()
        candidates: list[tuple[Carry, ...]] = [()]
        shared = _SharedWrites()

        def note(_module: nn.Module, _args: Any, output: Any) -> None:
            self.returns_tuple = not isinstance(output, torch.Tensor)
            self.output_arity = len(output) if isinstance(output, tuple) else 1
            self.handed_on = _handed_on(output, *first[:2])
            candidates[0] = _returned_states(output, *first[:2])
            first[2] = output

        def after(index: int, _module: nn.Module, _args: Any, output: Any) -> None:
            self.call_counts[index] += 1  # type: ignore[index]
            rest = output[1:] if isinstance(output, tuple) else ()
            extras[index] = {id(x): i for i, x in enumerate(rest, 1) if isinstance(x, torch.Tensor)}
            outs[index] = output[0] if isinstance(output, tuple) and output else output
            shared.exit(index)

        def before(index: int, _module: nn.Module, args: Any, kwargs: Any) -> None:
            if index == 0:
                first[:] = [args, kwargs, None]
            if index == 1 and candidates[0]:  # block 0's returned state, once the loop copied it (or not)
                self.returns_state = _copied_back(candidates[0], first[2], *first[:2])
            if index - 1 in outs and not _same_stream(outs.pop(index - 1), args, kwargs):
                self.changed.append(index)
            shared.enter(index, args, kwargs)
            self.shared_writers = frozenset(shared.writers)
            fed = extras.get(index - 1)
            carry = _carry_in(fed, args, kwargs) if fed else None
            if carry is not None:
                self.carried[index] = carry

        handles = [self.blocks[0].register_forward_hook(note)]
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_hook(partial(after, i)))
            handles.append(block.register_forward_pre_hook(partial(before, i), with_kwargs=True))
        return _Handles(handles)

    def check_called_once(self) -> None:
        """Raise :class:`~deltaexit.structure.StructureError` unless the probed forward ran every block once (a
        looped, recurrent-depth model runs some blocks several times per forward). A block that takes the block
        before's extra output (e.g. router states) is fine: :meth:`run_block` hands it on."""
        counts = self.call_counts
        name = type(self.model).__name__
        ran = [i for i in self.skipped if counts is not None and counts[i] > 0]
        if ran:
            raise StructureError(
                f"{name}'s blocks {sorted(ran)} ran in this forward, but the model skips them on token ids alone "
                "(structure.skipped: e.g. cross-attention blocks run only with image features): early exit generates "
                "from token ids alone. Pass no image or cross-attention inputs, or use model.generate."
            )
        counts = None if counts is None else [1 if i in self.skipped else n for i, n in enumerate(counts)]
        if counts is not None and any(n != 1 for n in counts):
            again = [i for i, n in enumerate(counts) if n != 1]
            times = "/".join(str(n) for n in sorted({counts[i] for i in again}))
            raise StructureError(
                f"{name}'s forward ran blocks {again} {times} times (a looped, recurrent-depth model): early exit runs "
                "each block of the list once, in order, so none of the KV policies (verify, propagate, recompute) "
                "supports it. Use model.generate."
            )
        if self.changed:
            raise StructureError(
                f"{name}'s forward changes the hidden state between blocks (blocks {self.changed} get another value "
                "than the block before returned, e.g. RWKV's rescaling every rescale_every layers): early exit runs "
                "the blocks back to back, so none of the KV policies (verify, propagate, recompute) would reproduce "
                "model.generate. Use model.generate."
            )

    def chain_start(self, layer: int) -> int:
        """Where a pass that should start at block ``layer`` starts: the first block of the chain of blocks up to
        ``layer`` each fed by the block before it (``layer`` itself where it takes nothing from block ``layer - 1``),
        so that every block of the pass gets the extra output it takes (:attr:`carried`)."""
        while layer in self.carried:
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
            recorders = nn.ModuleList(
                [
                    _Recorder(
                        block,
                        i,
                        sink,
                        i == self._last_run,
                        bool(self.returns_tuple),
                        self.output_arity,
                        self.handed_on + self.returns_state,  # a returned state: the loop copies it onto itself
                    )
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
        missing = [i for i, c in enumerate(sink) if c is None and i not in self.skipped]
        if missing:
            raise StructureError(f"the model's forward skipped blocks {missing}; unsupported architecture")
        calls = cast(list[BlockCall], list(sink))
        for i in self.skipped:
            if calls[i] is None:
                calls[i] = SKIPPED_CALL
        first = next(call for call in calls if not call.skipped)
        hidden = self.structure.stream_input(first.args, first.kwargs)
        _check_same_positions(hidden, calls, self.structure)
        return hidden, calls

    def run_block(self, layer: int, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """Run real block ``layer`` on ``hidden`` with the arguments the model would pass it (the identity for a block
        the model skipped).

        ``hidden`` and the result are in deltaexit's ``[batch, seq, *state]`` layout (what :meth:`record` returns):
        the block gets the state in its own layout (``structure.native_of``: e.g. Gemma-3n's AltUp streams stacked on
        a leading axis) and its output comes back through ``structure.stream_output``.

        A :attr:`carried` block gets the extra output of the last block run (the block before it, on the same
        tokens, wherever the policies run blocks in order; a K/V-only call after an exit gets the exit block's).
        """
        if call.skipped:
            return hidden
        structure = self.structure
        args, kwargs = with_block_input(call.args, call.kwargs, structure.native_of(hidden))
        carry = self.carried.get(layer)
        if carry is not None:
            args, kwargs = carry.into(args, kwargs, self._previous)
        output = self.blocks[layer](*args, **kwargs)
        for state in self.returns_state:  # the new state goes where the model's loop puts it: into the argument's
            for old, new in zip(state.taken_from(args, kwargs), output[state.output], strict=True):
                if old is not new:
                    old.copy_(new)
        if self.carried:
            self._previous = output
        return structure.stream_output(output)
