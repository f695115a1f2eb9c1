"""Collected residual states of a text, ready for fitting and scoring exit measures.

:func:`collect_states` runs a causal LM over fixed-length windows of token ids with
:func:`deltaexit.collect` and keeps, per block and real token, ``h_in``, ``h_out`` and the
lens's top-k (ids and probabilities). The result, a :class:`StateSet`, hands out one
:class:`~deltaexit.measures.LayerState` per block and the two label kinds:

- ``next``: ``top1[l] == top1[l+1]``: block ``l+1`` does not change the prediction.
- ``final``: ``saturated[l]``: the top-1 after block ``l`` is already the final one and never
  changes again (what a real exit needs).

Decision protocol: the exit decision *after block l* (0-based, ``l = 0 .. L-2``) may only read
what exists then: ``h_in``/``h_out``/delta **of block l** and its lens. Labels row ``l`` is the
decision after block ``l``. :meth:`StateSet.state` given a measure hands it only what it declares
(:meth:`~deltaexit.measures.ConfidenceMeasure.needs`: ``h_in`` for ``h_in``/``delta``, the lens and
its top-k for ``needs_lens``).

Example:
    >>> import torch
    >>> from deltaexit.measures import get_measure
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=3, hidden=32)
    >>> states = collect_states(model, torch.arange(40) % 50, window=16)
    >>> states.labels("next").shape
    torch.Size([2, 40])
    >>> state = states.state(0, get_measure("softmax-max"))
    >>> state.h_in is None, state.topk_probs.shape
    (True, torch.Size([40, 2]))
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deltaexit.collector import NONFINITE_ADVICE, NonFiniteError, collect, first_nonfinite
from deltaexit.lens import Lens
from deltaexit.measures.base import ConfidenceMeasure, LayerState
from deltaexit.saturation import LABELS, Saturation, saturation_from_topk
from deltaexit.structure import find_structure

__all__ = ["LABELS", "StateSet", "collect_states", "model_context_length", "tokenize_text"]


@dataclass
class StateSet:
    """Per-block states of a set of tokens (tokens in text order).

    Attributes:
        h_in: ``[L, N, hidden]`` float32 state before each block.
        h_out: ``[L, N, hidden]`` float32 state after each block.
        topk_ids: ``[L, N, k]`` lens top-k ids after each block.
        topk_probs: ``[L, N, k]`` their probabilities (float32).
        window: ``[N]`` index of the window each token came from (for disjoint splits).
        lens: The model's lens (optional; softmax measures use ``topk_probs`` when ``k >= 2``).
    """

    h_in: torch.Tensor
    h_out: torch.Tensor
    topk_ids: torch.Tensor
    topk_probs: torch.Tensor
    window: torch.Tensor
    lens: Lens | None = None

    def __post_init__(self) -> None:
        if self.h_in.shape != self.h_out.shape or self.h_in.dim() != 3:
            raise ValueError(
                f"h_in and h_out must both be [layers, tokens, hidden]; got {tuple(self.h_in.shape)} "
                f"and {tuple(self.h_out.shape)}"
            )
        if self.topk_ids.shape[:2] != self.h_in.shape[:2] or self.window.shape[0] != self.h_in.shape[1]:
            raise ValueError("topk_ids / window do not match the states' [layers, tokens]")
        self._saturation: Saturation | None = None

    @property
    def num_layers(self) -> int:
        return int(self.h_in.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.h_in.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.h_in.shape[2])

    @property
    def delta(self) -> torch.Tensor:
        """``[L, N, hidden]``: ``h_out - h_in``."""
        return self.h_out - self.h_in

    @property
    def saturation(self) -> Saturation:
        """Saturation labels (``dx.saturation``) of these tokens."""
        if self._saturation is None:
            self._saturation = saturation_from_topk(self.topk_ids)
        return self._saturation

    def labels(self, kind: str = "next") -> torch.Tensor:
        """``[L-1, N]`` bool, row ``i`` for the state after block ``decision_layers(kind)[i]``.

        ``next``/``final``: True where exiting after block ``i`` is safe. ``kept``: True where
        block ``i+1`` left the lens top-1 unchanged (the same tensor as ``next``, scored one block later).
        """
        if kind in ("next", "kept"):
            return self.saturation.stable
        if kind == "final":
            return self.saturation.saturated[:-1]
        raise ValueError(f"label must be one of {list(LABELS)}, got {kind!r}")

    def state(self, layer: int, measure: ConfidenceMeasure | None = None) -> LayerState:
        """The :class:`LayerState` after block ``layer`` (0-based) for every token.

        Args:
            layer: The block.
            measure: If given, the state holds only what it declares it reads: ``h_in`` when
                ``measure.needs("h_in")``, the lens and its top-k when ``measure.needs("lens")``.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        with_h_in = measure is None or measure.needs("h_in")
        with_lens = measure is None or measure.needs("lens")
        return LayerState(
            layer=layer,
            h_out=self.h_out[layer],
            h_in=self.h_in[layer] if with_h_in else None,
            num_layers=self.num_layers,
            lens=self.lens if with_lens else None,
            topk_probs=self.topk_probs[layer] if with_lens else None,
        )

    def decision_layers(self, kind: str = "next") -> list[int]:
        """Blocks (0-based) whose states are scored for label ``kind``: ``0 .. L-2``, or ``1 .. L-1`` for ``kept``."""
        if kind not in LABELS:
            raise ValueError(f"label must be one of {list(LABELS)}, got {kind!r}")
        first = 1 if kind == "kept" else 0
        return list(range(first, first + self.num_layers - 1))

    def decision_states(self, kind: str = "next", measure: ConfidenceMeasure | None = None) -> list[LayerState]:
        """States after the blocks of :meth:`decision_layers` (aligned with the rows of :meth:`labels`).

        With ``measure``, each holds only what that measure reads (see :meth:`state`).
        """
        return [self.state(layer, measure) for layer in self.decision_layers(kind)]

    def subset(self, index: torch.Tensor) -> StateSet:
        """The tokens at ``index`` (a bool mask or long indices over ``N``)."""
        return StateSet(
            h_in=self.h_in[:, index],
            h_out=self.h_out[:, index],
            topk_ids=self.topk_ids[:, index],
            topk_probs=self.topk_probs[:, index],
            window=self.window[index],
            lens=self.lens,
        )

    def split_windows(self, fractions: Sequence[float]) -> list[StateSet]:
        """Split into consecutive parts of whole windows with the given fractions (summing to 1)."""
        if abs(sum(fractions) - 1.0) > 1e-6 or any(f <= 0 for f in fractions):
            raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
        windows = self.window.unique(sorted=True)
        if len(windows) < len(fractions):
            raise ValueError(f"cannot split {len(windows)} window(s) into {len(fractions)} parts; use more tokens")
        count, parts_n = len(windows), len(fractions)
        bounds, acc = [0], 0.0
        for i, f in enumerate(fractions[:-1]):
            acc += f
            bound = max(round(acc * count), bounds[-1] + 1)  # every part gets >= 1 window
            bounds.append(min(bound, count - (parts_n - 1 - i)))
        bounds.append(len(windows))
        parts = []
        for lo, hi in itertools.pairwise(bounds):
            keep = (self.window >= windows[lo]) & (self.window <= windows[hi - 1])
            parts.append(self.subset(keep))
        return parts


