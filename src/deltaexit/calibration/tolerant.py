"""Learn-then-Test for ``kv="tolerant"``: the smallest draft-acceptance ratio whose disagreement is certified.

The loss is the project's token disagreement with ``model.generate`` (``"textual"``: the share of an example's
new tokens that differ position by position from the full model's greedy continuation, up to its first EOS). It
is bounded offline, from one forward over prompt + greedy continuation, without running the policy:

Until the first tolerated draft, :class:`~deltaexit.generation.tolerant.Tolerant`'s output *is* the greedy
continuation, so every early-exit draft it makes at continuation position ``t`` is the lens token of the block
it exits after on the greedy prefix, ``d_t``. A draft that differs from the greedy token ``g_t`` is tolerated
only if ``logit_full(d_t) - logit_full(g_t) >= log ratio``. So the first position where *some* considered exit
layer has such a token, ``t*``, comes no later than the first change, and ``(tokens from t* on) / tokens`` bounds
the example's disagreement from above. Learn-then-Test on these upper bounds certifies the real disagreement
(up to floating-point differences between the batched verify pass and one forward over the whole sequence).

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=3)
    >>> prompts = [torch.randint(0, 64, (4,), generator=torch.Generator().manual_seed(i)) for i in range(30)]
    >>> table = tolerance_table(model, prompts, max_new_tokens=6)
    >>> table.losses(1.0).sum().item()          # ratio 1 accepts only the full model's own tokens
    0.0
    >>> bool((table.losses(0.2) >= table.losses(0.9)).all())   # a smaller ratio tolerates more
    True
    >>> result = calibrate_tolerant(table, delta=0.3, epsilon=0.3, exit_layers=(1,), progress=False)
    >>> result.certified
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltaexit.calibration.api import calibrate
from deltaexit.calibration.result import CalibrationResult
from deltaexit.collector import collect
from deltaexit.lens import Lens
from deltaexit.prompts import as_prompts, continuation_mask, eos_token_id, full_continuations
from deltaexit.structure import find_structure

__all__ = ["DEFAULT_RATIOS", "ToleranceTable", "calibrate_tolerant", "tolerance_table"]

#: The candidate ratios, safest first (1.0: lossless, always certified).
DEFAULT_RATIOS: tuple[float, ...] = (1.0, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass
class ToleranceTable:
    """Per example and continuation position, how close the best differing exit token comes to the full top-1.

    Attributes:
        margins: ``[L-1, n, T]`` float64: at exit layer ``l`` (row ``l - 1``), ``logit_full(d) - logit_full(g)``
            where ``d`` is that layer's lens token on the greedy prefix and ``g`` the greedy token; ``-inf``
            where they agree (or past the continuation).
        mask: ``[n, T]`` the compared positions (up to and including the full model's first EOS).
        continuations: ``[n, T]`` the greedy continuations (``model.generate``, batch 1 by default).
    """

    margins: torch.Tensor
    mask: torch.Tensor
    continuations: torch.Tensor

    @property
    def num_layers(self) -> int:
        """Blocks of the model (exit layers are ``1 .. num_layers - 1``)."""
        return int(self.margins.shape[0]) + 1

    def losses(self, ratio: float, exit_layers: Iterable[int] | None = None) -> torch.Tensor:
        """``[n]`` upper bounds of each example's token disagreement under ``Tolerant(ratio=ratio)`` drafting from
        ``exit_layers`` (default: every layer ``1 .. L-1``, the bound for threshold drafts)."""
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio!r}")
        n, width = self.mask.shape
        if ratio >= 1.0:
            return torch.zeros(n, dtype=torch.float64)
        rows = self._rows(exit_layers)
        margin = self.margins[rows].amax(dim=0)
        hit = (margin >= math.log(ratio)) & self.mask
        first = torch.where(hit.any(dim=1), hit.to(torch.int8).argmax(dim=1), torch.full((n,), width))
        after = torch.arange(width)[None, :] >= first[:, None]
        return (after & self.mask).sum(dim=1).to(torch.float64) / self.mask.sum(dim=1).clamp(min=1)

    def _rows(self, exit_layers: Iterable[int] | None) -> list[int]:
        layers = list(range(1, self.num_layers)) if exit_layers is None else [int(e) for e in exit_layers]
        bad = [e for e in layers if not 1 <= e < self.num_layers]
        if not layers or bad:
            raise ValueError(f"exit_layers must be in 1..{self.num_layers - 1}, got {layers}")
        return [e - 1 for e in layers]


@torch.no_grad()
def _margins(model: nn.Module, lens: Lens, prompt: torch.Tensor, cont: torch.Tensor, width: int) -> torch.Tensor:
    """``[L-1, width]`` margins of one example (``cont``: its compared continuation tokens)."""
    device = lens.structure.input_device
    seq = torch.cat([prompt, cont]).to(device)[None]
    with collect(model, ("h_out",), structure=lens.structure, positions="all") as trace:
        out: Any = model(input_ids=seq)
    p, t = prompt.numel(), cont.numel()
    full = out.logits[0, p - 1 : p - 1 + t].float()
    greedy = cont.to(full.device)
    g = full.gather(-1, greedy[:, None]).squeeze(-1)
    num_layers = lens.structure.num_layers
    rows = torch.full((num_layers - 1, width), -math.inf, dtype=torch.float64)
    for layer in range(1, num_layers):  # an exit after block ``layer`` (1-based): that block's output
        draft = lens(trace.h_out[layer - 1][0, p - 1 : p - 1 + t].to(full.device)).argmax(dim=-1)
        margin = (full.gather(-1, draft[:, None]).squeeze(-1) - g).double().cpu()
        rows[layer - 1, :t] = torch.where((draft != greedy).cpu(), margin, torch.tensor(-math.inf, dtype=torch.float64))
    return rows


def tolerance_table(
    model: nn.Module,
    prompts: Sequence[Any] | torch.Tensor,
    *,
    max_new_tokens: int = 64,
    tokenizer: Any = None,
    batch_size: int = 1,
    progress: bool = False,
) -> ToleranceTable:
    """The :class:`ToleranceTable` of ``prompts``: greedy continuations, then one forward per example.

    Args:
        model: The causal LM.
        prompts: 1-D token-id tensors (or strings with ``tokenizer=``).
        max_new_tokens: Length of the compared continuations.
        tokenizer: Turns string prompts into ids.
        batch_size: Prompts per ``model.generate`` call for the continuations (1: the batch-1 output that the
            guarantee is about; larger is faster but left padding can change near-tied greedy tokens).
        progress: tqdm bars.
    """
    items = as_prompts(prompts, tokenizer)
    if not items:
        raise ValueError("no prompts given: pass at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lens = Lens(find_structure(model))
    cont = full_continuations(model, items, max_new_tokens, batch_size=batch_size, progress=progress)
    mask = continuation_mask(cont, eos_token_id(model))
    iterator: Iterable[int] = range(len(items))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="tolerance table", unit="prompt")
    margins = [_margins(model, lens, items[i], cont[i][mask[i]], cont.shape[1]) for i in iterator]
    return ToleranceTable(torch.stack(margins, dim=1), mask, cont)


def calibrate_tolerant(
    table: ToleranceTable,
    *,
    delta: float,
    epsilon: float = 0.1,
    exit_layers: Iterable[int] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    bound: str = "hb",
    progress: bool = True,
) -> CalibrationResult:
    """Learn-then-Test (:func:`deltaexit.calibration.calibrate` on the table's upper bounds) over ``ratios``.

    Args:
        table: From :func:`tolerance_table` on calibration prompts (i.i.d. with the prompts it is meant for).
        delta: Tolerated expected token disagreement with ``model.generate``, in (0, 1).
        epsilon: Error level: the guarantee holds with probability ``1 - epsilon`` over the calibration prompts.
        exit_layers: The layers drafts exit after (``min_exit_layer`` for ``threshold=-inf``); default all.
        ratios: Candidates, safest (largest) first; the first should be 1.0.
        bound: ``"hb"``, ``"hoeffding"`` or ``"bentkus"``.
        progress: tqdm bar of the tests.

    Returns:
        The :class:`CalibrationResult` (``.threshold``: the certified ratio; ``kv="tolerant"``).

    Raises:
        InsufficientCalibrationData: too few examples for ``(delta, epsilon)`` (the message says how many).
    """
    ordered = [float(r) for r in ratios]
    if not ordered or any(not 0.0 < r <= 1.0 for r in ordered) or ordered != sorted(ordered, reverse=True):
        raise ValueError(f"ratios must be in (0, 1], largest (safest) first, got {list(ratios)}")
    layers = None if exit_layers is None else list(exit_layers)
    result = calibrate(
        losses=lambda r: table.losses(r, layers), thresholds=ordered, delta=delta, epsilon=epsilon, bound=bound,
        kv="tolerant", measure="delta-norm", progress=progress, test_all=True,
    )  # fmt: skip
    result.backend = "offline upper bound"
    result.info = {**result.info, "exit_layers": layers, "parameter": "ratio"}
    return result
