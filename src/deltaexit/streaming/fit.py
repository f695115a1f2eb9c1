"""A streamed collection as the data of an out-of-core fit: :class:`ShardFitSource`, the shards as units.

``measure.fit(ShardDataset(...))`` builds one (through ``ShardDataset.fit_source``) and hands it to
:func:`deltaexit.measures.stream_fit.fit_exit_net_stream`. Everything knowable is checked when it is built,
before training: the measure's inputs and the labels were collected (the error names the feature and the
``deltaexit collect --features ...`` to run), the collection is complete with every shard of its recorded size,
the model or lens given is the collection's, there are at least two shards. Each shard is read whole, then cut
into chunks of the dataset's ``batch_size`` tokens whose :class:`~deltaexit.measures.LayerState` s the measure
turns into features; a shard that cannot be read mid-epoch raises :class:`~deltaexit.streaming.ManifestError`
naming it.

Units are the manifest's shards in corpus order; the held-out ones are the last
``max(1, round(val_fraction * shards))`` (the same on every rank); with ``ShardDataset(shuffle=True)`` each epoch
reads the training shards in an order drawn from ``(seed, epoch)``.

Example:
    >>> import tempfile
    >>> from deltaexit.measures import get_measure
    >>> from deltaexit.streaming import ShardDataset, collect_to_disk
    >>> from deltaexit.testing import tiny_model
    >>> out = tempfile.mkdtemp()
    >>> _ = collect_to_disk(tiny_model("llama", num_layers=3, hidden=16, vocab=64), [list(range(3, 60))], out,
    ...                     features="delta,lens_topk", topk=2, context=8, batch_size=1, shard_tokens=16,
    ...                     progress=False)
    >>> source = ShardFitSource(ShardDataset(out, batch_size=8), get_measure("linear", label="kept"))
    >>> source.layers, source.split(0.25)
    ((1, 2), ([0, 1, 2], [3]))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from deltaexit.measures.base import ConfidenceMeasure
from deltaexit.measures.stream_fit import Chunk, held_out_units
from deltaexit.streaming.manifest import Manifest
from deltaexit.streaming.states import (
    check_collection,
    decision_labels,
    decision_layers,
    labels_from_topk,
    layer_states,
    measure_features,
    read_shard,
)

__all__ = ["ShardFitSource"]


class ShardFitSource:
    """The shards of a collection as the units of a streamed fit (a :class:`~deltaexit.measures.stream_fit.FitSource`).

    Args:
        dataset: A :class:`~deltaexit.streaming.ShardDataset` (its manifest, ``batch_size``, ``shuffle`` and
            ``seed`` are used; the features and labels read are the measure's).
        measure: The trainable measure to fit (its ``inputs``, ``label`` and ``fit_features``).
        lens: The model's lens, for a measure that reads the lens.
        model: The model the collection must come from (checked), or None.
    """

    distributed = True

    def __init__(self, dataset: Any, measure: ConfidenceMeasure, *, lens: Any = None, model: Any = None) -> None:
        self.manifest: Manifest = dataset.manifest
        self.measure = measure
        self.lens = lens
        self.label: str = getattr(measure, "label", "next")
        check_collection(self.manifest, measure, label=self.label, model=model, lens=lens)
        self.manifest.verify(quick=True)
        self.batch_size = int(dataset.batch_size or 65_536)
        self.shuffle, self.seed = bool(dataset.shuffle), int(dataset.seed)
        self.names = [*measure_features(measure, self.manifest.features), "topk_ids"]
        self.layers = tuple(decision_layers(self.label, self.manifest.num_layers))
        hidden = self.manifest.settings.get("model", {}).get("hidden_size")
        self.hidden_size = int(hidden) if hidden is not None else self._read_hidden()
        self.paths = self.manifest.shard_paths()

    def _read_hidden(self) -> int:
        vectors = [n for n in self.names if n in ("h_in", "h_out", "delta")]
        tensors = read_shard(self.manifest.shard_paths()[0], vectors[:1])
        return int(tensors[vectors[0]].shape[-1])

    def split(self, val_fraction: float) -> tuple[list[int], list[int]]:
        """Training shards and the held-out tail of shards (manifest order)."""
        return held_out_units(len(self.manifest.shards), val_fraction, "shards")

    def epoch_units(self, units: Sequence[int], epoch: int) -> list[int]:
        """``units`` in manifest order, or in an order drawn from ``(seed, epoch)`` with ``shuffle=True``."""
        units = list(units)
        if not self.shuffle:
            return units
        generator = torch.Generator().manual_seed(self.seed * 10_007 + epoch)
        return [units[i] for i in torch.randperm(len(units), generator=generator).tolist()]

    def chunks(self, units: Sequence[int]) -> Iterator[Chunk]:
        """Read ``units`` (shard indices) in order, in chunks of ``batch_size`` tokens."""
        features = getattr(self.measure, "fit_features", None)
        if features is None:
            raise TypeError(f"{self.measure.name} is not trainable")
        for unit in units:
            path = self.paths[unit]
            tensors = read_shard(path, self.names)
            tensors.update(labels_from_topk(tensors.pop("topk_ids"), (self.label,)))
            n = int(tensors[f"label_{self.label}"].shape[0])
            for start in range(0, n, self.batch_size):
                batch = {k: v[start : start + self.batch_size] for k, v in tensors.items()}
                states = layer_states(batch, self.manifest, lens=self.lens, layers=self.layers)
                with torch.no_grad():
                    xs = features(states)
                yield Chunk(xs, decision_labels(batch, self.label), f"shard {path.name!r}")
