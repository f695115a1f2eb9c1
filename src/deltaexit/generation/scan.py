"""The exit scan: one forward run block by block, each row exiting on the shared exit rule.

After each block from ``min_exit_layer`` on (:func:`deltaexit.exits.is_scored`), the confidence measure scores
every row's last position; a row exits when its score passes the block's threshold
(:func:`deltaexit.exits.passes`, the rule calibration simulates), and its next token comes from the exact lens
at that layer. The blocks after the last exit are not run. The KV policies call :meth:`ExitScan.forward` with
the settings they need (how deep, whether to exit, whether to freeze exited rows, whether to keep the states).

Example:
    >>> import torch
    >>> from deltaexit.generation.early_exit import EarlyExit
    >>> from deltaexit.testing import ConstantScore, tiny_model
    >>> ee = EarlyExit(tiny_model("llama", num_layers=4), ConstantScore(), 0.5, "recompute", min_exit_layer=2)
    >>> out = ee.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0,
    ...                   return_dict_in_generate=True)
    >>> out.exit_layers.tolist()  # the prompt's token at full depth, then an exit after block 2 of 4
    [[4, 2, 2]]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltaexit.exits import ThresholdSchedule, is_scored, passes
from deltaexit.generation.outputs import GenerationStats
from deltaexit.generation.run import Run
from deltaexit.generation.runner import BlockCall, BlockRunner
from deltaexit.generation.statecache import recomputes_prefix
from deltaexit.lens import Lens
from deltaexit.measures.base import ConfidenceMeasure, LayerState

__all__ = ["ExitScan", "ScanResult"]


@dataclass
class ScanResult:
    """What one :meth:`ExitScan.forward` found.

    Attributes:
        depth: Blocks run.
        exit_layer: ``[B]`` 1-based exit layer; 0 for finished rows; ``depth`` for rows that did not exit.
        logits_fn: ``() -> [B, V]`` float32 logits at each row's exit (or at ``depth``), computed on demand.
        all_exited: Every active row exited before ``max_depth``.
        states: ``states[l]`` = output after ``l`` blocks (``[B, T, H]``; ``states[0]`` = embeddings), if kept.
        calls: The recorded arguments of every block.
        read: The value of ``forward``'s ``read_with`` flag, read with the first exit decision (None if no block
            was scored).
    """

    depth: int
    exit_layer: torch.Tensor
    logits_fn: Callable[[], torch.Tensor]
    all_exited: bool
    states: list[torch.Tensor] | None
    calls: list[BlockCall]
    read: bool | None = None


def _per_row(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[B]`` row mask shaped to broadcast over ``like`` (``[B, ...]``: one position's state ``[B, *state]``, a
    block's output ``[B, T, *state]``, logits ``[B, V]``)."""
    return mask.reshape(mask.shape[0], *([1] * (like.dim() - 1)))


class _RowExits:
    """Per-row exit bookkeeping of one scan: exit layer, exit state and the lens logits a measure made there."""

    def __init__(self, active: torch.Tensor, last: torch.Tensor, lens: Lens) -> None:
        self.active = active
        self.exited = ~active
        self.layer = torch.zeros(active.shape[0], dtype=torch.long, device=last.device)
        self.state = last.clone()
        self.lens = lens
        self.cached: torch.Tensor | None = None
        self.have = torch.zeros(active.shape[0], dtype=torch.bool, device=last.device)
        self.any_exited = False  # whether an active row has exited (tracked on the host: no sync per block)
        self.pending: torch.Tensor | None = None  # a caller's flag to read with the next decision's transfer
        self.read: bool | None = None

    def add(self, new: torch.Tensor, depth: int, last: torch.Tensor, logits: torch.Tensor | None) -> None:
        """Rows ``new`` exit after ``depth`` blocks at state ``last`` (with the lens ``logits`` if known)."""
        self.layer = torch.where(new, depth, self.layer)
        self.state = torch.where(_per_row(new, last), last, self.state)
        if logits is not None:
            lg = logits.float()
            self.cached = lg if self.cached is None else torch.where(new[:, None], lg, self.cached)
            self.have |= new
        self.exited = self.exited | new
        self.any_exited = True

    def finish(self, depth: int, last: torch.Tensor) -> None:
        """The active rows that did not exit stop at ``depth`` with state ``last``."""
        remaining = self.active & (self.layer == 0)
        self.layer = torch.where(remaining, depth, self.layer)
        self.state = torch.where(_per_row(remaining, last), last, self.state)

    def logits(self) -> torch.Tensor:
        """``[B, V]`` float32 lens logits at each row's exit (the measure's where it made them)."""
        cached = self.cached
        if cached is not None and bool(self.have[self.active].all()):
            return cached
        fresh = self.lens(self.state[:, None])[:, 0].float()
        if cached is not None:
            fresh = torch.where(self.have[:, None], cached, fresh)
        return fresh


