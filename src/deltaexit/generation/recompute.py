"""``kv="recompute"`` (EE-LLM, FREE): an exited token is held back from the cache and run again later.

A token that exits is not written to the deep layers' cache: the cache is cropped back and the token runs again,
together with the following tokens, until one goes to full depth, so the deep layers see its true states. At
most ``max_pending`` tokens are held back; then a full-depth step is forced. Recurrent layers (linear attention,
Mamba) cannot be cropped: their states are snapshot where the held-back tokens start and put back when a token
exits (:mod:`deltaexit.generation.recurrent`), so the held-back tokens run through every layer in order.

Example:
    >>> import torch
    >>> from deltaexit.generation.early_exit import EarlyExit
    >>> from deltaexit.testing import ConstantScore, tiny_model
    >>> model = tiny_model("llama", num_layers=4)
    >>> ee = EarlyExit(model, ConstantScore(), 0.5, Recompute(max_pending=1), min_exit_layer=2)
    >>> out = ee.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0,
    ...                   return_dict_in_generate=True)
    >>> out.exit_layers.tolist()  # one token held back, then the next one is forced to full depth
    [[4, 2, 4, 2]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from deltaexit.generation.kv import cache_length, crop_cache, set_cache_length
from deltaexit.generation.policy import KVPolicy, register_policy
from deltaexit.generation.recurrent import Snapshot, recurrent_layers, restore, steps_one_at_a_time, take_snapshot
from deltaexit.generation.run import Run
from deltaexit.generation.scan import ExitScan

__all__ = ["Recompute", "RecomputeState"]


@dataclass
class RecomputeState:
    """``recompute``'s per-call state: the recurrent states where the held-back tokens start (None: none kept)."""

    snapshot: Snapshot | None = None


@register_policy
@dataclass(frozen=True)
class Recompute(KVPolicy):
    """EE-LLM / FREE recomputation: exited tokens are re-run with the next token that goes to full depth.

    Args:
        max_pending: Most tokens held back before a full-depth step is forced.
    """

    name: ClassVar[str] = "recompute"

    max_pending: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.max_pending, int) or self.max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {self.max_pending!r}")

    def start(self, scan: ExitScan) -> RecomputeState:
        """Fresh per-call state (no snapshot yet)."""
        return RecomputeState()

    def step(self, run: Run, scan: ExitScan, state: Any) -> None:
        """One token per row: the held-back tokens and the new one run together; an exit holds them back."""
        start = cache_length(run.cache)
        held_back = run.input_ids.shape[1] - start
        may_exit = held_back <= self.max_pending
        recurrent = bool(recurrent_layers(run.cache))
        if may_exit and recurrent and (state.snapshot is None or state.snapshot.length != start):
            state.snapshot = take_snapshot(run.cache, start)
        first = start
        if held_back > 1 and steps_one_at_a_time(run.model, run.cache):  # one token at a time, in order
            for pos in range(start, run.input_ids.shape[1] - 1):
                scan.forward(
                    run,
                    run.input_ids[:, : pos + 1],
                    run.model_kwargs,
                    pos,
                    max_depth=scan.num_layers,
                    exits=False,
                    freeze=False,
                    keep_states=False,
                    step=run.step,
                )
            first = run.input_ids.shape[1] - 1
        res = scan.forward(
            run,
            run.input_ids,
            run.model_kwargs,
            first,
            max_depth=scan.num_layers,
            exits=may_exit,
            freeze=False,
            keep_states=False,
            step=run.step,
        )
        if res.depth < scan.num_layers:
            crop_cache(run.cache, start)  # held back: re-run with the next token that goes deep
            if state.snapshot is not None:
                restore(run.cache, state.snapshot)
            run.stats.rounds += 1
        else:
            set_cache_length(run.cache, run.input_ids.shape[1])
        logits = res.logits_fn()
        token, _, scores = run.choose(run.input_ids, logits)
        run.append(token, res.exit_layer, scores, logits)
