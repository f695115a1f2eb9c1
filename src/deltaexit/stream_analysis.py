"""``dx.analyze_shards``: every table of :func:`deltaexit.analyze`, computed from a streamed collection.

The collection (:func:`deltaexit.collect_to_disk` / ``deltaexit collect``) is read shard by shard; nothing
grows with the number of tokens but the per-window split table (4 bytes a window) and the score
histograms (bounded by their resolution, see :mod:`deltaexit.histogram`).

Split protocol (the in-memory one, at window boundaries, by global window id = corpus order):

- **test**: the first windows holding at most ``tokens`` tokens (at least one window).
- **fit**: the windows after them, up to ``fit_tokens`` tokens (default: all the rest), cut as
  :meth:`deltaexit.StateSet.split_windows` cuts: ``train`` (the first ``1 - select_fraction`` of the fit
  windows; trainable measures fit there) and ``select`` (the rest; every F1 threshold is chosen there).

What is exact: token counts, positive rates, trivial F1, the oracle ceiling, per-layer ‖delta‖ and
saturation, Pearson's r, and F1/precision/recall at the chosen threshold. What is approximate: AUROC and
AUPRC (scores binned; each row reports its ``auroc_error_bound`` / ``auprc_error_bound``), and the threshold
itself, chosen among bin edges rather than among all distinct scores.

Example:
    >>> import tempfile
    >>> from deltaexit.streaming.writer import collect_to_disk
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=3, hidden=32, vocab=64)
    >>> out = tempfile.mkdtemp()
    >>> _ = collect_to_disk(model, [list(range(3, 63))] * 4, out, features="delta,delta_norm,lens_topk", topk=2,
    ...                     context=20, progress=False)
    >>> result = analyze_shards(out, tokens=60, measures=["delta-norm", "softmax-max"], model=model)
    >>> result["tokens"]["test"], sorted(result["labels"]["next"]["summary"])
    (60, ['delta-norm', 'softmax-max'])
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltaexit._version import __version__
from deltaexit.analysis import AnalyzeConfig, build_measures, with_candidates
from deltaexit.io import safe_name
from deltaexit.jsonable import json_clean
from deltaexit.lens import Lens
from deltaexit.measures.base import ConfidenceMeasure
from deltaexit.measures.cost import block_flops_per_token, measure_cost
from deltaexit.measures.stream_fit import DEFAULT_SHUFFLE_ROWS
from deltaexit.measures.trainable import TrainableMeasure
from deltaexit.saturation import READS_KEPT_REASON, reads_label, saturation_from_topk
from deltaexit.stream_evaluation import BatchStates, LabelEvaluator, batch_labels, missing_input, window_counts
from deltaexit.streaming.dataset import ShardDataset
from deltaexit.streaming.manifest import Manifest, ManifestError
from deltaexit.streaming.states import check_collection, decision_layers

__all__ = [
    "SELECT",
    "TEST",
    "TRAIN",
    "SplitBatches",
    "analyze_shards",
    "collection_dataset",
    "evaluate_collection",
    "split_codes",
]

#: Split codes of :func:`split_codes` (-1: not used).
TEST, TRAIN, SELECT = 0, 1, 2


def _fit_bounds(count: int, fractions: tuple[float, float]) -> list[int]:
    """Window bounds of :meth:`deltaexit.StateSet.split_windows` (every part gets >= 1 window)."""
    bounds, acc = [0], 0.0
    for i, f in enumerate(fractions[:-1]):
        acc += f
        bound = max(round(acc * count), bounds[-1] + 1)
        bounds.append(min(bound, count - (len(fractions) - 1 - i)))
    return [*bounds, count]


def split_codes(
    counts: torch.Tensor, tokens: int, fit_tokens: int | None = None, select_fraction: float = 0.2
) -> torch.Tensor:
    """``[windows]`` int8 split code per window id: :data:`TEST`, :data:`TRAIN`, :data:`SELECT` or -1 (unused).

    Example:
        >>> split_codes(torch.tensor([4, 4, 4, 4, 4, 4, 0, 4]), tokens=8).tolist()   # window 6 holds no token
        [0, 0, 1, 1, 1, 1, -1, 2]
    """
    ids = torch.nonzero(counts > 0).reshape(-1)
    cum = torch.cumsum(counts[ids], 0)
    n_test = max(1, int((cum <= tokens).sum()))
    rest = ids[n_test:]
    if fit_tokens is not None:
        rest = rest[: max(1, int((torch.cumsum(counts[rest], 0) <= fit_tokens).sum()))]
    if rest.numel() < 2:
        raise ValueError(
            f"the collection holds {ids.numel()} non-empty window(s); after {n_test} test window(s) "
            f"({int(cum[n_test - 1])} tokens) fewer than 2 are left to fit and select on: pass fewer test tokens "
            "(--tokens) or collect more"
        )
    codes = torch.full((counts.numel(),), -1, dtype=torch.int8)
    codes[ids[:n_test]] = TEST
    b = _fit_bounds(int(rest.numel()), (1.0 - select_fraction, select_fraction))
    codes[rest[b[0] : b[1]]] = TRAIN
    codes[rest[b[1] : b[2]]] = SELECT
    return codes


def _choose_measures(
    cfg: AnalyzeConfig, kind: str, manifest: Manifest, lens: Lens | None
) -> tuple[dict[str, ConfidenceMeasure], dict[str, str]]:
    """Unfitted measures of one label, and those left out (reads the label, or inputs not collected)."""
    names = with_candidates(cfg.measures, cfg.candidates)
    chosen = build_measures(names, label=kind, seed=cfg.seed, **(cfg.fit_kwargs or {}))
    left_out = {n: READS_KEPT_REASON for n, m in chosen.items() if reads_label(m, kind)}
    for name, measure in chosen.items():
        why = None if name in left_out else missing_input(measure, manifest, lens=lens, name=name)
        if why is not None and cfg.measures is not None:
            raise ManifestError(why)  # asked for by name: refuse before any work
        if why is not None:
            left_out[name] = why
    return {n: m for n, m in chosen.items() if n not in left_out}, left_out


class _Accumulators:
    """The label-free tables of the test tokens: oracle ceiling and per-layer ‖delta‖."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.n = 0
        self.sat_layer = 0.0
        self.saturated = torch.zeros(num_layers, dtype=torch.float64)
        self.exits = torch.zeros(num_layers, dtype=torch.float64)
        self.stable = torch.zeros(max(0, num_layers - 1), dtype=torch.float64)
        self.topk_layers: torch.Tensor | None = None
        self.norms = {key: torch.zeros(num_layers, dtype=torch.float64) for key in ("delta", "h_in", "ratio")}
        self.has = {"delta": True, "h_in": True}

    def add(self, states: BatchStates, topk_ids: torch.Tensor) -> None:
        sat = saturation_from_topk(topk_ids.movedim(1, 0).long())
        self.n += int(topk_ids.shape[0])
        self.sat_layer += float(sat.saturation_layer.double().sum())
        self.saturated += sat.saturated.double().sum(dim=1)
        self.exits += torch.stack(
            [(sat.saturation_layer == layer + 1).double().sum() for layer in range(self.num_layers)]
        )
        self.stable += sat.stable.double().sum(dim=1)
        if sat.topk_saturation_layer is not None:
            sums = sat.topk_saturation_layer.double().sum(dim=1)
            self.topk_layers = sums if self.topk_layers is None else self.topk_layers + sums
        for layer in range(self.num_layers):
            delta, h_in = states.norm("delta", layer), states.norm("h_in", layer)
            self.has["delta"] &= delta is not None
            self.has["h_in"] &= h_in is not None
            if delta is not None:
                self.norms["delta"][layer] += float(delta.sum())
            if h_in is not None:
                self.norms["h_in"][layer] += float(h_in.sum())
            if delta is not None and h_in is not None:
                self.norms["ratio"][layer] += float((delta / h_in.clamp_min(1e-12)).sum())

    def oracle(self) -> dict[str, Any]:
        """As :meth:`deltaexit.Saturation.summary`."""
        n, num_layers = self.n, self.num_layers
        mean_layer = self.sat_layer / n
        topk = None if self.topk_layers is None else (self.topk_layers / n).tolist()
        rows = []
        for layer in range(num_layers):
            row = {
                "layer": layer + 1,
                "saturated": float(self.saturated[layer]) / n,
                "exits_here": float(self.exits[layer]) / n,
            }
            if layer < num_layers - 1:
                row["change_rate"] = 1.0 - float(self.stable[layer]) / n
            rows.append(row)
        return {
            "num_layers": num_layers, "num_tokens": n, "oracle_mean_layer": mean_layer,
            "oracle_depth_fraction": mean_layer / num_layers, "oracle_compute_saved": 1.0 - mean_layer / num_layers,
            "per_layer": rows, "topk_mean_layers": topk,
        }  # fmt: skip

    def layers(self) -> list[dict[str, float | None]]:
        """As :func:`deltaexit.evaluation.layer_delta_stats` (None where the collection lacks the norm)."""
        n, d, h = self.n, self.has["delta"], self.has["h_in"]
        return [
            {
                "layer": layer + 1,
                "delta_norm": float(self.norms["delta"][layer]) / n if d else None,
                "h_in_norm": float(self.norms["h_in"][layer]) / n if h else None,
                "delta_ratio": float(self.norms["ratio"][layer]) / n if d and h else None,
            }
            for layer in range(self.num_layers)
        ]


