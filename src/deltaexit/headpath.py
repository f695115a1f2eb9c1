"""What a causal LM does between its last block and its logits, found by watching one forward pass.

Name tables (:mod:`deltaexit.aliases`) find the final norm of most models. Where they do not (a norm held one
level below the decoder, a prediction-head transform, a hyper-connection merge, a width multiplier dividing the
state, a padded vocabulary sliced off, soft-prompt positions dropped), :func:`trace_head_path` runs one forward
with observing hooks on every module outside the blocks and reads the path off the calls: the modules that
take the running state after the last block, in call order, until the head; then how the head's actual input
and the model's logits differ from what those modules give (a scalar multiple, dropped leading positions, a
vocabulary slice, a scalar on the logits). Every step found is checked against the model's own numbers.

Example:
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    >>> model = AutoModelForCausalLM.from_config(cfg).eval()
    >>> path = trace_head_path(model, model.model.layers, model.lm_head, torch.tensor([[3, 4, 5]]))
    >>> [type(m).__name__ for m in path.modules], path.hidden_scale, path.prefix_positions
    (['LlamaRMSNorm'], None, 0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deltaexit.parallel import block_exits

__all__ = ["HeadPath", "fit_scalar", "fit_softcap", "trace_head_path"]


@dataclass
class HeadPath:
    """The steps from the last block's output to the logits, as one forward pass showed them.

    Attributes:
        modules: Modules applied in order to the last block's output before the head (norms, merges, transforms).
        hidden_scale: Scalar the state is multiplied by just before the head (e.g. ``1 / width multiplier``), or None.
        prefix_positions: Leading positions the blocks see but the head does not (soft prompts), 0 if none.
        vocab_limit: The logits are the head's first ``vocab_limit`` outputs (a padded vocabulary), or None.
        logit_scale: Scalar on the logits found by the forward (beyond the config's steps), or None.
        final_softcap: Soft-cap ``c * tanh(logits / c)`` found by the forward (beyond the config's steps), or None.
        block_out: The last block's output on the forward.
        logits: The model's logits on the forward.
        head: A module enclosing the output embedding that maps the state to the logits as a whole (e.g. a
            prediction head with a functional activation inside), to use as the head; None keeps the head.
    """

    modules: tuple[nn.Module, ...]
    hidden_scale: float | None
    prefix_positions: int
    vocab_limit: int | None
    logit_scale: float | None
    final_softcap: float | None
    block_out: torch.Tensor
    logits: torch.Tensor
    head: nn.Module | None = None


def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in (*args, kwargs.get("hidden_states"), *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


def _output_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)


def _shortest(value: float, fits: Callable[[float], bool], rel: float) -> float:
    """``value`` with the fewest significant digits within ``rel`` of it that still ``fits`` (30.0, not 29.99979)."""
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if abs(short - value) <= rel * abs(value) and fits(short):
            return short
    return value


def fit_scalar(x: torch.Tensor, y: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> float | None:
    """The scalar ``c`` with ``c * x == y`` (least squares, then checked), or None when there is none.

    Example:
        >>> fit_scalar(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]))
        0.5
    """
    if x.shape != y.shape:
        return None
    xf, yf = x.double().flatten(), y.double().flatten()
    norm = float(xf @ xf)
    if norm == 0.0:
        return None
    c = float(xf @ yf) / norm

    def fits(k: float) -> bool:
        return _close(x.double() * k, y.double(), atol, rtol)

    return _shortest(c, fits, 1e-6) if fits(c) else None


class _Recorder:
    """Observing hooks on every module outside the blocks: call order, first tensor in, tensor out.

    A block's output is recorded as ``state_of(output)`` when given (the residual state a readout takes from it).
    """

    def __init__(
        self, model: nn.Module, blocks: nn.ModuleList, state_of: Callable[[object], torch.Tensor | None] | None = None
    ) -> None:
        inside = {id(m) for block in blocks for m in block.modules()}
        self.blocks = {id(b) for b in block_exits(blocks)}  # the modules whose calls return a block's output
        self.state_of = state_of
        self.events: list[tuple[str, nn.Module, torch.Tensor | None]] = []
        self.handles: list[RemovableHandle] = []
        seen: set[int] = set()
        for module in model.modules():
            if id(module) in seen or (id(module) in inside and id(module) not in self.blocks):
                continue
            seen.add(id(module))
            self.handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._exit))

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _first_tensor(args, kwargs)
        self.events.append(("in", module, None if x is None else x.detach().clone()))

    def _exit(self, module: nn.Module, _args: tuple, output: object) -> None:
        block = self.state_of is not None and id(module) in self.blocks
        y = self.state_of(output) if self.state_of is not None and block else _output_tensor(output)
        self.events.append(("out", module, None if y is None else y.detach().clone()))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _calls(events: list, start: int, stop: int) -> list[tuple[int, int, nn.Module, Any, Any]]:
    """``(enter index, exit index, module, input, output)`` of every call entered in ``events[start:stop]``."""
    stack: list[tuple[int, nn.Module, Any]] = []
    finished: list[tuple[int, int, nn.Module, Any, Any]] = []
    for i in range(start, len(events)):
        kind, module, tensor = events[i]
        if kind == "in":
            if i < stop:
                stack.append((i, module, tensor))
            continue
        for depth in range(len(stack) - 1, -1, -1):
            if stack[depth][1] is module:
                entered, _, x = stack[depth]
                del stack[depth:]
                finished.append((entered, i, module, x, tensor))
                break
    return sorted(finished, key=lambda f: f[0])


def _top_level_calls(events: list, start: int, stop: int) -> list[tuple[int, nn.Module, Any, Any]]:
    """``(enter index, module, input, output)`` of the calls entered and finished in ``events[start:stop]``,
    outermost only."""
    calls, reach = [], -1
    for entered, left, module, x, y in _calls(events, start, stop):
        if left < stop and entered > reach:
            calls.append((entered, module, x, y))
            reach = left
    return calls


def _run_forward(model: nn.Module, recorder: _Recorder, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        recorder.remove()
        model.train(was_training)


def _window(events: list, blocks: set[int], head: nn.Module) -> tuple[int, int]:
    """Indices of the last block's exit and of the head's first call after it (-1 when absent)."""
    last_block = max((i for i, (k, m, _) in enumerate(events) if k == "out" and id(m) in blocks), default=-1)
    head_in = next((i for i in range(last_block + 1, len(events)) if events[i][:2] == ("in", head)), -1)
    return last_block, head_in


def _head_output(events: list, head_in: int, head: nn.Module) -> torch.Tensor | None:
    return next((t for k, m, t in events[head_in:] if k == "out" and m is head), None)


def _match_state(
    running: torch.Tensor, head_input: torch.Tensor, atol: float, rtol: float
) -> tuple[int, float | None] | None:
    """``(dropped leading positions, scale or None)`` turning ``running`` into ``head_input``, or None."""
    prefix = running.shape[1] - head_input.shape[1] if running.dim() >= 2 and head_input.dim() >= 2 else 0
    if prefix > 0:
        running = running[:, prefix:]
    if _close(running, head_input, atol, rtol):
        return max(prefix, 0), None
    scale = fit_scalar(running, head_input, atol, rtol)
    return None if scale is None else (max(prefix, 0), scale)


def fit_softcap(x: torch.Tensor, y: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> float | None:
    """The cap ``c`` with ``c * tanh(x / c) == y`` (solved on the largest ``|x|``, then checked), or None.

    Example:
        >>> x = torch.tensor([-40.0, 3.0, 90.0])
        >>> fit_softcap(x, 30.0 * torch.tanh(x / 30.0))
        30.0
    """
    if x.shape != y.shape or x.numel() == 0:
        return None
    xd, yd = x.double().flatten(), y.double().flatten()
    i = int(xd.abs().argmax())
    big, capped = abs(float(xd[i])), abs(float(yd[i]))
    if not 0.0 < capped < big or float(xd[i]) * float(yd[i]) <= 0:
        return None
    lo, hi = capped, capped * 1e6  # c * tanh(big / c) rises with c from below capped to big
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (
            (mid, hi) if mid * torch.tanh(torch.tensor(big / mid, dtype=torch.float64)).item() < capped else (lo, mid)
        )
    cap = (lo * hi) ** 0.5

    def fits(c: float) -> bool:
        return _close(torch.tanh(x.double() / c) * c, y.double(), atol, rtol)

    return _shortest(cap, fits, 1e-4) if fits(cap) else None  # solved on one float32 logit: ~1e-5


def _match_logits(
    out: torch.Tensor,
    logits: torch.Tensor,
    steps: Callable[[torch.Tensor], torch.Tensor] | None,
    atol: float,
    rtol: float,
) -> tuple[int | None, float | None, float | None] | None:
    """``(vocab limit, logit scale, soft-cap)`` (None: no such step) turning a head's output into the logits."""
    stepped = steps(out) if steps is not None else out
    limit = logits.shape[-1] if logits.shape[-1] < stepped.shape[-1] else None
    if limit is not None:
        stepped = stepped[..., :limit]
    if _close(stepped, logits, atol, rtol):
        return limit, None, None
    # Both may pass where the cap barely bites (tanh is nearly linear near 0): keep the closer one.
    fits: list[tuple[float, float | None, float | None]] = []
    scale = fit_scalar(stepped, logits, atol, rtol)
    if scale is not None:
        fits.append(((stepped.double() * scale - logits.double()).abs().max().item(), scale, None))
    cap = fit_softcap(stepped, logits, atol, rtol)
    if cap is not None:
        fits.append(((torch.tanh(stepped.double() / cap) * cap - logits.double()).abs().max().item(), None, cap))
    if not fits:
        return None
    _, scale, cap = min(fits, key=lambda f: f[0])
    return limit, scale, cap