def model_context_length(model: nn.Module, default: int = 512) -> int:
    """The model's maximum positions, else ``default`` (its structure's ``context_length``).

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> model_context_length(tiny_model("llama", num_layers=2, hidden=32)) > 0
        True
    """
    return find_structure(model, validate=False).context_length(default)


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[n]`` of ``text`` (no special tokens), line by line so long files stay fast.

    Raises:
        ValueError: The text is empty or gives no tokens.
    """
    if not text or not text.strip():
        raise ValueError("the text is empty: pass a file with some text in it")
    ids: list[int] = []
    lines = text.splitlines(keepends=True)
    step = 256
    for start in range(0, len(lines), step):
        chunk = "".join(lines[start : start + step])
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if not ids:
        raise ValueError("the tokenizer produced no tokens from the text")
    out = torch.tensor(ids, dtype=torch.long)
    return out[:max_tokens] if max_tokens is not None else out


def _lens_topk(lens: Lens, h: torch.Tensor, k: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Lens top-``k`` ids and probabilities of ``h [L, n, hidden]`` without materialising the softmax."""
    ids, probs = [], []
    with torch.no_grad():
        for layer in range(h.shape[0]):
            layer_ids, layer_probs = [], []
            for part in h[layer].split(chunk):
                logits = lens(part).float()
                values, top = logits.topk(min(k, logits.shape[-1]), dim=-1)
                layer_probs.append((values - logits.logsumexp(dim=-1, keepdim=True)).exp().cpu())
                layer_ids.append(top.cpu())
            ids.append(torch.cat(layer_ids))
            probs.append(torch.cat(layer_probs))
    return torch.stack(ids), torch.stack(probs)


