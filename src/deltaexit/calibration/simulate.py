"""Offline early-exit simulator: one full forward, then any exit rule is a table lookup.

:func:`exit_table` runs the model once over token sequences (teacher forcing) with
:func:`deltaexit.collect`, and keeps per token and per layer the lens's top-1 and the
measure's score. :class:`ExitTable` then answers, for any threshold (one value, one per
layer, or a schedule over decode steps), where each token would exit, how many blocks it
would run, and whether its exit prediction differs from the full model's. No generation
is run, so a whole threshold sweep costs one forward.

How it relates to real early-exit generation: the table sees every layer's state computed
from the full model's own prefix. That is exactly what the ``recompute`` KV policy computes
up to the first token where early exit and full model disagree (skipped layers are run later
on the same prefix), so on the full model's greedy continuation the ``"sequence"`` loss (any
disagreement) is exact for ``recompute``. ``propagate`` copies shallow states into the skipped
layers' caches, so its later states differ slightly; ``verify`` is lossless whatever the
threshold. After the first disagreement a free-running continuation diverges, which the
per-token ``"textual"`` loss here does not model (it scores each step given the full
model's prefix).

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> table = exit_table(tiny_model("llama"), torch.tensor([[1, 2, 3, 4, 5]]), measure="softmax-max")
    >>> table.num_layers, table.num_tokens, float(table.losses(float("inf")).max())
    (3, 4, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltaexit.calibration.losses import LOSSES, example_losses
from deltaexit.collector import collect
from deltaexit.exits import DecayingThreshold, exit_layers, threshold_matrix
from deltaexit.lens import Lens
from deltaexit.measures.base import ConfidenceMeasure, LayerState, get_measure
from deltaexit.prompts import greedy_continuations, pad_token_id
from deltaexit.saturation import saturation_from_topk

__all__ = [
    "LOSSES",
    "CalmDecay",
    "ExitTable",
    "continuation_table",
    "exit_table",
    "greedy_continuations",
    "pad_token_id",
    "threshold_matrix",
]

#: CALM's decaying threshold: the generation schedule itself (one formula for the simulator and generation).
CalmDecay = DecayingThreshold


@dataclass
class ExitTable:
    """Per-token, per-layer top-1 and scores of one full forward; simulates any exit rule.

    Attributes:
        scores: ``[L, T]`` float32 measure score after each block (higher = safer to exit); the last
            block's row is ``inf`` (no decision is taken there, and fitted measures cover ``0..L-2``).
        top1: ``[L, T]`` lens top-1 after each block; ``top1[-1]`` is the model's own greedy token.
        example: ``[T]`` index of the example (prompt / text window) each token belongs to.
        step: ``[T]`` decode step of each token within its example (0 = first scored token).
        reference: ``[T]`` the reference next token (for the ``"risk"`` loss), or None.
        num_examples: Number of examples.
        measure: The measure's name.
        full_depth_steps: Tokens with ``step`` below this always run at full depth: 1 for
            continuations, whose first token comes from the prompt's full-depth forward (as in
            :class:`deltaexit.EarlyExit`). They count as agreeing in the losses and are left out of
            :meth:`summary` and :meth:`oracle` (like ``GenerationStats``, which counts decode steps).
    """

    scores: torch.Tensor
    top1: torch.Tensor
    example: torch.Tensor
    step: torch.Tensor
    reference: torch.Tensor | None
    num_examples: int
    measure: str = ""
    full_depth_steps: int = 0

    def __post_init__(self) -> None:
        if self.scores.shape != self.top1.shape or self.scores.dim() != 2:
            raise ValueError(
                f"scores and top1 must both be [layers, tokens], got {tuple(self.scores.shape)} "
                f"and {tuple(self.top1.shape)}"
            )
        if torch.isnan(self.scores).any():
            raise ValueError(f"the measure {self.measure!r} produced NaN scores")
        counts = torch.bincount(self.example, minlength=self.num_examples)
        if (counts == 0).any():
            raise ValueError(f"{int((counts == 0).sum())} example(s) have no scored token")
        self._counts = counts.to(torch.float64)

    # -- shape -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.top1.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.top1.shape[1])

    @property
    def final(self) -> torch.Tensor:
        """``[T]`` the full model's prediction."""
        return self.top1[-1]

    @property
    def saturation_layer(self) -> torch.Tensor:
        """``[T]`` 1-based layer from which the top-1 is final (the oracle exit)."""
        return saturation_from_topk(self.top1[..., None]).saturation_layer

    # -- exits ---------------------------------------------------------------------------------------
    def exit_layers(self, threshold: Any, *, min_exit_layer: int = 1) -> torch.Tensor:
        """``[T]`` 1-based exit layer: the first layer ``l >= min_exit_layer`` (below L) with
        ``score >= threshold``, else L.
        """
        steps = int(self.step.max()) + 1
        thr = threshold_matrix(threshold, self.num_layers, steps)[self.step].T  # [L, T]
        return exit_layers(
            self.scores, thr, min_exit_layer=min_exit_layer, full_depth=self.step < self.full_depth_steps
        )

    def predictions(self, exit_layers: torch.Tensor) -> torch.Tensor:
        """``[T]`` the token each exit predicts."""
        return self.top1.gather(0, (exit_layers - 1)[None]).squeeze(0)

    def disagreement(self, threshold: Any, *, min_exit_layer: int = 1) -> torch.Tensor:
        """``[T]`` bool: the exit prediction differs from the full model's."""
        exits = self.exit_layers(threshold, min_exit_layer=min_exit_layer)
        return self.predictions(exits) != self.final

    def per_example_mean(self, x: torch.Tensor) -> torch.Tensor:
        """``[num_examples]`` float64 mean of a per-token tensor ``x`` over each example's tokens."""
        sums = torch.zeros(self.num_examples, dtype=torch.float64).index_add_(0, self.example, x.to(torch.float64))
        return sums / self._counts

    def losses(self, threshold: Any, loss: str = "textual", *, min_exit_layer: int = 1) -> torch.Tensor:
        """``[num_examples]`` losses in [0, 1].

        ``"textual"``: share of an example's tokens whose exit prediction differs from the full
        model's. ``"sequence"``: 1 if any does. ``"risk"``: CALM's risk consistency,
        ``max(0, err(exit) - err(full))`` with ``err`` the share of tokens that miss the reference.
        """
        if loss == "risk" and self.reference is None:
            raise ValueError("the 'risk' loss needs references; build the table with references")
        pred = self.predictions(self.exit_layers(threshold, min_exit_layer=min_exit_layer))
        return example_losses(loss, pred, self.final, self.per_example_mean, self.reference)

    def _decode(self) -> torch.Tensor:
        """``[T]`` bool: tokens an exit rule decides (not forced to full depth)."""
        decode = self.step >= self.full_depth_steps
        return decode if decode.any() else torch.ones_like(decode)

    def summary(self, threshold: Any, *, min_exit_layer: int = 1) -> dict[str, float]:
        """Token-weighted agreement with the full model, mean exit layer and blocks saved (decode steps)."""
        exits = self.exit_layers(threshold, min_exit_layer=min_exit_layer)
        agree = (self.predictions(exits) == self.final).to(torch.float64)
        decode = self._decode()
        mean_layer = float(exits[decode].to(torch.float64).mean())
        return {
            "agreement": float(agree[decode].mean()),
            "mean_exit_layer": mean_layer,
            "blocks_saved": 1.0 - mean_layer / self.num_layers,
            "sequence_agreement": float((self.per_example_mean(1 - agree) == 0).to(torch.float64).mean()),
        }

    def oracle(self) -> dict[str, float]:
        """The ceiling: every token exits at its saturation layer (agreement 1 by construction)."""
        mean_layer = float(self.saturation_layer[self._decode()].to(torch.float64).mean())
        return {
            "agreement": 1.0,
            "mean_exit_layer": mean_layer,
            "blocks_saved": 1.0 - mean_layer / self.num_layers,
            "sequence_agreement": 1.0,
        }

    # -- splitting --------------------------------------------------------------------------------------
    def subset(self, examples: Sequence[int] | torch.Tensor) -> ExitTable:
        """The table restricted to the given examples (renumbered 0..k-1 in the given order)."""
        examples = torch.as_tensor(examples, dtype=torch.long)
        remap = torch.full((self.num_examples,), -1, dtype=torch.long)
        remap[examples] = torch.arange(examples.numel())
        new_example = remap[self.example]
        keep = new_example >= 0
        return ExitTable(
            scores=self.scores[:, keep],
            top1=self.top1[:, keep],
            example=new_example[keep],
            step=self.step[keep],
            reference=None if self.reference is None else self.reference[keep],
            num_examples=int(examples.numel()),
            measure=self.measure,
            full_depth_steps=self.full_depth_steps,
        )

    def exit_scores(self, *, min_exit_layer: int = 1) -> torch.Tensor:
        """``[L', T]`` scores of the layers that can trigger an exit (``min_exit_layer`` .. L-1)."""
        return self.scores[min_exit_layer - 1 : self.num_layers - 1]


