"""Per-token features a streaming collection can store, full vectors or reduced.

=============== =========================== ==============================================
name            stored tensor(s)            shape per token
=============== =========================== ==============================================
``h_in``        ``h_in``                    ``[layers, hidden]`` (storage dtype)
``h_out``       ``h_out``                   ``[layers, hidden]``
``delta``       ``delta``                   ``[layers, hidden]``
``h_in_norm``   ``h_in_norm``               ``[layers]`` float32 (L2 norm)
``h_out_norm``  ``h_out_norm``              ``[layers]`` float32
``delta_norm``  ``delta_norm``              ``[layers]`` float32
``lens_topk``   ``topk_ids``, ``topk_probs`` ``[layers, k]`` int32 / float32 (logit lens)
=============== =========================== ==============================================

Reduced features (norms, lens top-k) are a few bytes per layer instead of
``hidden`` values; ``lens_topk`` is what the ``next``/``final`` labels are made of.

Example:
    >>> parse_features(["delta_norm", "lens_topk"])
    ('delta_norm', 'lens_topk')
    >>> capture_for(("delta_norm", "lens_topk"))
    ('delta',)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from deltaexit.collector import NONFINITE_ADVICE, NonFiniteError, Trace, first_nonfinite

__all__ = [
    "NORM_FEATURES",
    "STREAM_FEATURES",
    "VECTOR_FEATURES",
    "capture_for",
    "parse_features",
    "reduce_batch",
    "refuse_nonfinite_batch",
]

VECTOR_FEATURES: tuple[str, ...] = ("h_in", "h_out", "delta")
NORM_FEATURES: dict[str, str] = {"h_in_norm": "h_in", "h_out_norm": "h_out", "delta_norm": "delta"}
STREAM_FEATURES: tuple[str, ...] = (*VECTOR_FEATURES, *NORM_FEATURES, "lens_topk")


def parse_features(features: Iterable[str] | str) -> tuple[str, ...]:
    """Validate feature names (a comma-separated string or an iterable), keeping order, dropping repeats."""
    if isinstance(features, str):
        features = [f for f in (part.strip() for part in features.split(",")) if f]
    chosen: list[str] = []
    for name in features:
        if name not in STREAM_FEATURES:
            raise ValueError(f"unknown feature {name!r}; choose from {list(STREAM_FEATURES)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"no features chosen; pick at least one of {list(STREAM_FEATURES)}")
    return tuple(chosen)


def capture_for(features: Iterable[str]) -> tuple[str, ...]:
    """The collector captures (``h_in``/``h_out``/``delta``) these features are computed from."""
    needed = {f for f in features if f in VECTOR_FEATURES} | {NORM_FEATURES[f] for f in features if f in NORM_FEATURES}
    return tuple(f for f in VECTOR_FEATURES if f in needed)


def stored_names(features: Iterable[str]) -> tuple[str, ...]:
    """Names of the tensors a shard holds for ``features`` (besides the token metadata)."""
    names: list[str] = []
    for f in features:
        names += ["topk_ids", "topk_probs"] if f == "lens_topk" else [f]
    return tuple(names)


def reduce_batch(
    trace: Trace, features: Iterable[str], keep: torch.Tensor, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Token-major features of one forward: ``{name: [tokens, layers, ...]}`` on the CPU.

    Args:
        trace: A closed trace of one forward captured with ``positions="all"``.
        features: Feature names (see :data:`STREAM_FEATURES`).
        keep: ``[batch, seq]`` bool, the positions to keep (real and subsampled tokens),
            taken in row-major order.
        dtype: Storage dtype of the vector features (None: as captured).
    """
    out: dict[str, torch.Tensor] = {}
    for name in features:
        if name == "lens_topk":
            ids = trace.get("topk_ids")
            probs = trace.get("topk_probs")
            out["topk_ids"] = ids[:, keep.to(ids.device)].transpose(0, 1).to("cpu", torch.int32)
            out["topk_probs"] = probs[:, keep.to(probs.device)].transpose(0, 1).to("cpu", torch.float32)
            continue
        source = NORM_FEATURES.get(name, name)
        x = trace.get(source)
        x = x[:, keep.to(x.device)].transpose(0, 1)  # [tokens, layers, hidden]
        if name in NORM_FEATURES:
            out[name] = x.float().norm(dim=-1).cpu()
        else:
            out[name] = x.to("cpu", dtype or x.dtype).contiguous()
    return out


def refuse_nonfinite_batch(
    tensors: dict[str, torch.Tensor], layers: Iterable[int], dtype: torch.dtype | None = None
) -> None:
    """Raise :class:`~deltaexit.collector.NonFiniteError` before a batch with NaN/inf features is written.

    Args:
        tensors: Token-major features of one batch (as :func:`reduce_batch` gives) with the ``doc`` and
            ``doc_position`` metadata.
        layers: The stored blocks, in row order.
        dtype: The storage dtype of the vector features (float16 overflow is named as a possible cause).

    Example:
        >>> batch = {"delta_norm": torch.tensor([[1.0, float("nan")]]), "doc": torch.tensor([4]),
        ...          "doc_position": torch.tensor([9])}
        >>> try:
        ...     refuse_nonfinite_batch(batch, [0, 1])
        ... except NonFiniteError as exc:
        ...     print(str(exc)[:71])
        delta_norm of block 1 (layer 2) is NaN or inf at document 4, position 9
    """
    layers = list(layers)
    for name, x in tensors.items():
        if name in ("doc", "doc_position", "token_id", "window"):
            continue
        found = first_nonfinite(x.transpose(0, 1), 1)  # [layers, tokens, ...]
        if found is None:
            continue
        (row, token), count = found
        overflow = (
            " (if the model's own states are finite, float16 storage overflowed: collect with dtype='bfloat16' "
            "or 'float32')"
            if dtype == torch.float16 and name in VECTOR_FEATURES
            else ""
        )
        raise NonFiniteError(
            f"{name} of block {layers[row]} (layer {layers[row] + 1}) is NaN or inf at document "
            f"{int(tensors['doc'][token])}, position {int(tensors['doc_position'][token])} ({count} layer-token "
            f"entries in this batch); nothing of this batch was written{overflow}: {NONFINITE_ADVICE}"
        )
