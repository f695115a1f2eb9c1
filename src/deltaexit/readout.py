"""Where a model's blocks hold the residual stream its head reads, when not as ``output[0]``, ``[batch, seq, hidden]``.

Most decoders pass one ``[batch, seq, hidden]`` tensor from block to block, and the head reads it (after the final
norm). Some do not, and do something between the last block and the final norm or head instead:

- **sequence-first** blocks (``[seq, batch, hidden]``): the model transposes before its head (XLNet);
- **several streams along the sequence axis**: the blocks carry ``k`` equal segments of the token length (a main
  stream and predicting streams) and the head reads one of them (ProphetNet's first n-gram stream);
- **several streams in the block's output tuple**: a reversible residual (RevNet) block returns two half-streams
  and the model concatenates them before its final norm (Reformer's ``[attn_output, hidden_states]``).

A :class:`Readout` states which of these applies, so the residual stream as collected is ``[batch, seq, *state]``
and the exact lens works on it. :func:`readout_candidates` lists the readouts a block's observed output allows;
structure discovery (:meth:`deltaexit.structure.ModelStructure.validate`) adopts the first one whose lens
reproduces the model's logits.

Example:
    >>> import torch
    >>> seq_first = Readout(seq_first=True)
    >>> tuple(seq_first.output((torch.zeros(6, 1, 4), None)).shape)
    (1, 6, 4)
    >>> two = Readout(outputs=(1, 0), inputs=("a", "b"), width=8)
    >>> two.output((torch.zeros(1, 3, 4), torch.ones(1, 3, 4)))[0, 0].tolist()
    [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Readout", "output_items", "readout_candidates"]

#: Most output-tuple streams a candidate readout concatenates (RevNet blocks have two).
MAX_STREAMS = 3


def output_items(output: object) -> list[torch.Tensor | None]:
    """A block's output as a list: the items of a tuple (tensors or None for anything else), or ``[tensor]``.

    Example:
        >>> [None if t is None else tuple(t.shape) for t in output_items((torch.zeros(2, 3), "x"))]
        [(2, 3), None]
    """
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [item if isinstance(item, torch.Tensor) else None for item in output]
    return []


@dataclass(frozen=True)
class Readout:
    """Where a block's residual stream is, in its output and in its call, as the head reads it.

    Attributes:
        outputs: Items of the block's output tuple, concatenated along the last dim (``(0,)``: the first item).
        inputs: The block-call arguments that hold the same streams, in the same order: a positional index or a
            keyword (``(0,)``: the first positional argument, else ``hidden_states=``).
        seq_first: The block's tensors are ``[seq, batch, ...]``.
        segments: The block's sequence axis holds this many equal segments of the token length (streams).
        segment: The segment the head reads.
        width: The state's width when the streams are concatenated (None: one stream, the model's hidden size).
    """

    outputs: tuple[int, ...] = (0,)
    inputs: tuple[int | str, ...] = (0,)
    seq_first: bool = False
    segments: int = 1
    segment: int = 0
    width: int | None = None

    @property
    def identity(self) -> bool:
        """Whether this readout is ``output[0]`` / the first input, as is: the usual decoder."""
        return self.outputs == (0,) and self.inputs == (0,) and not self.seq_first and self.segments == 1

    def describe(self) -> dict[str, Any] | None:
        """A JSON-friendly summary (None for the identity readout)."""
        if self.identity:
            return None
        return {
            "outputs": list(self.outputs),
            "inputs": list(self.inputs),
            "seq_first": self.seq_first,
            "segment": f"{self.segment} of {self.segments}" if self.segments > 1 else None,
            "width": self.width,
        }

    def view(self, x: torch.Tensor) -> torch.Tensor | None:
        """One stream tensor in the token layout ``[batch, seq, ...]`` (None when ``x`` does not fit the layout)."""
        if self.seq_first:
            if x.dim() < 3:
                return None
            x = x.transpose(0, 1)
        if self.segments > 1:
            if x.dim() < 3 or x.shape[1] % self.segments:
                return None
            n = x.shape[1] // self.segments
            x = x[:, self.segment * n : (self.segment + 1) * n]
        return x

    def _join(self, streams: Sequence[Any]) -> torch.Tensor | None:
        views = [self.view(s) if isinstance(s, torch.Tensor) else None for s in streams]
        if any(v is None for v in views):
            return None
        if len(views) == 1:
            return views[0]
        try:
            return torch.cat(views, dim=-1)  # type: ignore[arg-type]
        except RuntimeError:
            return None

    def output(self, output: object) -> torch.Tensor | None:
        """The state a block's output holds (None when the output does not have this readout's items)."""
        items = output_items(output)
        if any(i >= len(items) for i in self.outputs):
            return None
        return self._join([items[i] for i in self.outputs])

    def input(self, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The state a block was called with (None when the call lacks one of this readout's arguments)."""
        streams: list[Any] = []
        for where in self.inputs:
            if isinstance(where, str):
                streams.append(kwargs.get(where))
            elif where < len(args):
                streams.append(args[where])
            else:
                streams.append(kwargs.get("hidden_states") if where == 0 else None)
        return self._join(streams)