def _follow(
    calls: list[tuple[int, nn.Module, Any, Any]],
    start: tuple[int, torch.Tensor],
    view: Callable[[torch.Tensor], torch.Tensor | None] | None,
    atol: float,
    rtol: float,
) -> tuple[list[nn.Module], list[tuple[int, torch.Tensor]]]:
    """The calls that take the running state (as is, or in the blocks' layout that ``view`` turns into the token
    layout), and the running states: ``(path modules, [(event index it holds from, state)])``."""
    states: list[tuple[int, torch.Tensor]] = [start]
    path: list[nn.Module] = []
    for entered, module, x, y in calls:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            continue
        if _close(x, states[-1][1], atol, rtol):
            path.append(module)
            states.append((entered, y))
            continue
        x_view, y_view = (view(x), view(y)) if view is not None else (None, None)
        if x_view is not None and y_view is not None and _close(x_view, states[-1][1], atol, rtol):
            path.append(module)
            states.append((entered, y_view))
    return path, states


def trace_head_path(
    model: nn.Module,
    blocks: nn.ModuleList,
    head: nn.Module,
    ids: torch.Tensor,
    logit_steps: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    state_of: Callable[[object], torch.Tensor | None] | None = None,
    view: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> HeadPath | None:
    """Read the path from the last block to the logits off one forward pass (None when it cannot be read).

    The path is the outermost calls between the last block and the head that take the running state (each
    one's input equals the previous one's output). When the head's input then differs from the running
    state by more than dropped leading positions and a scalar, a module enclosing the head that takes the
    running state and returns the logits whole (a prediction head with a functional activation inside) is
    the head instead.

    With a readout (``state_of``: the residual state a block's output holds, ``[batch, seq, *state]``; ``view``:
    one tensor of the blocks' layout in the token layout, see :class:`deltaexit.readout.Readout`) the running state
    starts as ``state_of(last block's output)``, a call also takes it in the blocks' layout, and where the head
    reads the state in another layout (all streams at once) the head on the running state itself must give the
    logits.

    Args:
        model: The causal LM (left with no hooks and in its training mode, also when the forward raises).
        blocks: Its block list.
        head: Its LM head.
        ids: ``[1, seq]`` input ids of the dummy forward.
        logit_steps: The config's elementwise logit steps (scaling, soft-capping), applied to the head's output.
        atol: Absolute tolerance of every comparison.
        rtol: Relative tolerance of every comparison.
        state_of: The readout's state of a block output (None: the output's first tensor).
        view: The readout's layout of one stream tensor (None: the token layout already).
    """
    recorder = _Recorder(model, blocks, state_of)
    logits = _run_forward(model, recorder, ids)
    events = recorder.events
    last_block, head_in = _window(events, recorder.blocks, head)
    block_out = events[last_block][2] if last_block >= 0 else None
    head_input = events[head_in][2] if head_in >= 0 else None
    if block_out is None or head_input is None:
        return None
    calls = _top_level_calls(events, last_block + 1, head_in)
    path, states = _follow(calls, (last_block, block_out), view, atol, rtol)
    state = _match_state(states[-1][1], head_input, atol, rtol)
    head_out = _head_output(events, head_in, head)
    found = _match_logits(head_out, logits, logit_steps, atol, rtol) if head_out is not None else None
    if state is not None and found is not None:
        return HeadPath(tuple(path), state[1], state[0], *found, block_out, logits)
    # A module around the head, entered after the last block, that maps the running state to the logits.
    for entered, left, module, x, y in _calls(events, last_block + 1, head_in):
        if left < head_in or not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            continue
        before = [s for i, s in states if i < entered][-1]
        whole = _match_logits(y, logits, logit_steps, atol, rtol)
        if _close(x, before, atol, rtol) and whole is not None:
            kept = tuple(path[: sum(1 for i, _ in states[1:] if i < entered)])
            return HeadPath(kept, None, 0, *whole, block_out, logits, head=module)
    if view is None:
        return None
    # The head read the state in the blocks' layout (e.g. every stream at once): the head on the running state.
    with torch.no_grad():
        direct = head(states[-1][1])
    whole = _match_logits(direct, logits, logit_steps, atol, rtol) if isinstance(direct, torch.Tensor) else None
    return None if whole is None else HeadPath(tuple(path), None, 0, *whole, block_out, logits)
