"""Residual streams stacked on a leading axis, and the merge a model applies to them before its final norm.

Some decoders carry several copies of the residual stream through their blocks, stacked on a leading axis:
Gemma-3n's AltUp keeps ``[streams, batch, seq, hidden]`` and, after its last block, maps each stream but the
first through its own projection, rescales it to the first stream's root-mean-square and averages them all
into the ``[batch, seq, hidden]`` state its final norm reads. That merge is functional code in the model's
forward, not a module :func:`deltaexit.headpath.trace_head_path` could see; :func:`trace_stream_merge` reads it
off one forward instead: the modules called on each stream after the last block, then the one combination of
their outputs (a mean or a sum, rescaled to the first stream's magnitude or not) that gives the norm's input,
checked against the model's own numbers. deltaexit holds such states as ``[batch, seq, streams, hidden]``
(:func:`to_state`; ``state_dims == 2``), the layout of hyper-connection models, and the merge is the structure's
pre-norm module.

Example:
    >>> x = torch.randn(2, 1, 3, 8)  # two streams, [streams, batch, seq, hidden]
    >>> to_state(x).shape, torch.equal(from_state(to_state(x)), x)
    (torch.Size([1, 3, 2, 8]), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deltaexit.parallel import block_exits

__all__ = ["StreamMerge", "from_state", "leading_streams", "to_state", "trace_stream_merge"]

#: The clamp on a stream's mean square before its root is taken in a magnitude-matching merge (AltUp's).
MAGNITUDE_EPS = 1e-5


def leading_streams(block_out: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether a block output ``[streams, batch, seq, hidden]`` stacks streams ahead of the logits' ``[batch, seq]``.

    Example:
        >>> leading_streams(torch.zeros(4, 1, 6, 8), torch.zeros(1, 6, 100))
        True
    """
    return block_out.dim() == logits.dim() + 1 and tuple(block_out.shape[1:-1]) == tuple(logits.shape[:-1])


def to_state(h: torch.Tensor) -> torch.Tensor:
    """A block's ``[streams, batch, seq, hidden]`` as deltaexit's ``[batch, seq, streams, hidden]`` state."""
    return h.movedim(0, -2)


def from_state(h: torch.Tensor) -> torch.Tensor:
    """deltaexit's ``[batch, seq, streams, hidden]`` state back in the blocks' ``[streams, batch, seq, hidden]``."""
    return h.movedim(-2, 0)


def _rms(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    square = torch.mean(x**2, dim=-1, keepdim=True)
    return torch.sqrt(square.clamp(min=eps)) if eps is not None else square**0.5


class StreamMerge(nn.Module):
    """Merge ``[..., streams, hidden]`` into ``[..., hidden]``: each stream through its module (none: as it is),
    optionally rescaled to the first stream's root-mean-square, then averaged (or summed).

    Args:
        modules: Per stream, the module applied to it, or None.
        rescale: Rescale each mapped stream to the first stream's magnitude.
        reduce: ``"mean"`` or ``"sum"``.
    """

    stream_modules: tuple[nn.Module | None, ...]

    def __init__(self, modules: Sequence[nn.Module | None], rescale: bool, reduce: str) -> None:
        super().__init__()
        # Held outside the module tree: the modules belong to the model (no second registration, no state_dict).
        object.__setattr__(self, "stream_modules", tuple(modules))
        self.rescale = rescale
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[..., 0, :]
        target = _rms(first, None)
        mapped = [first]
        for i, module in enumerate(self.stream_modules[1:], start=1):
            y = x[..., i, :] if module is None else module(x[..., i, :]).to(first.dtype)
            mapped.append(y * target / _rms(y, MAGNITUDE_EPS) if self.rescale else y)
        stacked = torch.stack(mapped)
        return stacked.mean(dim=0) if self.reduce == "mean" else stacked.sum(dim=0)

    def extra_repr(self) -> str:
        names = [type(m).__name__ if m is not None else "-" for m in self.stream_modules]
        return f"streams={names}, rescale={self.rescale}, reduce={self.reduce!r}"


def _first_float(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


class _Calls:
    """Observing hooks on every module outside the blocks: ``[module, first input, output]`` of each call, in
    call order; ``after``: how many calls were made before the last block finished, ``last_out``: its output."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        inside = {id(m) for block in blocks for m in block.modules()}
        self.blocks = {id(b) for b in block_exits(blocks)}  # the modules whose calls return a block's output
        self.calls: list[list[Any]] = []
        self.open: list[list[Any]] = []
        self.after = 0
        self.last_out: torch.Tensor | None = None
        self.handles: list[RemovableHandle] = []
        for module in model.modules():
            if id(module) in inside and id(module) not in self.blocks:
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._exit))

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _first_float(args, kwargs)
        call = [module, None if x is None else x.detach().clone(), None]
        self.open.append(call)
        if id(module) not in self.blocks:
            self.calls.append(call)

    def _exit(self, module: nn.Module, _args: tuple, output: object) -> None:
        y = output[0] if isinstance(output, (tuple, list)) and output else output
        y = y.detach().clone() if isinstance(y, torch.Tensor) else None
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i][0] is module:
                self.open[i][2] = y
                del self.open[i:]
                break
        if id(module) in self.blocks:
            self.last_out, self.after = y, len(self.calls)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _close(a: torch.Tensor | None, b: torch.Tensor, atol: float, rtol: float) -> bool:
    return a is not None and a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)


def _candidates(modules: list[nn.Module | None]) -> list[StreamMerge]:
    return [StreamMerge(modules, rescale, reduce) for rescale in (True, False) for reduce in ("mean", "sum")]


def trace_stream_merge(
    model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, *, atol: float = 1e-4, rtol: float = 1e-4
) -> tuple[StreamMerge, torch.Tensor, torch.Tensor] | None:
    """Read the merge of leading-axis streams off one forward on ``ids``: ``(merge, last block's output in the
    [batch, seq, streams, hidden] layout, logits)``, or None (no leading streams, or no merge found).

    Each stream's module is the first module called after the last block on exactly that stream; the merged state
    is the first input of another call after the last block with the ``[batch, seq, hidden]`` shape (the final
    norm's); the merge is the first of :class:`StreamMerge`'s combinations that reproduces it. The model is left
    with no hooks and in its training mode.
    """
    recorder = _Calls(model, blocks)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        recorder.remove()
        model.train(was_training)
    out = recorder.last_out
    if out is None or not leading_streams(out, logits):
        return None
    streams = list(out.unbind(0))
    modules: list[nn.Module | None] = [None] * len(streams)
    merged = None
    for module, x, _y in recorder.calls[recorder.after :]:
        hit = next((i for i, s in enumerate(streams) if modules[i] is None and _close(x, s, atol, rtol)), None)
        if hit is not None and hit > 0:
            modules[hit] = module
        elif hit is None and x is not None and x.shape == streams[0].shape:
            merged = x
            break
    if merged is None:
        return None
    state = to_state(out)
    with torch.no_grad():
        for merge in _candidates(modules):
            if _close(merge(state), merged, atol, rtol):
                return merge, state, logits
    return None