def _layouts(first: torch.Tensor, batch: int, tokens: int) -> list[tuple[bool, int, int]]:
    """``(seq_first, segments, segment)`` layouts the block's first output item allows, plain first."""
    found: list[tuple[bool, int, int]] = []
    firsts = [False]
    if first.dim() >= 3 and tuple(first.shape[:2]) == (tokens, batch) and tokens != batch:
        firsts.append(True)
    for seq_first in firsts:
        seq = first.shape[0] if seq_first else (first.shape[1] if first.dim() >= 2 else 0)
        found.append((seq_first, 1, 0))
        if tokens > 0 and seq % tokens == 0 and seq // tokens > 1:
            k = seq // tokens
            found.extend((seq_first, k, j) for j in range(k))
    return found


def _argument_of(tensor: torch.Tensor, args: Sequence[Any], kwargs: dict[str, Any]) -> int | str | None:
    """Where ``tensor`` is among a call's arguments: the same object first, else an equal tensor."""
    named: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
    for where, value in named:
        if value is tensor:
            return where
    for where, value in named:
        if isinstance(value, torch.Tensor) and value.shape == tensor.shape and torch.equal(value, tensor):
            return where
    return None


def _stream_sets(
    items: list[torch.Tensor | None], previous: list[torch.Tensor | None], call: tuple[Sequence[Any], dict[str, Any]]
) -> list[tuple[tuple[int, ...], tuple[int | str, ...]]]:
    """``(output items, call arguments)`` of the stream sets to try: the first item alone, then ordered sets of the
    output's same-shape tensors whose values (in the block before) the next block's call takes as arguments."""
    sets: list[tuple[tuple[int, ...], tuple[int | str, ...]]] = [((0,), (0,))]
    first = items[0]
    if first is None:
        return sets
    same = [i for i, t in enumerate(items) if t is not None and t.shape == first.shape]
    args, kwargs = call
    for size in range(2, min(len(same), MAX_STREAMS) + 1):
        for chosen in itertools.permutations(same, size):
            before = [previous[i] if i < len(previous) else None for i in chosen]
            where = [None if t is None else _argument_of(t, args, kwargs) for t in before]
            if all(w is not None for w in where) and len(set(where)) == size:
                sets.append((tuple(chosen), tuple(w for w in where if w is not None)))
    return sets


def readout_candidates(
    output: object,
    previous: object,
    call: tuple[Sequence[Any], dict[str, Any]],
    batch: int,
    tokens: int,
) -> list[Readout]:
    """The readouts one forward's last block allows, the identity first (each to be checked against the logits).

    Args:
        output: The last block's output.
        previous: The output of the block before it (None with one block: no multi-stream readouts then).
        call: The last block's ``(args, kwargs)``: tells which argument takes which of ``previous``'s streams.
        batch: The forward's batch size.
        tokens: The forward's number of tokens (the logits' sequence length).

    Example:
        >>> out = (torch.zeros(6, 1, 4), None)
        >>> [r.seq_first for r in readout_candidates(out, None, ((), {}), batch=1, tokens=6)]
        [False, True]
    """
    items = output_items(output)
    if not items or items[0] is None:
        return [Readout()]
    stream_sets = _stream_sets(items, output_items(previous), call) if previous is not None else [((0,), (0,))]
    found: list[Readout] = []
    for outputs, inputs in stream_sets:
        for seq_first, segments, segment in _layouts(items[0], batch, tokens):
            readout = Readout(outputs, inputs, seq_first, segments, segment)
            if len(outputs) > 1:
                state = readout.output(output)
                if state is None:
                    continue
                readout = Readout(outputs, inputs, seq_first, segments, segment, width=int(state.shape[-1]))
            found.append(readout)
    return found