class ExitScan:
    """Runs a forward block by block and decides the exits: what every KV policy shares.

    Args:
        model: The causal LM.
        runner: Its :class:`~deltaexit.generation.runner.BlockRunner`.
        lens: The lens the exits read their tokens from.
        measure: The confidence measure.
        schedule: The thresholds per decode step and block.
        min_exit_layer: First 1-based layer after which a row may exit.
    """

    def __init__(
        self,
        model: nn.Module,
        runner: BlockRunner,
        lens: Lens,
        measure: ConfidenceMeasure,
        schedule: ThresholdSchedule,
        min_exit_layer: int,
    ) -> None:
        self.model: Any = model  # a transformers causal LM
        self.runner = runner
        self.lens = lens
        self.measure = measure
        self.schedule = schedule
        self.min_exit_layer = min_exit_layer
        self.num_layers = runner.num_layers
        #: The model keeps no cache (e.g. openai-gpt): every pass runs the blocks over the whole sequence, from 0.
        self.prefix = recomputes_prefix(model)

    def thresholds(self, step: int) -> list[float]:
        """The exit thresholds of decode step ``step`` per block; ``inf`` (no exit) after a block the model skips on
        token ids alone (``structure.skipped``: its output is the state before it)."""
        values = list(self.schedule.values(step, self.num_layers))
        for layer in self.runner.skipped:
            values[layer] = math.inf
        return values

    def model_inputs(self, ids: torch.Tensor, kwargs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
        """The model's inputs for tokens ``ids[:, start:end]`` (masks and positions cut at ``end``); from position 0
        for a model that keeps no cache (:attr:`prefix`), whose forward runs the whole sequence as
        ``model.generate``'s does.

        A ``logits_to_keep`` (``model.generate`` keeps the last position's logits) becomes 0, all positions: the
        runner's recording pass computes no logits, and a forward may cut the sequence to the kept positions before
        its last blocks (Gemma-4 does before the blocks that reuse an earlier block's keys/values), while the
        policies run every block on every position of the tokens."""
        start = 0 if self.prefix else start
        kw = dict(kwargs)
        for key in ("attention_mask", "position_ids", "token_type_ids"):
            value = kw.get(key)
            if isinstance(value, torch.Tensor) and value.shape[-1] > end:
                kw[key] = value[..., :end]
        inputs = self.model.prepare_inputs_for_generation(ids[:, :end], next_sequence_length=end - start, **kw)
        if isinstance(inputs.get("logits_to_keep"), int):
            inputs["logits_to_keep"] = 0
        return inputs

    def run_blocks(
        self,
        h: torch.Tensor,
        calls: list[BlockCall],
        layers: range,
        stats: GenerationStats,
        inputs: dict[int, torch.Tensor] | None = None,
    ):
        """Run ``layers`` on ``h`` with no exits (counted in ``stats``); the last block's output. With ``inputs``,
        each block's input is kept there by layer."""
        for layer in layers:
            if inputs is not None:
                inputs[layer] = h
            h = self.runner.run_block(layer, h, calls[layer])
            stats.blocks_run += 1
            stats.token_blocks_run += h.shape[1]
        return h

    def forward(
        self,
        run: Run,
        ids: torch.Tensor,
        kwargs: dict[str, Any],
        start: int,
        *,
        max_depth: int,
        exits: bool,
        freeze: bool,
        keep_states: bool,
        step: int,
        read_with: torch.Tensor | None = None,
    ) -> ScanResult:
        """Run tokens ``ids[:, start:]`` block by block; rows exit on their last position's score.

        Args:
            run: The call's state (finished rows, stats).
            ids: ``[B, T]`` ids so far; ``kwargs``: the model kwargs that go with them.
            start: First position to run (the cache holds the ones before).
            max_depth: Most blocks to run.
            exits: Whether rows may exit (else every block up to ``max_depth`` runs).
            freeze: Keep exited rows at their exit state in the later blocks (``propagate``).
            keep_states: Keep every block's output in :attr:`ScanResult.states`.
            step: Decode step of the last position (for the threshold schedule).
            read_with: A 0-d bool tensor to bring to the host in the first exit decision's transfer (no read of
                its own; :attr:`ScanResult.read`).
        """
        hidden, calls = self.runner.record(**self.model_inputs(ids, kwargs, start, ids.shape[1]))
        n_tok = hidden.shape[1]
        rows = _RowExits(run.unfinished.bool(), hidden[:, -1], self.lens)
        rows.pending = read_with
        thresholds = self.thresholds(step)
        states = [hidden] if keep_states else None
        depth, h, all_exited = 0, hidden, False
        prev: LayerState | None = None  # the last scored block's state: hands on its candidates and lens logits
        for layer in range(max_depth):
            out = self.runner.run_block(layer, h, calls[layer])
            run.stats.blocks_run += 1
            run.stats.token_blocks_run += n_tok
            if freeze and rows.any_exited:
                out = torch.where(_per_row(rows.exited & rows.active, out), h, out)
            h_prev, h = h, out
            depth = layer + 1
            if states is not None:
                states.append(h)
            threshold = thresholds[layer]
            if exits and is_scored(depth, threshold, min_exit_layer=self.min_exit_layer, num_layers=self.num_layers):
                prev, all_exited = self._decide(run, rows, layer, h, h_prev, prev, threshold)
                if all_exited:
                    break
        rows.finish(depth, h[:, -1])
        return ScanResult(depth, rows.layer, rows.logits, all_exited, states, calls, rows.read)

    def _decide(
        self,
        run: Run,
        rows: _RowExits,
        layer: int,
        h: torch.Tensor,
        h_prev: torch.Tensor,
        previous: LayerState | None,
        threshold: float,
    ) -> tuple[LayerState, bool]:
        """Score the rows after block ``layer`` and let those that pass exit; the scored state (to hand on) and
        whether every row has now exited."""
        state = LayerState(layer=layer, h_out=h[:, -1], h_in=h_prev[:, -1], num_layers=self.num_layers, lens=self.lens)
        if previous is not None:  # its candidate ids; its lens logits when it scored the block right before
            state.take_from(previous)  # (only full logits are ever cached as the exit's logits, below)
        score = self.measure.score(state)
        run.stats.measure_calls += 1
        if score.shape != rows.active.shape:
            raise ValueError(
                f"the measure {self.measure!r} scored the states of shape {tuple(state.h_out.shape)} (rows first) as "
                f"{tuple(score.shape)}, not one score per row {tuple(rows.active.shape)}: a state of several residual "
                "streams ([rows, streams, hidden]) needs a measure that reads the lens logits (e.g. softmax-max), or "
                "one made for such states."
            )
        new = passes(score, threshold) & ~rows.exited
        # One device-to-host transfer per scored block (the exit decision needs one; a GPU pays per sync).
        flags = [torch.isnan(score).any(), new.any(), (rows.exited | new).all()]
        if rows.pending is not None:
            flags.append(rows.pending.reshape(()).bool())
        has_nan, any_new, now_all, *read = torch.stack(flags).tolist()
        if read:
            rows.pending, rows.read = None, bool(read[0])
        if has_nan:
            raise ValueError(f"the measure {self.measure!r} returned NaN at layer {layer + 1}")
        if not any_new:
            return state, False
        rows.add(new, layer + 1, h[:, -1], state.cached_logits)
        return state, bool(now_all)
