"""Read a streamed collection lazily: a ``torch.utils.data.IterableDataset`` over its shards.

Only one shard (plus one batch) is in memory at a time, so training and analysis
can run over corpora larger than memory. ``labels="next"`` / ``"final"`` / ``"kept"`` are made
from the stored lens top-1 per layer (collect with ``lens_topk`` over all layers);
``measure.fit(ShardDataset(...))`` trains a trainable measure out of core.

Example:
    >>> import tempfile
    >>> from deltaexit.streaming import collect_to_disk
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=64)
    >>> out = tempfile.mkdtemp()
    >>> _ = collect_to_disk(model, [list(range(3, 40))], out, features="delta,lens_topk", topk=2,
    ...                     context=16, progress=False)
    >>> ds = ShardDataset(out, features=("delta",), labels="final", batch_size=16)
    >>> for batch in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0):
    ...     print(tuple(batch["delta"].shape), tuple(batch["label_final"].shape))   # [tokens, L, H], [tokens, L]
    (16, 2, 32) (16, 2)
    (16, 2, 32) (16, 2)
    (5, 2, 32) (5, 2)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from deltaexit.measures.base import ConfidenceMeasure
from deltaexit.saturation import LABELS
from deltaexit.streaming.distributed import distributed_rank
from deltaexit.streaming.features import stored_names
from deltaexit.streaming.fit import ShardFitSource
from deltaexit.streaming.manifest import Manifest, ManifestError
from deltaexit.streaming.states import (
    check_collection,
    labels_from_topk,
    layer_labels,
    layer_states,
    measure_features,
    read_shard,
    reads_stored_topk,
)

__all__ = [
    "LABELS",
    "META_FIELDS",
    "ShardDataset",
    "iter_batches",
    "layer_labels",
    "layer_states",
    "load_features",
    "read_shard",
]

#: Per-token metadata every shard holds: input id, global window id, document id, position in the document.
META_FIELDS: tuple[str, ...] = ("token_id", "window", "doc", "doc_position")


class ShardDataset(IterableDataset):
    """Per-token features (and labels) of a streamed collection, read shard by shard.

    Args:
        source: The output directory of :func:`~deltaexit.streaming.writer.collect_to_disk`
            or its :class:`~deltaexit.streaming.manifest.Manifest` (an unfinished collection is refused).
        features: Stored tensor names to yield (default: what ``measure`` reads, else all stored features);
            the metadata fields :data:`META_FIELDS` are always yielded.
        labels: ``"next"``, ``"final"``, ``"kept"`` or several (default: ``measure.label`` for a trainable
            measure); yields bool ``label_next`` ``[L-1]``, ``label_final`` ``[L]``, ``label_kept`` ``[L-1]``
            (column ``i``: block ``i+1`` left the top-1 unchanged); see
            :func:`~deltaexit.streaming.states.labels_from_topk`.
        batch_size: Yield dicts of ``batch_size`` tokens (the last batch may be smaller);
            None yields one token at a time.
        shuffle: Shuffle shard order and tokens within each shard (seeded by ``seed`` and the epoch).
        seed: Shuffle seed.
        split_ranks: Give each ``torch.distributed`` rank its own shards (data-parallel training).
        verify: Check every shard's sha256 against the manifest first.
        measure: A measure to serve: its inputs (and its label) must have been collected, and a fitted
            measure's hidden size must be the collection's (:class:`ManifestError` naming the feature to add
            to ``deltaexit collect --features`` otherwise).

    Shards are split across ``DataLoader`` workers, so use ``DataLoader(ds, batch_size=None)``
    with ``batch_size`` set here. ``measure.fit(ds)`` trains a trainable measure out of core
    (:meth:`fit_source`).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Manifest,
        *,
        features: Iterable[str] | None = None,
        labels: str | Iterable[str] | None = None,
        batch_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        split_ranks: bool = False,
        verify: bool = False,
        measure: ConfidenceMeasure | None = None,
    ) -> None:
        self.manifest = source if isinstance(source, Manifest) else Manifest.load(source)
        stored = stored_names(self.manifest.features)
        if labels is None and measure is not None and getattr(measure, "requires_fit", False):
            labels = getattr(measure, "label", None)
        kinds = () if labels is None else ((labels,) if isinstance(labels, str) else tuple(labels))
        bad = [k for k in kinds if k not in LABELS]
        if bad:
            raise ValueError(f"unknown label kind(s) {bad}; choose from {list(LABELS)}")
        if measure is not None:
            check_collection(self.manifest, measure)
            if features is None:
                features = (
                    ("topk_probs",)
                    if reads_stored_topk(measure, self.manifest)
                    else measure_features(measure, self.manifest.features)
                )
        self.features = tuple(stored if features is None else features)
        missing = [f for f in self.features if f not in stored and f not in META_FIELDS]
        if missing:
            raise ManifestError(
                f"feature(s) {missing} are not in this collection (it holds {list(stored)}); collect with "
                f"deltaexit collect --features {','.join(dict.fromkeys([*self.manifest.features, *missing]))}"
            )
        if kinds:
            check_collection(self.manifest, label=kinds[0])
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.labels = kinds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.split_ranks = split_ranks
        self.measure = measure
        self.epoch = 0
        if verify:
            self.manifest.verify()

    def fit_source(self, measure: ConfidenceMeasure, *, lens: Any = None, model: Any = None) -> ShardFitSource:
        """This collection as the data of ``measure.fit(self)``: its shards as units (checked before training).

        The fit splits the shards over the ``torch.distributed`` ranks itself (``split_ranks`` and DataLoader
        workers play no part) and reads its chunks in this dataset's ``batch_size`` tokens; ``shuffle`` and
        ``seed`` draw the shard order of each epoch.

        Args:
            measure: The trainable measure to fit (its label and inputs are read, whatever ``features`` and
                ``labels`` this dataset yields).
            lens: The model's lens, for a measure that reads the lens.
            model: The model the collection must come from (fingerprint and hidden size checked).
        """
        return ShardFitSource(self, measure, lens=lens, model=model)

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole collection (before any rank/worker split)."""
        return self.manifest.num_tokens

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle order for the next pass (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def _my_shards(self) -> list[Path]:
        paths = self.manifest.shard_paths()
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        if self.shuffle:
            paths = [paths[i] for i in torch.randperm(len(paths), generator=generator).tolist()]
        if self.split_ranks:
            rank, world = distributed_rank()
            paths = paths[rank::world]
        info = get_worker_info()
        if info is not None:
            paths = paths[info.id :: info.num_workers]
        return paths

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        names = list(dict.fromkeys([*META_FIELDS, *self.features]))
        if self.labels and "topk_ids" not in names:
            names.append("topk_ids")
        tensors = read_shard(path, names)
        if self.labels:
            tensors.update(labels_from_topk(tensors["topk_ids"], self.labels))
            if "topk_ids" not in self.features:
                del tensors["topk_ids"]
        return tensors

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: dict[str, torch.Tensor] | None = None
        shuffle_gen = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch + 1)
        self.manifest.verify(quick=True)  # a missing or resized shard fails before any batch is yielded
        for path in self._my_shards():
            tensors = self._read(path)
            n = int(tensors["token_id"].shape[0])
            if self.shuffle and n:
                order = torch.randperm(n, generator=shuffle_gen)
                tensors = {k: v[order] for k, v in tensors.items()}
            if self.batch_size is None:
                for i in range(n):
                    yield {k: v[i] for k, v in tensors.items()}
                continue
            if pending is not None:
                tensors = {k: torch.cat([pending[k], v]) for k, v in tensors.items()}
                n = int(tensors["token_id"].shape[0])
            full = n - n % self.batch_size
            for start in range(0, full, self.batch_size):
                yield {k: v[start : start + self.batch_size] for k, v in tensors.items()}
            pending = {k: v[full:] for k, v in tensors.items()} if full < n else None
        if pending is not None:
            yield pending


def iter_batches(
    source: str | os.PathLike[str] | Manifest, batch_size: int, **kwargs
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate ``batch_size``-token dicts over a collection (keywords as :class:`ShardDataset`)."""
    return iter(ShardDataset(source, batch_size=batch_size, **kwargs))


