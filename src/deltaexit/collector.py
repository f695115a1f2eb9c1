"""Hook-based collectors of the residual stream: ``h_in``, ``h_out``, ``delta`` and lens top-k.

:func:`collect` attaches observing hooks (they return ``None``) to the decoder
blocks of any causal LM, records what you opt into for every forward pass run
inside the ``with`` block (one :class:`Record` per forward, so one per step of
``model.generate``), and removes every hook on exit, also when the forward raises.

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=3, hidden=32)
    >>> ids = torch.tensor([[5, 6, 7, 8]])
    >>> with collect(model, capture=("delta", "h_out")) as trace:
    ...     _ = model(input_ids=ids)
    >>> tuple(trace.delta.shape)   # [layers, batch, seq, hidden]
    (3, 1, 4, 32)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deltaexit.lens import Lens
from deltaexit.structure import ModelStructure, StructureError, find_structure

__all__ = [
    "FEATURES",
    "NONFINITE_ADVICE",
    "Collector",
    "NonFiniteError",
    "Record",
    "Trace",
    "TraceError",
    "collect",
    "first_nonfinite",
]

#: Residual-stream features a collector can capture.
FEATURES: tuple[str, ...] = ("h_in", "h_out", "delta")
Positions = Literal["auto", "all", "last", "mask"]


class TraceError(RuntimeError):
    """Raised when a trace is used in a way its collector did not allow."""


class NonFiniteError(ValueError):
    """NaN or inf hidden states where labels or features are computed (refused, never silently used)."""


#: What every :class:`NonFiniteError` tells the user to do.
NONFINITE_ADVICE = (
    "the model produced NaN/inf hidden states for this input, so no label or feature is defined there; check "
    "its weights and embeddings (all(torch.isfinite(p).all() for p in model.parameters())) or leave out the "
    "inputs that give them"
)


def first_nonfinite(x: torch.Tensor, token_ndim: int, mask: torch.Tensor | None = None) -> tuple[list[int], int] | None:
    """Where ``x`` ``[layers, *tokens, ...]`` first holds NaN or inf, and in how many (layer, token) entries.

    Args:
        x: Layer-major values; dims after the ``token_ndim`` token dims (hidden, k) are reduced.
        token_ndim: Number of token dims after the layer dim (2 for ``[batch, seq]``, 1 for ``[tokens]``).
        mask: ``[*tokens]`` bool of the tokens that count (padding excluded), or None for all.

    Returns:
        ``([layer row, *token index], count)``, or None when every counted entry is finite.

    Example:
        >>> x = torch.zeros(3, 1, 4, 8)
        >>> x[1, 0, 2, 5] = float("nan")
        >>> first_nonfinite(x, 2), first_nonfinite(x[:1], 2)
        (([1, 0, 2], 1), None)
    """
    if not x.is_floating_point():
        return None
    bad = ~torch.isfinite(x)
    if bad.dim() > 1 + token_ndim:
        bad = bad.flatten(1 + token_ndim).any(dim=-1)
    if mask is not None:
        bad &= mask.to(device=bad.device, dtype=torch.bool)
    count = int(bad.sum())
    if count == 0:
        return None
    return [int(i) for i in bad.nonzero()[0].tolist()], count


@dataclass
class Record:
    """What one forward pass left in a trace.

    Attributes:
        tensors: Feature name -> tensor. With ``positions="all"`` or ``"last"`` each is
            ``[layers, batch, seq, dim]`` (``seq`` is 1 for ``"last"``); with ``"mask"``
            ``[layers, tokens, dim]`` over the positions the attention mask keeps.
            ``topk_ids``/``topk_probs`` have ``k`` as their last dim.
        token_mask: ``[batch, seq]`` bool, True where the position is a real token
            (from the attention mask); None with ``positions="mask"``.
        token_index: ``[tokens, 2]`` (batch row, position) of each token with ``"mask"``.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    filled: set[int] = field(default_factory=set)
    provisional: set[int] = field(default_factory=set)


