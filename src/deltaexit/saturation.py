"""Saturation labels from a trace: when does the logit lens's top-1 become final?

Layers are numbered 1..L here (layer ``l`` is the output of block ``l``), as in
the early-exit literature. A token's *saturation layer* is the first layer from
which the lens's top-1 equals the final top-1 at every later layer; a perfect,
free exit predictor would stop it there.

Example:
    >>> from deltaexit.collector import collect
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=3, hidden=32)
    >>> with torch.no_grad(), collect(model, ("h_out",), positions="all") as trace:
    ...     _ = model(input_ids=torch.arange(8)[None])
    >>> sat = saturation(trace, Lens.from_model(model), k=2)
    >>> sat.saturation_layer.shape, 0.0 <= sat.oracle_compute_saved < 1.0
    (torch.Size([1, 8]), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaexit.collector import NONFINITE_ADVICE, NonFiniteError, Trace, TraceError, first_nonfinite
from deltaexit.lens import Lens

__all__ = [
    "LABELS",
    "READS_KEPT_REASON",
    "Saturation",
    "reads_label",
    "refuse_nonfinite",
    "saturation",
    "saturation_from_topk",
]

#: The label kinds every fit and evaluation supports.
#:
#: - ``next``: the decision after block ``l`` predicts that block ``l+1`` keeps the lens top-1
#:   (causal: the state scored is known when the exit is decided).
#: - ``final``: the decision after block ``l`` predicts that the top-1 is already the final one.
#: - ``kept``: block ``l`` itself left the top-1 unchanged, scored from block ``l``'s own state
#:   (its ``h_in``, ``h_out`` and delta): the research note's protocol, which detects the change a
#:   block made rather than predicting the next one. Decisions after blocks ``1 .. L-1``.
LABELS: tuple[str, ...] = ("next", "final", "kept")


def reads_label(measure: object, label: str) -> bool:
    """Whether ``measure`` reads, as its input, what ``label`` is computed from (so it must not be scored on it).

    ``kept`` ("block ``l`` left the lens top-1 unchanged") is the lens top-1 of ``h_in`` and of ``h_out`` of
    the block scored: a measure that reads the lens of both (``lens-mlp``) knows the label exactly.
    ``next`` and ``final`` need blocks after the one scored, which no measure reads.

    Example:
        >>> from deltaexit.measures import get_measure
        >>> reads_label(get_measure("lens-mlp"), "kept"), reads_label(get_measure("lens-mlp"), "next")
        (True, False)
        >>> reads_label(get_measure("softmax-max"), "kept"), reads_label(get_measure("state-cosine"), "kept")
        (False, False)
    """
    needs = getattr(measure, "needs", None)
    if label != "kept" or needs is None:
        return False
    return bool(needs("lens") and needs("h_in") and needs("h_out"))


#: Why :func:`reads_label` measures are left out of the ``kept`` evaluation (shown in reports and JSON).
READS_KEPT_REASON = "reads the lens of h_in and h_out, from which the 'kept' label is computed"


def _suffix_all(x: torch.Tensor) -> torch.Tensor:
    """``out[l] = x[l] & x[l+1] & ... & x[L-1]`` along dim 0."""
    return x.flip(0).to(torch.int8).cummin(dim=0).values.flip(0).to(torch.bool)


@dataclass
class Saturation:
    """Saturation labels of every captured token; token dims follow the trace's layout.

    Attributes:
        top1: ``[L, *tokens]`` lens top-1 id after each block.
        stable: ``[L-1, *tokens]`` True where ``top1[l] == top1[l+1]`` (label ``next``).
        saturated: ``[L, *tokens]`` True where top-1 is already final and never changes
            again (label ``final``); ``saturated[l]`` implies ``saturated[l+1]``.
        saturation_layer: ``[*tokens]`` in ``[1, L]``.
        topk_saturation_layer: ``[k, *tokens]``: the layer from which rank ``r`` is fixed
            for good ("Looking Beyond the Top-1"), or None when ``k == 1``.
        token_mask: ``[*tokens]`` bool of real tokens (padding excluded from summaries), or None.
    """

    top1: torch.Tensor
    stable: torch.Tensor
    saturated: torch.Tensor
    saturation_layer: torch.Tensor
    topk_saturation_layer: torch.Tensor | None
    token_mask: torch.Tensor | None

    @property
    def num_layers(self) -> int:
        """Number of layers L."""
        return int(self.top1.shape[0])

    def _valid(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_mask is None:
            return x.reshape(-1)
        return x[self.token_mask.to(x.device)]

    @property
    def num_tokens(self) -> int:
        """Number of real tokens the summaries are over."""
        return int(self._valid(self.saturation_layer).numel())

    @property
    def oracle_mean_layer(self) -> float:
        """Mean saturation layer: blocks a perfect predictor runs per token."""
        return float(self._valid(self.saturation_layer).float().mean())

    @property
    def oracle_depth_fraction(self) -> float:
        """Mean saturation layer / L."""
        return self.oracle_mean_layer / self.num_layers

    @property
    def oracle_compute_saved(self) -> float:
        """Share of block compute a perfect, free exit predictor saves: ``1 - mean(sat) / L``."""
        return 1.0 - self.oracle_depth_fraction

    def per_layer(self) -> list[dict[str, float]]:
        """Per layer: share of tokens saturated, and change rate to the next layer."""
        rows = []
        for layer in range(self.num_layers):
            row = {
                "layer": layer + 1,
                "saturated": float(self._valid(self.saturated[layer]).float().mean()),
                "exits_here": float((self._valid(self.saturation_layer) == layer + 1).float().mean()),
            }
            if layer < self.num_layers - 1:
                row["change_rate"] = float(1 - self._valid(self.stable[layer]).float().mean())
            rows.append(row)
        return rows

    def topk_mean_layers(self) -> list[float] | None:
        """Mean saturation layer of each rank 1..k (non-decreasing when ranks saturate in order)."""
        if self.topk_saturation_layer is None:
            return None
        return [float(self._valid(r).float().mean()) for r in self.topk_saturation_layer]

    def summary(self) -> dict[str, object]:
        """JSON-friendly summary: oracle ceiling, per-layer table and top-k order."""
        return {
            "num_layers": self.num_layers,
            "num_tokens": self.num_tokens,
            "oracle_mean_layer": self.oracle_mean_layer,
            "oracle_depth_fraction": self.oracle_depth_fraction,
            "oracle_compute_saved": self.oracle_compute_saved,
            "per_layer": self.per_layer(),
            "topk_mean_layers": self.topk_mean_layers(),
        }


def saturation_from_topk(topk_ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> Saturation:
    """Saturation labels from lens top-k ids of shape ``[L, *tokens, k]`` (all L layers).

    Example:
        >>> ids = torch.tensor([[[5]], [[7]], [[7]]])   # 3 layers, 1 token, k=1
        >>> saturation_from_topk(ids).saturation_layer.tolist()
        [2]
    """
    if topk_ids.dim() < 2:
        raise ValueError(f"topk_ids must be [layers, *tokens, k], got shape {tuple(topk_ids.shape)}")
    num_layers = topk_ids.shape[0]
    if num_layers < 1:
        raise ValueError("need at least one layer")
    top1 = topk_ids[..., 0]
    stable = top1[:-1] == top1[1:]
    saturated = _suffix_all(top1 == top1[-1:])
    saturation_layer = num_layers - saturated.sum(dim=0) + 1
    topk_layer = None
    if topk_ids.shape[-1] > 1:
        fixed = _suffix_all(topk_ids == topk_ids[-1:])  # [L, *tokens, k]
        topk_layer = (num_layers - fixed.sum(dim=0) + 1).movedim(-1, 0)
    return Saturation(
        top1=top1,
        stable=stable,
        saturated=saturated,
        saturation_layer=saturation_layer,
        topk_saturation_layer=topk_layer,
        token_mask=token_mask,
    )


def refuse_nonfinite(trace: Trace, name: str, what: str) -> None:
    """Raise :class:`~deltaexit.collector.NonFiniteError` if ``trace``'s ``name`` is NaN/inf at a real token.

    The message names the block, the batch row and position (or the token), and what to do.
    Saturation labels of such tokens would be garbage (the top-1 of NaN logits is arbitrary), so they are
    refused, as early-exit generation refuses a NaN score.
    """
    mask = trace.token_mask
    token_ndim = 1 if trace.positions == "mask" else 2
    found = first_nonfinite(trace.get(name), token_ndim, mask)
    if found is None:
        return
    (row, *token), count = found
    if trace.positions == "mask" and trace.token_index is not None:
        token = [int(i) for i in trace.token_index[token[0]].tolist()]
    where = f"batch row {token[0]}, position {token[1]}" if len(token) == 2 else f"token {token[0]}"
    block = trace.layers[row]
    raise NonFiniteError(
        f"{what} after block {block} (layer {block + 1}) is NaN or inf at {where} ({count} layer-token entries "
        f"in all): {NONFINITE_ADVICE}"
    )


def saturation(trace: Trace, lens: Lens | None = None, *, k: int | None = None) -> Saturation:
    """Saturation labels of a trace that covers every block.

    Uses the trace's lens top-k if it was captured with ``topk=...``; otherwise
    applies ``lens`` to the captured ``h_out``.

    Args:
        trace: A trace from :func:`deltaexit.collect` over all layers.
        lens: The model's :class:`~deltaexit.lens.Lens` (needed unless top-k was captured).
        k: How many ranks to follow for the top-k order (default: the trace's ``topk``, else 1).

    Returns:
        A :class:`Saturation`.

    Raises:
        NonFiniteError: The captured states (or lens probabilities) are NaN or inf at a real token.
    """
    if trace.layers != tuple(range(len(trace.layers))) or (
        lens is not None and len(trace.layers) != lens.structure.num_layers
    ):
        raise TraceError(
            f"saturation needs every block captured; this trace has layers {list(trace.layers)}. "
            "Collect with layers=None."
        )
    if trace.topk and (k is None or k <= trace.topk):
        ids = trace.get("topk_ids")
        ids = ids[..., : (k or trace.topk)]
        refuse_nonfinite(trace, "topk_probs", "h_out (its lens probabilities)")
    elif "h_out" in trace.capture:
        if lens is None:
            raise ValueError("pass the model's lens (dx.Lens.from_model(model)) to read top-1 off h_out")
        k = k or 1
        h = trace.get("h_out")
        refuse_nonfinite(trace, "h_out", "h_out")
        with torch.no_grad():
            ids = torch.stack([lens.topk(h[layer], k)[0].to(h.device) for layer in range(h.shape[0])])
    else:
        raise TraceError(
            "saturation needs the lens top-k per layer: collect with topk=k, or capture 'h_out' and pass the lens."
        )
    return saturation_from_topk(ids, trace.token_mask)