def load_features(
    source: str | os.PathLike[str] | Manifest, *, max_tokens: int | None = None, **kwargs
) -> dict[str, torch.Tensor]:
    """Materialise (the first ``max_tokens`` tokens of) a collection as one dict of tensors.

    Example:
        >>> import tempfile
        >>> from deltaexit.streaming import collect_to_disk
        >>> from deltaexit.testing import tiny_model
        >>> out = tempfile.mkdtemp()
        >>> _ = collect_to_disk(tiny_model("llama", num_layers=2, hidden=32, vocab=64), [list(range(3, 40))], out,
        ...                     features="delta,lens_topk", topk=2, context=16, progress=False)
        >>> data = load_features(out, features=("delta",), labels="next")
        >>> tuple(data["delta"].shape), tuple(data["label_next"].shape)   # next: one label per transition
        ((37, 2, 32), (37, 1))
    """
    parts: list[dict[str, torch.Tensor]] = []
    total = 0
    for batch in ShardDataset(source, batch_size=65_536, **kwargs):
        if max_tokens is not None:
            batch = {k: v[: max_tokens - total] for k, v in batch.items()}
        parts.append(batch)
        total += int(batch["token_id"].shape[0])
        if max_tokens is not None and total >= max_tokens:
            break
    if not parts:
        raise ManifestError("the collection holds no tokens")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