def _as_measure(measure: str | ConfidenceMeasure) -> ConfidenceMeasure:
    if isinstance(measure, str):
        measure = get_measure(measure)
    if not isinstance(measure, ConfidenceMeasure):
        raise TypeError(f"measure must be a registered name or a ConfidenceMeasure, got {type(measure).__name__}")
    if getattr(measure, "requires_fit", False) and not getattr(measure, "is_fitted", True):
        raise ValueError(f"the measure {measure!r} must be fitted before it can score states; call .fit(...) first")
    return measure


def _right_align(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Move each row's real tokens to the left (right padding), so default position ids are right."""
    real = attention_mask.bool()
    if not real[:, 0].all() or (real[:, 1:] & ~real[:, :-1]).any():
        order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
        input_ids = input_ids.gather(1, order)
        attention_mask = attention_mask.gather(1, order)
        if score_mask is not None:
            score_mask = score_mask.gather(1, order)
    return input_ids, attention_mask, score_mask


def _rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, score_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated, right-padded ``(input_ids, attention_mask, score_mask, has_next)`` (masks bool)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [examples, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError("no examples: pass at least one row of input_ids")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError("attention_mask must have the shape of input_ids")
    if score_mask is not None and score_mask.shape != input_ids.shape:
        raise ValueError("score_mask must have the shape of input_ids")
    input_ids, attention_mask, score_mask = _right_align(input_ids, attention_mask, score_mask)
    real = attention_mask.bool()
    has_next = torch.zeros_like(real)
    has_next[:, :-1] = real[:, :-1] & real[:, 1:]
    score_mask = has_next if score_mask is None else score_mask.bool() & real
    return input_ids, attention_mask, score_mask, has_next


def _tabulate_batch(
    model: nn.Module,
    lens: Lens,
    measure: ConfidenceMeasure,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([L, k] scores, [L, k] top-1)`` of the ``k`` scored positions of one batch ``(ids, mask, sel)``."""
    ids, mask, sel = batch
    num_layers = lens.structure.num_layers
    with collect(model, capture=("h_in", "h_out"), positions="all") as trace:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    h_in, h_out = trace.h_in, trace.h_out  # [L, b, s, H]
    sc = torch.empty(num_layers, int(sel.sum()), dtype=torch.float32)
    tp = torch.empty(num_layers, int(sel.sum()), dtype=torch.long)
    for layer in range(num_layers):
        hi, ho = h_in[layer][sel], h_out[layer][sel]
        for c in range(0, ho.shape[0], chunk_tokens):
            state = LayerState(
                layer=layer, h_out=ho[c : c + chunk_tokens], h_in=hi[c : c + chunk_tokens],
                num_layers=num_layers, lens=lens,
            )  # fmt: skip
            tp[layer, c : c + chunk_tokens] = state.logits.argmax(dim=-1).cpu()
            if layer == num_layers - 1:  # no exit decision after the last block
                sc[layer, c : c + chunk_tokens] = math.inf
            else:
                sc[layer, c : c + chunk_tokens] = measure.score(state).float().cpu()
    return sc, tp


@torch.no_grad()
def exit_table(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    measure: str | ConfidenceMeasure = "softmax-max",
    *,
    score_mask: torch.Tensor | None = None,
    with_references: bool = True,
    full_depth_steps: int = 0,
    lens: Lens | None = None,
    batch_size: int = 16,
    chunk_tokens: int = 4096,
    progress: bool = False,
) -> ExitTable:
    """Run ``model`` once over ``input_ids`` and tabulate every layer's top-1 and score.

    Args:
        model: A ``transformers`` causal LM.
        input_ids: ``[N, S]`` token ids; each row is one example.
        attention_mask: ``[N, S]`` (1 = real token; left or right padding).
        measure: Registered name or a (fitted) measure instance.
        score_mask: ``[N, S]`` bool: positions whose next-token prediction is scored (default: every
            real position that has a real next token). For prompts + greedy continuations pass the
            positions that predict the continuation.
        with_references: Keep the next input token as the reference (for the ``"risk"`` loss).
        full_depth_steps: Scored tokens per row forced to full depth (see :class:`ExitTable`).
        lens: The model's lens (built if not given).
        batch_size: Rows per forward.
        chunk_tokens: Tokens per lens/measure call (bounds the logits' memory).
        progress: Show a tqdm bar.

    Returns:
        An :class:`ExitTable` with one example per row.
    """
    measure = _as_measure(measure)
    input_ids, attention_mask, score_mask, has_next = _rows(input_ids, attention_mask, score_mask)
    n, seq = input_ids.shape
    lens = lens if lens is not None else Lens.from_model(model)
    device = lens.structure.input_device
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    rows: Iterable[int] = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=f"exit table ({measure.name})", unit="batch")
    for start in rows:
        batch = tuple(x[start : start + batch_size].to(device) for x in (input_ids, attention_mask, score_mask))
        parts.append(_tabulate_batch(model, lens, measure, (batch[0], batch[1], batch[2]), chunk_tokens))
    example = torch.arange(n)[:, None].expand(n, seq)[score_mask]
    step = (score_mask.long().cumsum(-1) - 1)[score_mask]
    reference = None
    if with_references:
        nxt = torch.full_like(input_ids, -1)
        nxt[:, :-1] = torch.where(has_next[:, :-1], input_ids[:, 1:], -1)
        reference = nxt[score_mask]
    return ExitTable(
        scores=torch.cat([sc for sc, _ in parts], dim=1),
        top1=torch.cat([tp for _, tp in parts], dim=1),
        example=example,
        step=step,
        reference=reference,
        num_examples=n,
        measure=measure.name,
        full_depth_steps=full_depth_steps,
    )


def continuation_table(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    measure: str | ConfidenceMeasure,
    continuations: torch.Tensor | Sequence[torch.Tensor],
    *,
    prefill_full_depth: bool = True,
    lens: Lens | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> ExitTable:
    """Exit table over ``prompt + continuation`` rows, scoring the positions that predict the continuation.

    Pass the full model's greedy continuations (:func:`greedy_continuations`) for textual
    consistency, or reference continuations for risk consistency (the table's ``reference`` is
    then the reference token). Continuation entries ``< 0`` are padding and are not scored. With
    ``prefill_full_depth`` the first continuation token comes from full depth, as in generation.

    Example:
        >>> import torch
        >>> from deltaexit.testing import tiny_model
        >>> model, prompts = tiny_model("llama"), [torch.tensor([1, 2, 3]), torch.tensor([4])]
        >>> cont = greedy_continuations(model, prompts, 4)
        >>> table = continuation_table(model, prompts, "softmax-max", cont)
        >>> table.num_examples, table.num_tokens
        (2, 8)
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(continuations)} continuations for {len(prompts)} prompts")
    pad = pad_token_id(model)
    rows, masks, scored = [], [], []
    width = max(int(p.numel()) + int(torch.as_tensor(c).numel()) for p, c in zip(prompts, continuations))
    for p, c in zip(prompts, continuations):
        p = torch.as_tensor(p, dtype=torch.long).reshape(-1)
        c = torch.as_tensor(c, dtype=torch.long).reshape(-1)
        if p.numel() == 0:
            raise ValueError("a prompt is empty; every prompt needs at least one token")
        real_c = c >= 0
        row = torch.full((width,), pad, dtype=torch.long)
        row[: p.numel()] = p
        row[p.numel() : p.numel() + c.numel()] = torch.where(real_c, c, pad)
        mask = torch.zeros(width, dtype=torch.long)
        mask[: p.numel() + c.numel()] = 1
        sc = torch.zeros(width, dtype=torch.bool)
        sc[p.numel() - 1 : p.numel() - 1 + c.numel()] = real_c
        rows.append(row)
        masks.append(mask)
        scored.append(sc)
    return exit_table(
        model, torch.stack(rows), torch.stack(masks), measure, score_mask=torch.stack(scored),
        full_depth_steps=int(prefill_full_depth), lens=lens, batch_size=batch_size, progress=progress,
    )  # fmt: skip
