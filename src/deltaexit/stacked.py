"""Readouts that need more than the last block's output: a stack of earlier states read with it.

Some decoders read their logits out of the last block's output *and* a stack of earlier block states
(Inkling-2's block attention residuals attend over every block boundary's state before the final norm; the
blocks themselves read that stack too). Such a model's residual state is not one ``[batch, seq, hidden]``
tensor, so no lens on a block's output alone can reproduce its logits. :func:`stacked_state_readout` finds the
module that does this on one forward, so the structure check can say so by name instead of reporting only a
logit mismatch.

Example:
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> stacked_state_readout(model, model.model.layers, torch.tensor([[3, 4, 5]])) is None
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["stacked_state_readout"]


def _floats(args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _is_stack_of(stack: torch.Tensor, state: torch.Tensor) -> bool:
    """Whether ``stack`` is ``[*state.shape[:-1], K, hidden]``: states stacked on the next-to-last axis."""
    return (
        stack.dim() == state.dim() + 1
        and stack.shape[:-2] == state.shape[:-1]
        and stack.shape[-1] == state.shape[-1]
        and stack.shape[-2] > 0
    )


def stacked_state_readout(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> str | None:
    """``"'path' (Class) reads ... with a stack of shape (...)"`` for the first module called after the last block
    with both the last block's output and a stack of states of its width, or None. The model is left with no hooks
    and in its training mode."""
    inside = {id(m) for block in blocks for m in block.modules()}
    names = {id(m): n for n, m in model.named_modules()}
    last_out: list[torch.Tensor] = []
    found: list[str] = []

    def after_block(_module: nn.Module, _args: tuple, output: object) -> None:
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(out, torch.Tensor):
            last_out[:] = [out]

    def called(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if found or not last_out:
            return
        tensors = _floats(args, kwargs)
        state = last_out[0]
        if any(t is state for t in tensors):
            stacks = [t for t in tensors if _is_stack_of(t, state)]
            if stacks:
                found.append(
                    f"{names.get(id(module), '?')!r} ({type(module).__name__}) reads the last block's output "
                    f"together with a stack of states of shape {tuple(stacks[0].shape)}"
                )

    handles = [block.register_forward_hook(after_block) for block in blocks]
    handles += [
        m.register_forward_pre_hook(called, with_kwargs=True)
        for m in model.modules()
        if id(m) not in inside and m is not model
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return found[0] if found else None