def _subset(batch: Mapping[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[keep] for k, v in batch.items()}


def collection_dataset(manifest: Manifest, batch_size: int) -> ShardDataset:
    """A :class:`~deltaexit.streaming.ShardDataset` of every vector, norm and top-k tensor the collection holds."""
    names = ("h_in", "h_out", "delta", "h_in_norm", "delta_norm", "topk_ids", "topk_probs")
    stored = set(manifest.features) | ({"topk_ids", "topk_probs"} if "lens_topk" in manifest.features else set())
    return ShardDataset(manifest, features=[n for n in names if n in stored], batch_size=batch_size)


class SplitBatches:
    """The ``(states, labels)`` batches of one split's windows for one measure: what ``measure.fit`` reads out of
    core (a re-iterable, one pass per epoch; each batch one unit of the streamed fit).

    The held-out part is the in-memory fit's (:func:`deltaexit.measures.fit.fit_exit_net`): the last
    ``max(1, round(val_fraction * N))`` of the split's ``N`` tokens in corpus order. :meth:`held_out_batches`
    (which the streamed fit calls first) counts ``N`` in one pass and fixes that boundary; every later pass cuts
    the batch holding it in two, so the held-out batches hold exactly those tokens.

    Args:
        dataset: The collection's :class:`~deltaexit.streaming.ShardDataset` (with ``topk_ids``).
        codes: Split code per window id (:func:`split_codes`).
        code: The split (:data:`TRAIN`).
        measure: The measure the states are for (they hold what it reads).
        kind: The label kind.
        lens: The model's lens, for a measure that reads it.
    """

    def __init__(
        self, dataset: ShardDataset, codes: torch.Tensor, code: int, measure: ConfidenceMeasure, kind: str,
        lens: Lens | None = None,
    ) -> None:  # fmt: skip
        self.dataset, self.codes, self.code = dataset, codes, code
        self.measure, self.kind, self.lens = measure, kind, lens
        self.layers = decision_layers(kind, dataset.manifest.num_layers)
        self._cut: int | None = None  # split-token index where the held-out tail starts (held_out_batches)
        self._count = 0  # batches one pass yields with that cut

    def held_out_batches(self, val_fraction: float) -> list[int]:
        """Indices of the batches holding the last ``max(1, round(val_fraction * N))`` tokens; fixes the cut.

        Raises:
            ValueError: The split holds fewer than 2 tokens.
        """
        sizes = [int((self.codes[b["window"].long()] == self.code).sum()) for b in self.dataset]
        total = sum(sizes)
        if total < 2:
            raise ValueError(f"the fit split holds {total} token(s); it needs at least 2: collect more")
        cut = total - min(total - 1, max(1, round(val_fraction * total)))
        index, seen, held = 0, 0, []
        for size in (s for s in sizes if s):
            if seen < cut < seen + size:  # the boundary batch: its head trains, its tail is held out
                index += 1
            if seen + size > cut:
                held.append(index)
            index, seen = index + 1, seen + size
        self._cut, self._count = cut, index
        return held

    def __len__(self) -> int:
        if self._cut is None:
            return sum(1 for _ in self)
        return self._count

    def _pieces(self) -> Iterator[dict[str, torch.Tensor]]:
        seen = 0
        for batch in self.dataset:
            keep = self.codes[batch["window"].long()] == self.code
            if not bool(keep.any()):
                continue
            part = _subset(batch, keep)
            size = int(keep.sum())
            if self._cut is not None and seen < self._cut < seen + size:
                head = self._cut - seen
                yield {k: v[:head] for k, v in part.items()}
                yield {k: v[head:] for k, v in part.items()}
            else:
                yield part
            seen += size

    def __iter__(self) -> Iterator[tuple[list[Any], list[torch.Tensor]]]:
        for part in self._pieces():
            states = BatchStates(part, self.dataset.manifest, self.lens)
            labels = batch_labels(part["topk_ids"], self.kind)
            yield [states.state(layer, self.measure) for layer in self.layers], list(labels)


def _fit_trainable(
    measures: Mapping[str, ConfidenceMeasure], dataset: ShardDataset, codes: torch.Tensor, kind: str,
    lens: Lens | None, shuffle_rows: int, progress: bool,
) -> dict[str, float]:  # fmt: skip
    """Fit every trainable measure out of core on the train windows; seconds per measure."""
    from tqdm.auto import tqdm

    seconds: dict[str, float] = {}
    todo = [(n, m) for n, m in measures.items() if isinstance(m, TrainableMeasure)]
    for name, measure in tqdm(todo, desc=f"fit ({kind})", disable=not progress, unit="measure"):
        start = time.perf_counter()
        measure.fit(SplitBatches(dataset, codes, TRAIN, measure, kind, lens), shuffle_rows=shuffle_rows)
        seconds[name] = time.perf_counter() - start
    return seconds


def evaluate_collection(
    evaluators: Mapping[str, LabelEvaluator],
    dataset: ShardDataset,
    codes: torch.Tensor,
    lens: Lens | None = None,
    progress: bool = False,
) -> _Accumulators:
    """One pass over the collection: every label's select and test scores, and the test tokens' tables.

    Args:
        evaluators: One :class:`~deltaexit.stream_evaluation.LabelEvaluator` per label (filled in place).
        dataset: The collection's :class:`~deltaexit.streaming.ShardDataset` (with ``topk_ids`` and the vectors).
        codes: Split code per window id (:func:`split_codes`).
        lens: The model's lens, for measures that read it.
        progress: A tqdm bar over the tokens.

    Returns:
        The oracle and per-layer tables of the test tokens (``.oracle()``, ``.layers()``).
    """
    from tqdm.auto import tqdm

    manifest = dataset.manifest
    tables = _Accumulators(manifest.num_layers)
    bar = tqdm(total=manifest.num_tokens, desc="evaluate", unit="tok", disable=not progress)
    for batch in dataset:
        window = codes[batch["window"].long()]
        bar.update(int(window.numel()))
        for split, code in (("test", TEST), ("select", SELECT)):
            keep = window == code
            if not bool(keep.any()):
                continue
            part = _subset(batch, keep)
            states = BatchStates(part, manifest, lens)
            with torch.no_grad():
                for evaluator in evaluators.values():
                    evaluator.add(states, part["topk_ids"], split)
            if code == TEST:
                tables.add(states, part["topk_ids"])
    bar.close()
    return tables


def analyze_shards(
    shards: str | os.PathLike[str] | Manifest,
    config: AnalyzeConfig | None = None,
    *,
    model: nn.Module | None = None,
    mantissa_bits: int = 8,
    batch_size: int = 8192,
    shuffle_rows: int = DEFAULT_SHUFFLE_ROWS,
    verify: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Fit and evaluate every measure on a streamed collection; the dict of :func:`deltaexit.analyze`.

    Args:
        shards: The output directory of ``collect_to_disk`` / ``deltaexit collect`` (complete), or its manifest.
        config: The settings (:class:`~deltaexit.analysis.AnalyzeConfig`; ``window`` and ``batch_size`` are
            the collection's own and are not used).
        model: The model the collection was made with (checked by fingerprint): needed for measures that read
            the lens beyond the stored top-k, and for the cost table (None without it).
        mantissa_bits: Resolution of the score histograms (see :mod:`deltaexit.histogram`).
        batch_size: Tokens per batch read.
        shuffle_rows: Shuffle-buffer rows of the streamed fit (``(token, layer)`` pairs; it bounds the fit's memory).
        verify: Check every shard's sha256 before any work (reads the whole collection once more); without it
            each shard's size is checked, and a shard whose bytes do not parse is named when it is read.
        **overrides: Any :class:`~deltaexit.analysis.AnalyzeConfig` field by name.

    Raises:
        FileNotFoundError: No collection there, or it did not finish (the message says to resume it).
        ManifestError: Another model, a missing feature (named, with the ``--features`` to collect), a corrupt
            shard (named), too few windows — all before any fitting, except a shard corrupted in a way only
            reading it shows, which is named when met.
    """
    cfg = AnalyzeConfig.build(config, **overrides)
    if not 0 <= mantissa_bits <= 23:
        raise ValueError(f"mantissa_bits (--histogram-bits) must lie in [0, 23], got {mantissa_bits}")
    manifest = shards if isinstance(shards, Manifest) else Manifest.load(shards)
    check_collection(manifest, label=cfg.labels[0], model=model)  # the labels' lens top-k, the model's fingerprint
    lens = None if model is None else Lens.from_model(model)
    chosen = {kind: _choose_measures(cfg, kind, manifest, lens) for kind in cfg.labels}
    manifest.verify(quick=not verify)
    timing: dict[str, Any] = {}
    start = time.perf_counter()
    counts = window_counts(manifest)
    codes = split_codes(counts, cfg.tokens, cfg.fit_tokens, cfg.select_fraction)
    test, train, select = (int(counts[codes == code].sum()) for code in (TEST, TRAIN, SELECT))
    tokens = {"test": test, "fit": train + select, "train": train, "select": select}
    timing["split_s"] = time.perf_counter() - start
    dataset = collection_dataset(manifest, batch_size)
    # The streamed fit holds out the in-memory fit's tail tokens (SplitBatches.held_out_batches cuts the batch).
    fit_data = dataset
    timing["fit_s"], saved = {}, {}
    for kind, (measures, _) in chosen.items():
        timing["fit_s"][kind] = _fit_trainable(measures, fit_data, codes, kind, lens, shuffle_rows, cfg.progress)
        if cfg.save_measures is not None:
            saved[kind] = {
                n: str(m.save(Path(cfg.save_measures) / kind / safe_name(n)))
                for n, m in measures.items()
                if isinstance(m, TrainableMeasure)
            }
    evaluators = {
        kind: LabelEvaluator(measures, kind, manifest.num_layers, mantissa_bits=mantissa_bits)
        for kind, (measures, _) in chosen.items()
    }
    start = time.perf_counter()
    tables = evaluate_collection(evaluators, dataset, codes, lens, cfg.progress)
    timing["evaluate_s"] = time.perf_counter() - start
    labels = {}
    for kind, evaluator in evaluators.items():
        labels[kind] = {**evaluator.result(), "left_out": chosen[kind][1], "_measures": chosen[kind][0]}
        if saved.get(kind):
            labels[kind]["saved_measures"] = saved[kind]
        labels[kind]["fitted"] = {
            n: {"best_epoch": m.best_epoch_, "epochs_run": len(m.history_) - 1}
            for n, m in chosen[kind][0].items()
            if isinstance(m, TrainableMeasure)
        }
    return json_clean(_report(manifest, cfg, tokens, tables, labels, model, mantissa_bits, timing))


def _report(
    manifest: Manifest, cfg: AnalyzeConfig, tokens: dict[str, int], tables: _Accumulators, labels: dict[str, Any],
    model: nn.Module | None, mantissa_bits: int, timing: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    recorded = manifest.settings["model"]
    context = int(manifest.settings["context"])
    every = {n: m for ev in labels.values() for n, m in ev.pop("_measures").items()}
    cost = None
    if model is not None:
        cost = {
            "context": context,
            "block_flops_per_token": block_flops_per_token(model, context=context),
            "measures": {n: measure_cost(m, model, context=context) for n, m in every.items()},
        }
    return {
        "deltaexit_version": __version__,
        "config": {
            "model_type": recorded.get("model_type"),
            "hidden_size": recorded.get("hidden_size"),
            "num_layers": manifest.num_layers,
            "vocab_size": recorded.get("vocab_size"),
            "window": context,
            "seed": cfg.seed,
            "select_fraction": cfg.select_fraction,
            "fit_source": "shards after the test windows",
            "shards": str(manifest.root),
            "histogram_mantissa_bits": mantissa_bits,
        },
        "tokens": tokens,
        "layers": tables.layers(),
        "oracle": tables.oracle(),
        "cost": cost,
        "labels": labels,
        "timing": timing,
    }
