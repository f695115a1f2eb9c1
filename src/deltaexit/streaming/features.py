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

from deltaexit.collector import Trace

__all__ = [
    "NORM_FEATURES",
    "STREAM_FEATURES",
    "VECTOR_FEATURES",
    "capture_for",
    "parse_features",
    "reduce_batch",
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