class Trace:
    """The records of one :class:`Collector`; features read as ``trace.delta`` etc.

    Attribute access concatenates the records along the token axis: one forward
    gives ``[layers, batch, seq, dim]``; the steps of ``model.generate`` give
    ``[layers, batch, steps, dim]`` with ``positions="last"``.

    Example:
        >>> import torch
        >>> from deltaexit.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=3, hidden=32)
        >>> ids, mask = torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]])
        >>> with collect(model, layers=[1, 2]) as trace:
        ...     _ = model(input_ids=ids, attention_mask=mask)
        >>> tuple(trace.delta[trace.layer_index(2)].shape)   # block 2: [batch, seq, hidden]
        (1, 3, 32)
        >>> tuple(trace.tokens("delta").shape)                # [layers, real tokens, hidden]
        (2, 2, 32)
    """

    def __init__(self, layers: Sequence[int], capture: Sequence[str], topk: int, positions: str) -> None:
        self.layers: tuple[int, ...] = tuple(layers)
        self.capture: tuple[str, ...] = tuple(capture)
        self.topk: int = topk
        self.positions: str = positions
        self.records: list[Record] = []
        self.closed: bool = False
        self._cache: dict[str, torch.Tensor] = {}

    # -- reading ---------------------------------------------------------------------------------
    @property
    def features(self) -> tuple[str, ...]:
        """Names of the tensors this trace holds."""
        names = list(self.capture)
        if self.topk:
            names += ["topk_ids", "topk_probs"]
        return tuple(names)

    def get(self, name: str) -> torch.Tensor:
        """The feature ``name`` over all records (see the class docstring for shapes)."""
        if name not in self.features:
            raise TraceError(
                f"{name!r} was not captured (this trace holds {list(self.features)}); "
                f"pass capture=(..., {name!r}) or topk=k to dx.collect(...)."
            )
        if name in self._cache:
            return self._cache[name]
        records = self._complete_records()
        if len(records) == 1:
            return records[0].tensors[name]
        axis = 1 if self.positions == "mask" else 2
        try:
            joined = torch.cat([r.tensors[name] for r in records], dim=axis)
        except RuntimeError as exc:
            raise TraceError(
                f"cannot join {len(records)} records of {name!r} (different batch sizes?); "
                "read them one by one from trace.records."
            ) from exc
        if self.closed:
            self._cache[name] = joined
        return joined

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in FEATURES or name in ("topk_ids", "topk_probs"):
            return self.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def token_mask(self) -> torch.Tensor | None:
        """``[batch, seq]`` bool over all records: True at real (unpadded) positions."""
        if self.positions == "mask":
            return None
        masks = [r.token_mask for r in self._complete_records()]
        if any(m is None for m in masks):
            return None
        return masks[0] if len(masks) == 1 else torch.cat(masks, dim=1)  # type: ignore[arg-type]

    @property
    def token_index(self) -> torch.Tensor | None:
        """``[tokens, 2]`` (row, position) of each token captured with ``positions="mask"``."""
        if self.positions != "mask":
            return None
        return torch.cat([r.token_index for r in self._complete_records()], dim=0)  # type: ignore[misc]

    def tokens(self, name: str) -> torch.Tensor:
        """``[layers, tokens, dim]``: the feature over real tokens only (padding dropped)."""
        x = self.get(name)
        if self.positions == "mask":
            return x
        mask = self.token_mask
        if mask is None:
            return x.flatten(1, 2)
        return x[:, mask.to(x.device)]

    def layer_index(self, layer: int) -> int:
        """Row of block ``layer`` (0-based) in the captured tensors."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise TraceError(f"layer {layer} was not captured; captured layers are {list(self.layers)}") from None

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"Trace({state}, records={len(self.records)}, layers={len(self.layers)}, "
            f"features={list(self.features)}, positions={self.positions!r})"
        )

    def _complete_records(self) -> list[Record]:
        n = len(self.layers)
        records = [r for r in self.records if len(r.filled) == n]
        if not records:
            raise TraceError(
                "the trace is empty: no complete forward pass ran inside the `with dx.collect(model)` "
                "block (run model(...) or model.generate(...) inside it)."
            )
        return records


class Collector:
    """Context manager that captures residual-stream features of every forward pass run inside it.

    Entering attaches observing hooks (they return ``None``) and yields the :class:`Trace`;
    leaving removes every hook, also when the forward raises. :func:`collect` is the same call.

    Args:
        model: Any ``transformers`` causal LM (blocks are found by structure).
        capture: Which of ``"h_in"``, ``"h_out"``, ``"delta"`` to keep (``()`` keeps none).
        layers: Block indices (0-based, negatives allowed) to capture; default all.
        positions: ``"all"`` positions, the ``"last"`` real token of each row, only positions
            the attention ``"mask"`` keeps (flattened to ``[layers, tokens, dim]``), or ``"auto"``
            (default): all positions of a plain forward, the last token of each forward that
            is given a KV cache, i.e. one record per step of ``model.generate``.
        topk: Also keep the logit lens's top-``k`` ids and probabilities per layer.
        dtype: Storage dtype (default: the model's hidden-state dtype).
        device: Storage device (default: where the hidden states are).
        structure: A pre-computed :class:`~deltaexit.structure.ModelStructure`.
        **overrides: Passed to :func:`~deltaexit.structure.find_structure`.

    Raises:
        ValueError: An unknown feature or ``positions``, or a negative ``topk``.
        IndexError: A layer outside the model.

    Example:
        >>> import torch
        >>> from deltaexit.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=3, hidden=32)
        >>> with Collector(model, ("delta",), topk=2) as trace:
        ...     out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, min_new_tokens=4,
        ...                          do_sample=False, pad_token_id=0)
        >>> len(trace.records), tuple(trace.topk_ids.shape)   # one record per step: [layers, batch, steps, k]
        (4, (3, 1, 4, 2))
    """

    def __init__(
        self,
        model: nn.Module,
        capture: Iterable[str] = ("delta",),
        *,
        layers: Iterable[int] | None = None,
        positions: Positions = "auto",
        topk: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        structure: ModelStructure | None = None,
        **overrides: Any,
    ) -> None:
        capture = tuple(capture)
        unknown = [c for c in capture if c not in FEATURES]
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}; choose from {list(FEATURES)}")
        if positions not in ("auto", "all", "last", "mask"):
            raise ValueError(f"positions must be 'auto', 'all', 'last' or 'mask', got {positions!r}")
        if not isinstance(topk, int) or topk < 0:
            raise ValueError(f"topk must be a non-negative int, got {topk!r}")
        self.model = model
        self.structure = structure if structure is not None else find_structure(model, **overrides)
        n = self.structure.num_layers
        chosen = range(n) if layers is None else layers
        self.layers = tuple(sorted({self.structure.check_layer(int(layer)) for layer in chosen}))
        if not self.layers:
            raise ValueError("layers is empty: choose at least one block to capture")
        self.capture = capture
        self.positions: str = positions
        self.topk = topk
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.lens = Lens(self.structure) if topk else None
        self.trace = Trace(self.layers, capture, topk, positions)
        self._handles: list[RemovableHandle] = []
        self._inputs: dict[int, torch.Tensor] = {}
        self._call_mask: torch.Tensor | None = None
        self._call_positions: str = "all" if positions == "auto" else positions
        self._prefix = 0
        self._current: Record | None = None
        self._used = False

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        if self._used:
            raise TraceError("this collector was already used and closed; create a new one with dx.collect(...)")
        self._used = True
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            need_input = "h_in" in self.capture or "delta" in self.capture
            for row, layer in enumerate(self.layers):
                block = self.structure.blocks[layer]
                if need_input:
                    self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(layer), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._make_post_hook(layer, row)))
            self._attach_identity_fills()
        except BaseException:
            self.remove()
            raise
        return self.trace

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent) and close the trace."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._current = None
        self.trace.closed = True

    @property
    def attached(self) -> bool:
        """Whether hooks are currently attached."""
        return bool(self._handles)

    # -- hooks -----------------------------------------------------------------------------------
    def _on_model_call(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if isinstance(ids, torch.Tensor) else embeds
        if isinstance(ref, torch.Tensor) and ref.dim() >= 2 and (ref.shape[0] == 0 or ref.shape[1] == 0):
            raise ValueError(f"empty batch: input of shape {tuple(ref.shape)}; pass at least one row with one token.")
        mask = kwargs.get("attention_mask")
        self._call_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self.positions == "auto":
            # A KV cache passed in means incremental decoding (model.generate): keep the last token.
            self._call_positions = "last" if cache is not None else "all"
        # Prompt positions a model prepends on a fresh forward (structure.prefix_positions) are not tokens.
        self._prefix = self.structure.prefix_positions and self._fresh(cache) and self.structure.prefix_positions
        self._current = None

    @staticmethod
    def _fresh(cache: object) -> bool:
        """Whether a forward given ``cache`` starts a sequence (no cache, or one holding no tokens yet)."""
        seen = getattr(cache, "get_seq_length", None)
        try:
            return cache is None or not callable(seen) or seen() == 0
        except Exception:  # a cache that cannot tell its length (only recurrent layers) is not fresh
            return False

    def _make_pre_hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = self.structure.stream_input(args, kwargs)
            if isinstance(h, torch.Tensor):
                self._inputs[layer] = h

        return hook

    def _make_post_hook(self, layer: int, row: int):
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            with torch.no_grad():
                self._record(layer, row, self.structure.stream_output(output))

        return hook

    def _attach_identity_fills(self) -> None:
        """Hooks that record each captured block the model skips (``structure.skipped``) as an identity step.

        A skipped block's state is the output of the nearest block before it that runs (else the input of the
        nearest one after it); it is filled in provisionally there, and the block's own hooks overwrite it if
        the block does run on some forward (e.g. given image features).
        """
        skipped = set(self.structure.skipped)
        running = [i for i in range(self.structure.num_layers) if i not in skipped]
        for row, layer in enumerate(self.layers):
            if layer not in skipped:
                continue
            before = [i for i in running if i < layer]
            if before:
                hook = self._make_identity_hook(layer, row, after=True)
                self._handles.append(self.structure.blocks[before[-1]].register_forward_hook(hook))
            else:
                hook = self._make_identity_hook(layer, row, after=False)
                block = self.structure.blocks[next(i for i in running if i > layer)]
                self._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))

    def _make_identity_hook(self, layer: int, row: int, *, after: bool):
        def hook(_module: nn.Module, args: tuple, *rest: object) -> None:
            h = self.structure.stream_output(rest[0]) if after else self.structure.stream_input(args, rest[0])  # type: ignore[arg-type]
            with torch.no_grad():
                self._record(layer, row, h, h_in=h, provisional=True)

        return hook

    def _start_record(self, h: torch.Tensor) -> Record:
        if h.dim() < 3:
            raise StructureError(
                f"a decoder block produced hidden states of shape {tuple(h.shape)}; expected [batch, seq, hidden] "
                "(or [batch, seq, streams, hidden] for hyper-connections)."
            )
        batch, seq = h.shape[0], h.shape[1]
        mask = self._call_mask
        if mask is not None and (mask.shape[0] != batch or mask.shape[1] < seq):
            mask = None
        keep = mask[:, -seq:].to(torch.bool) if mask is not None else None
        record = Record()
        store = self.device if self.device is not None else h.device
        if self._call_positions == "all":
            record.token_mask = (keep if keep is not None else torch.ones(batch, seq, dtype=torch.bool)).to(store)
        elif self._call_positions == "last":
            record.token_mask = torch.ones(batch, 1, dtype=torch.bool, device=store)
            if keep is not None:
                # Last real token of each row (right padding aware); a fully masked row keeps the last column.
                idx = torch.arange(seq, device=keep.device).expand(batch, seq)
                last = torch.where(keep, idx, torch.full_like(idx, -1)).amax(dim=1)
                self._last_index = torch.where(last < 0, torch.full_like(last, seq - 1), last).to(h.device)
            else:
                self._last_index = torch.full((batch,), seq - 1, dtype=torch.long, device=h.device)
        else:
            keep = keep if keep is not None else torch.ones(batch, seq, dtype=torch.bool, device=h.device)
            self._keep = keep.to(h.device)
            record.token_index = self._keep.nonzero().to(store)
        self.trace.records.append(record)
        self.trace._cache.clear()
        return record

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        if self._call_positions == "all":
            return x
        if self._call_positions == "last":
            rows = torch.arange(x.shape[0], device=x.device)
            return x[rows, self._last_index.to(x.device)].unsqueeze(1)
        return x[self._keep.to(x.device)]

    def _store(self, record: Record, name: str, row: int, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buf = record.tensors.get(name)
        if buf is None:
            device = self.device if self.device is not None else value.device
            buf = torch.empty((len(self.layers), *value.shape), dtype=dtype, device=device)
            record.tensors[name] = buf
        if buf.shape[1:] != value.shape:
            raise StructureError(
                f"{name} of block {self.layers[row]} has shape {tuple(value.shape)} but earlier captured "
                f"blocks gave {tuple(buf.shape[1:])}; capture layers of one width at a time (layers=[...])."
            )
        buf[row].copy_(value)
        return buf[row]

    def _record(
        self, layer: int, row: int, h_out: torch.Tensor, h_in: torch.Tensor | None = None, provisional: bool = False
    ) -> None:
        """Store block ``layer``'s features in the current record (``h_in``: given, else the one its pre-hook saw;
        a ``provisional`` identity fill of a skipped block is overwritten if the block itself runs)."""
        if self._prefix and h_out.shape[1] > self._prefix:
            h_out = h_out[:, self._prefix :]
        record = self._current
        if record is None or (row in record.filled and row not in record.provisional):
            record = self._start_record(h_out)
            self._current = record
        record.provisional.discard(row)
        if provisional:
            record.provisional.add(row)
        store_dtype = self.dtype if self.dtype is not None else h_out.dtype
        h_in = self._inputs.pop(layer, None) if h_in is None else h_in
        if h_in is not None and self._prefix and h_in.shape[1] > self._prefix:
            h_in = h_in[:, self._prefix :]
        if ("h_in" in self.capture or "delta" in self.capture) and h_in is None:
            raise StructureError(f"block {layer} was called without a hidden-state input to observe.")
        if "delta" in self.capture:
            assert h_in is not None
            if h_in.shape != h_out.shape:
                raise StructureError(
                    f"block {layer} maps hidden states of shape {tuple(h_in.shape)} to "
                    f"{tuple(h_out.shape)}; delta = h_out - h_in is undefined there. Capture "
                    "('h_in', 'h_out') instead, or choose other layers."
                )
            compute = torch.promote_types(torch.promote_types(h_out.dtype, store_dtype), torch.float32)
            # Under a device_map the block's input may still sit on the previous block's device.
            x_in = self._select(h_in).to(device=h_out.device, dtype=compute)
            if compute == store_dtype:
                # Subtract in place in the storage buffer: no delta-sized temporary per layer.
                stored = self._store(record, "delta", row, self._select(h_out), store_dtype)
                stored.sub_(x_in.to(stored.device))
            else:
                delta = self._select(h_out).to(compute) - x_in
                self._store(record, "delta", row, delta, store_dtype)
        if "h_in" in self.capture:
            assert h_in is not None
            self._store(record, "h_in", row, self._select(h_in), store_dtype)
        if "h_out" in self.capture:
            self._store(record, "h_out", row, self._select(h_out), store_dtype)
        if self.topk:
            assert self.lens is not None
            ids, probs = self.lens.topk(self._select(h_out), self.topk)
            self._store(record, "topk_ids", row, ids, torch.long)
            self._store(record, "topk_probs", row, probs, torch.float32)
        record.filled.add(row)


def collect(model: nn.Module, *args: Any, **kwargs: Any) -> Collector:
    """Capture residual-stream features of every forward pass run inside a ``with`` block.

    The function form of :class:`Collector`: it forwards every argument unchanged (so the two cannot
    differ; ``positions="auto"`` is the default of both). See :class:`Collector` for the arguments.

    Returns:
        A :class:`Collector`; entering it yields the :class:`Trace`.

    Example:
        >>> import torch
        >>> from deltaexit.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=3, hidden=32, vocab=128)
        >>> with collect(model, ("delta",), topk=5) as trace:
        ...     _ = model(input_ids=torch.tensor([[1, 2, 3]]))
        >>> tuple(trace.delta.shape), tuple(trace.topk_ids.shape)
        ((3, 1, 3, 32), (3, 1, 3, 5))
    """
    return Collector(model, *args, **kwargs)