def refuse_nonfinite_states(
    h_in: torch.Tensor, h_out: torch.Tensor, ids: torch.Tensor, offset: int, num_layers: int
) -> None:
    """Raise :class:`~deltaexit.collector.NonFiniteError` if a batch's ``h_in``/``h_out`` ``[L, n, H]`` is NaN/inf.

    The message names the block, the token's position in the text (``offset`` + its index) and its id.

    Example:
        >>> h = torch.zeros(2, 3, 4)
        >>> h[1, 2, 0] = float("inf")
        >>> try:
        ...     refuse_nonfinite_states(torch.zeros(2, 3, 4), h, torch.arange(10), 5, 2)
        ... except NonFiniteError as exc:
        ...     print(str(exc)[:59])
        h_out of block 1 (layer 2) is NaN or inf at text position 7
    """
    for name, x in (("h_in", h_in), ("h_out", h_out)):
        found = first_nonfinite(x, 1)
        if found is None:
            continue
        (layer, token), count = found
        position = offset + token
        raise NonFiniteError(
            f"{name} of block {layer} (layer {layer + 1}) is NaN or inf at text position {position} "
            f"(token id {int(ids[position])}; {count} layer-token entries in this batch of "
            f"{x.shape[1]} tokens and {num_layers} blocks): {NONFINITE_ADVICE}"
        )


def collect_states(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    window: int | None = None,
    batch_size: int = 16,
    topk: int = 2,
    progress: bool = False,
    desc: str = "collect",
) -> StateSet:
    """Run ``model`` over ``ids`` cut into windows and collect every block's states.

    Args:
        model: A causal LM (eval mode is set for the duration).
        ids: ``[n]`` token ids (one long text); cut into windows of ``window`` tokens (the last
            window may be shorter), each run independently from position 0.
        window: Window length (default: ``min(256, context length)``).
        batch_size: Windows per forward.
        topk: Lens top-k to keep (>= 2 lets softmax-gap skip the lens).
        progress: Show a tqdm bar.

    Returns:
        A :class:`StateSet` of ``n`` tokens.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("no token ids to run: the text is empty")
    window = window or min(256, find_structure(model, validate=False).context_length())
    if topk < 1:
        raise ValueError(f"topk must be >= 1 (top-1 gives the labels), got {topk}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    structure = find_structure(model)
    lens = Lens(structure)
    device = structure.input_device
    chunks = list(ids.split(window))
    full = [c for c in chunks if c.numel() == window]
    rest = [c for c in chunks if c.numel() != window]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [c.unsqueeze(0) for c in rest]
    h_in, h_out, tk_ids, tk_probs = [], [], [], []
    offset = 0  # text position of the batch's first token (batches cover the text in order)
    # The model's own logits are not needed (the lens reproduces them): skip them where supported.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            with (
                torch.no_grad(),
                collect(model, ("h_in", "h_out"), positions="all", dtype=torch.float32, structure=structure) as trace,
            ):
                model(input_ids=batch.to(device), **extra)
            b_in, b_out = trace.tokens("h_in"), trace.tokens("h_out")
            refuse_nonfinite_states(b_in, b_out, ids, offset, structure.num_layers)
            offset += batch.numel()
            ids_, probs_ = _lens_topk(lens, b_out, topk)
            h_in.append(b_in.cpu())
            h_out.append(b_out.cpu())
            tk_ids.append(ids_)
            tk_probs.append(probs_)
    finally:
        model.train(was_training)
    n_windows = len(chunks)
    window_index = torch.arange(n_windows).repeat_interleave(torch.tensor([c.numel() for c in chunks]))
    return StateSet(
        h_in=torch.cat(h_in, dim=1),
        h_out=torch.cat(h_out, dim=1),
        topk_ids=torch.cat(tk_ids, dim=1),
        topk_probs=torch.cat(tk_probs, dim=1),
        window=window_index,
        lens=lens,
    )
