"""Calibration data from a streamed collection: exit tables and per-example losses read shard by shard.

A collection (:func:`deltaexit.collect_to_disk`) already holds what the offline simulator needs: per token
and block the lens top-1 (``lens_topk``) and the states a measure scores. Each *window* of the collection is
one calibration example (teacher-forced on the corpus text, as :func:`~deltaexit.calibration.exit_table` on
the same windows): its tokens are the scored positions, ``step`` is the position in the window, the
reference is the next token of the window.

- :func:`shard_exit_table` builds the :class:`~deltaexit.calibration.ExitTable` of chosen windows (``12 * L``
  bytes a token, against ``2 * L * hidden`` for the fp16 deltas it is computed from).
- :func:`shard_losses` never holds a table: one pass over the shards fills a ``[candidates, examples]`` loss
  matrix (8 bytes per candidate and window), which is what Learn-then-Test reads. A window lies in one
  shard, so each shard's windows are complete.

Example:
    >>> import tempfile
    >>> from deltaexit.testing import tiny_model
    >>> from deltaexit.streaming.writer import collect_to_disk
    >>> model, out = tiny_model("llama", num_layers=3, hidden=32, vocab=64), tempfile.mkdtemp()
    >>> _ = collect_to_disk(model, [list(range(3, 63))], out, features="h_out,lens_topk", topk=2, context=20,
    ...                     progress=False)
    >>> table = shard_exit_table(out, "softmax-max")
    >>> table.num_examples, table.num_tokens, table.num_layers
    (3, 60, 3)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from deltaexit.calibration.simulate import ExitTable
from deltaexit.lens import Lens
from deltaexit.measures.base import ConfidenceMeasure, get_measure
from deltaexit.stream_evaluation import BatchStates, missing_input, window_counts
from deltaexit.streaming.dataset import META_FIELDS
from deltaexit.streaming.features import stored_names
from deltaexit.streaming.manifest import Manifest, ManifestError
from deltaexit.streaming.states import check_collection, read_shard

__all__ = ["open_collection", "shard_exit_table", "shard_losses", "shard_windows"]


def open_collection(
    shards: str | os.PathLike[str] | Manifest, measure: str | ConfidenceMeasure, model: nn.Module | None = None
) -> tuple[Manifest, ConfidenceMeasure, Lens | None]:
    """The checked ``(manifest, measure, lens)`` of a collection: complete, with the lens top-k of every block,
    made with ``model`` (when given), holding what the (fitted) measure reads. Raises before any shard is read."""
    manifest = shards if isinstance(shards, Manifest) else Manifest.load(shards)
    measure = get_measure(measure) if isinstance(measure, str) else measure
    if getattr(measure, "requires_fit", False) and not getattr(measure, "is_fitted", True):
        raise ValueError(f"the measure {measure!r} must be fitted before it can score states; call .fit(...) first")
    lens = None if model is None else Lens.from_model(model)
    check_collection(manifest, label="next", model=model)  # lens top-k of every block; the model's fingerprint
    why = missing_input(measure, manifest, lens=lens)  # what it reads; a fitted measure's hidden size
    if why is not None:
        raise ManifestError(why)
    manifest.verify(quick=True)
    return manifest, measure, lens


def shard_windows(manifest: Manifest) -> torch.Tensor:
    """The non-empty window ids of a collection, ascending: example ``i`` is window ``shard_windows(m)[i]``."""
    return torch.nonzero(window_counts(manifest) > 0).reshape(-1)


def _names(manifest: Manifest) -> list[str]:
    wanted = ("h_in", "h_out", "delta", "lens_topk")
    return [*META_FIELDS, *stored_names([f for f in wanted if f in manifest.features])]


def _shard_tables(
    manifest: Manifest, measure: ConfidenceMeasure, lens: Lens | None, windows: torch.Tensor
) -> Iterator[tuple[ExitTable, torch.Tensor]]:
    """Per shard holding some of ``windows``: its exit table (examples renumbered), their positions in ``windows``."""
    size = manifest.window_id_end()
    position = torch.full((size,), -1, dtype=torch.int64)
    position[windows] = torch.arange(windows.numel())
    context = int(manifest.settings["context"])
    for path in manifest.shard_paths():
        t = read_shard(path, _names(manifest))
        pos = position[t["window"].long()]
        keep = pos >= 0
        if not bool(keep.any()):
            continue
        order = torch.argsort(pos[keep] * (1 << 32) + t["doc_position"][keep].long(), stable=True)
        part = {k: v[keep][order] for k, v in t.items()}
        yield _table(part, pos[keep][order], manifest, measure, lens, context)


def _table(
    part: dict[str, torch.Tensor], pos: torch.Tensor, manifest: Manifest, measure: ConfidenceMeasure,
    lens: Lens | None, context: int,
) -> tuple[ExitTable, torch.Tensor]:  # fmt: skip
    """The exit table of one shard's tokens (sorted by example, then position) and the examples' global positions."""
    examples, example = torch.unique_consecutive(pos, return_inverse=True)
    states = BatchStates(part, manifest, lens, use_topk=lens is None)
    num_layers = manifest.num_layers
    n = int(pos.numel())
    scores = torch.full((num_layers, n), math.inf, dtype=torch.float32)
    with torch.no_grad():
        for layer in range(num_layers - 1):
            scores[layer] = measure.score(states.state(layer, measure)).float()
    doc_pos = part["doc_position"].long()
    same = torch.zeros(n, dtype=torch.bool)
    same[:-1] = (pos[1:] == pos[:-1]) & (doc_pos[1:] == doc_pos[:-1] + 1)
    reference = torch.full((n,), -1, dtype=torch.long)
    reference[:-1] = torch.where(same[:-1], part["token_id"][1:].long(), -1)
    table = ExitTable(
        scores=scores, top1=part["topk_ids"][:, :, 0].T.long().contiguous(), example=example,
        step=doc_pos % context, reference=reference, num_examples=int(examples.numel()),
        measure=getattr(measure, "name", ""), full_depth_steps=0,
    )  # fmt: skip
    return table, examples


def shard_exit_table(
    shards: str | os.PathLike[str] | Manifest,
    measure: str | ConfidenceMeasure,
    *,
    model: nn.Module | None = None,
    windows: Sequence[int] | torch.Tensor | None = None,
) -> ExitTable:
    """The :class:`~deltaexit.calibration.ExitTable` of a collection's windows (default: all), one example each.

    Args:
        shards: A complete collection (directory or manifest) with ``lens_topk`` over every block.
        measure: Registered name or a fitted measure; what it reads must be collected (or derivable).
        model: The model the collection was made with (checked); measures then read the lens as
            :func:`~deltaexit.calibration.exit_table` does (needed for lens measures beyond the stored top-k).
        windows: Window ids to include, in example order (default :func:`shard_windows`).
    """
    manifest, measure, lens = open_collection(shards, measure, model)
    ids = shard_windows(manifest) if windows is None else torch.as_tensor(windows, dtype=torch.long)
    parts = list(_shard_tables(manifest, measure, lens, ids))
    if not parts:
        raise ValueError("none of the requested windows holds a token")
    covered = torch.cat([examples for _, examples in parts])
    if covered.unique().numel() != covered.numel():
        raise ManifestError(f"a window of {str(manifest.root)!r} spans two shards; re-collect with this version")
    tables = [table for table, _ in parts]
    return ExitTable(
        scores=torch.cat([t.scores for t in tables], dim=1), top1=torch.cat([t.top1 for t in tables], dim=1),
        example=torch.cat([examples[t.example] for t, examples in parts]), step=torch.cat([t.step for t in tables]),
        reference=torch.cat([t.reference for t in tables if t.reference is not None]),
        num_examples=int(ids.numel()), measure=tables[0].measure, full_depth_steps=0,
    )  # fmt: skip


def shard_losses(
    shards: str | os.PathLike[str] | Manifest,
    measure: str | ConfidenceMeasure,
    thresholds: Sequence[Any],
    *,
    loss: str = "textual",
    min_exit_layer: int = 1,
    model: nn.Module | None = None,
    windows: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """``[len(thresholds), examples]`` float64 losses of every threshold object on every window, in one pass.

    Equal to ``shard_exit_table(...).losses(threshold, loss)`` row by row, without holding the table.
    """
    manifest, measure, lens = open_collection(shards, measure, model)
    ids = shard_windows(manifest) if windows is None else torch.as_tensor(windows, dtype=torch.long)
    out = torch.full((len(thresholds), ids.numel()), math.nan, dtype=torch.float64)
    for table, examples in _shard_tables(manifest, measure, lens, ids):
        for row, threshold in enumerate(thresholds):
            out[row, examples] = table.losses(threshold, loss, min_exit_layer=min_exit_layer)
    missing = int(torch.isnan(out[0]).sum()) if len(thresholds) else 0
    if missing:
        raise ValueError(f"{missing} of the requested windows hold no token")
    return out
