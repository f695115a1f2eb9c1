"""Evaluate exit measures on a streamed collection, batch by batch, with bounded memory.

The streamed counterpart of :func:`deltaexit.evaluation.evaluate_measures`: the same rows (one per
transition), the same figures and the same decision protocol, accumulated over batches of a
:class:`~deltaexit.streaming.ShardDataset` instead of read off tensors in memory. Scores go into
:class:`~deltaexit.histogram.ScoreHistogram` s (AUROC/AUPRC with a stated error bound, F1 at a threshold
chosen among bin edges on the selection split and exact at that threshold on the test split);
correlations into :class:`~deltaexit.histogram.RunningPearson`.

What a measure can read from a collection (:func:`missing_input`, by
:func:`deltaexit.streaming.states.check_collection`): what it declares it reads was stored (``delta`` also
from ``h_in`` and ``h_out``); softmax-max and softmax-gap over the full vocabulary read the stored lens top-k
probabilities; every other lens measure needs the model's lens (pass the model). A measure whose inputs were
not collected is refused before any work, naming the feature to add to ``--features``.

Example:
    >>> import tempfile
    >>> from deltaexit.measures import get_measure
    >>> from deltaexit.streaming.writer import collect_to_disk
    >>> from deltaexit.streaming.manifest import Manifest
    >>> from deltaexit.testing import tiny_model
    >>> out = tempfile.mkdtemp()
    >>> _ = collect_to_disk(tiny_model("llama", num_layers=3, hidden=32, vocab=64), [list(range(3, 60))], out,
    ...                     features="delta,lens_topk", topk=2, context=16, progress=False)
    >>> manifest = Manifest.load(out)
    >>> missing_input(get_measure("delta-norm"), manifest), missing_input(get_measure("state-cosine"), manifest)[:40]
    (None, "state-cosine reads ['h_in', 'h_out'], wh")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from deltaexit.evaluation import score_carrying, summarize_transitions, trivial_f1
from deltaexit.histogram import RunningPearson, ScoreHistogram
from deltaexit.jsonable import json_clean
from deltaexit.measures.base import ConfidenceMeasure, LayerState
from deltaexit.streaming.manifest import Manifest, ManifestError
from deltaexit.streaming.states import (
    check_collection,
    decision_labels,
    decision_layers,
    labels_from_topk,
    read_shard,
)

__all__ = [
    "BatchStates",
    "LabelEvaluator",
    "batch_labels",
    "check_measures",
    "missing_input",
    "window_counts",
]

_VECTORS = ("h_in", "h_out", "delta")


def missing_input(measure: ConfidenceMeasure, manifest: Manifest, *, lens: Any = None, name: str = "") -> str | None:
    """Why ``measure`` cannot be scored from this collection (naming the feature to add), or None if it can.

    The checks are :func:`deltaexit.streaming.states.check_collection`'s (inputs collected, the lens given to a
    measure that reads it beyond the stored top-k, a fitted measure's hidden size).
    """
    try:
        check_collection(manifest, measure, lens=lens)
    except ManifestError as exc:
        why = str(exc)
        if measure.needs("lens") and lens is None and "reads the lens" in why:
            why += " (deltaexit analyze --shards DIR --model MODEL; model= in Python)"
        shown = name or getattr(measure, "display_name", measure.name)
        return why if why.startswith(shown) else f"{shown}: {why}"
    return None


def check_measures(measures: Mapping[str, ConfidenceMeasure], manifest: Manifest, *, lens: Any = None) -> None:
    """Raise :class:`~deltaexit.streaming.ManifestError` naming the first measure whose inputs were not collected."""
    for name, measure in measures.items():
        why = missing_input(measure, manifest, lens=lens, name=name)
        if why is not None:
            raise ManifestError(why)


def window_counts(manifest: Manifest) -> torch.Tensor:
    """``[windows]`` int64 tokens per global window id (reads only the ``window`` metadata of each shard)."""
    size = manifest.window_id_end()
    counts = torch.zeros(size, dtype=torch.int64)
    for path in manifest.shard_paths():
        if not path.is_file():
            raise ManifestError(f"shard {str(path)!r} listed in the manifest is missing; re-collect it")
        window = read_shard(path, ["window"])["window"].long()
        counts.index_add_(0, window, torch.ones_like(window))
    return counts


def batch_labels(topk_ids: torch.Tensor, kind: str) -> torch.Tensor:
    """``[L-1, tokens]`` bool labels of a batch's ``[tokens, L, k]`` top-k ids (rows as ``StateSet.labels``)."""
    return torch.stack(decision_labels(labels_from_topk(topk_ids, (kind,)), kind))


class BatchStates:
    """The per-block vectors of one batch of a collection, handed out as one :class:`LayerState` per measure.

    Unlike :func:`deltaexit.streaming.states.layer_states` (every stored vector in one state per block), each
    state holds what one measure reads, as :meth:`deltaexit.StateSet.state` gives it, and the vectors are
    converted once per batch and shared; measures with different candidate sets get different states.

    Args:
        batch: A batch of :class:`~deltaexit.streaming.ShardDataset` (token-major ``[tokens, layers, ...]``).
        manifest: Its collection's manifest (which blocks the rows are).
        lens: The model's lens, for measures that read it.
        use_topk: Hand the stored lens top-k probabilities to lens measures (softmax-max/-gap read them instead
            of calling the lens); False makes them call the lens, as :func:`~deltaexit.calibration.exit_table` does.
    """

    def __init__(
        self, batch: Mapping[str, torch.Tensor], manifest: Manifest, lens: Any = None, *, use_topk: bool = True
    ) -> None:
        self.batch = batch
        self.rows = {layer: row for row, layer in enumerate(manifest.layers)}
        self.num_layers = manifest.num_layers
        self.hidden = int(manifest.settings["model"].get("hidden_size") or 0)
        self.lens = lens
        self.use_topk = use_topk
        self.num_tokens = int(batch["token_id"].shape[0])
        self._cache: dict[tuple[str, int], torch.Tensor | None] = {}

    def vector(self, name: str, layer: int) -> torch.Tensor | None:
        """``[tokens, hidden]`` float32 ``h_in``/``h_out``/``delta`` after block ``layer`` (``delta`` also from the
        stored ``h_in`` and ``h_out``), or None if not collected."""
        key = (name, layer)
        if key not in self._cache:
            row, b = self.rows[layer], self.batch
            if name in b:
                value: torch.Tensor | None = b[name][:, row].float()
            elif name == "delta" and "h_in" in b and "h_out" in b:
                value = b["h_out"][:, row].float() - b["h_in"][:, row].float()
            else:
                value = None
            self._cache[key] = value
        return self._cache[key]

    def norm(self, name: str, layer: int) -> torch.Tensor | None:
        """``[tokens]`` ‖``name``‖ after block ``layer`` (the stored ``*_norm`` feature first), or None."""
        stored = self.batch.get(f"{name}_norm")
        if stored is not None:
            return stored[:, self.rows[layer]].double()
        vec = self.vector(name, layer)
        return None if vec is None else vec.norm(dim=-1).double()

    def state(self, layer: int, measure: ConfidenceMeasure) -> LayerState:
        """The state after block ``layer`` holding what ``measure`` reads (as :meth:`deltaexit.StateSet.state`).

        ``h_out`` that is not collected (a delta-only collection) is a NaN placeholder of the right shape that
        costs no memory: a measure that read it anyway would give NaN scores, which evaluation refuses.
        """
        h_out = self.vector("h_out", layer)
        if h_out is None:
            h_out = torch.full((), math.nan).expand(self.num_tokens, self.hidden)
        reads_lens = measure.needs("lens")
        topk = self.batch.get("topk_probs") if self.use_topk else None
        return LayerState(
            layer=layer, h_out=h_out, h_in=self.vector("h_in", layer) if measure.needs("h_in") else None,
            num_layers=self.num_layers, lens=self.lens if reads_lens else None,
            topk_probs=topk[:, self.rows[layer]].float() if reads_lens and topk is not None else None,
            delta=self.vector("delta", layer) if "delta" in measure.inputs else None,
        )  # fmt: skip


class LabelEvaluator:
    """Accumulates one label's evaluation (the rows of :func:`deltaexit.evaluation.evaluate_measures`).

    Args:
        measures: Fitted measures by display name.
        label: ``"next"``, ``"final"`` or ``"kept"``.
        num_layers: Blocks of the model.
        mantissa_bits: Resolution of the score histograms (see :mod:`deltaexit.histogram`).
    """

    def __init__(
        self, measures: Mapping[str, ConfidenceMeasure], label: str, num_layers: int, *, mantissa_bits: int = 8
    ) -> None:
        self.measures = dict(measures)
        self.label = label
        self.layers = decision_layers(label, num_layers)
        self.hists = {
            split: [{name: ScoreHistogram(mantissa_bits) for name in self.measures} for _ in self.layers]
            for split in ("select", "test")
        }
        self.positives = [0] * len(self.layers)
        self.tokens = 0
        self.r_delta = [RunningPearson() for _ in self.layers]
        self.r_next = [RunningPearson() for _ in self.layers]

    def add(self, states: BatchStates, topk_ids: torch.Tensor, split: str) -> None:
        """Score one batch of ``split`` tokens (``"select"`` or ``"test"``); ``topk_ids`` ``[tokens, L, k]``."""
        labels = batch_labels(topk_ids, self.label)
        first_ids: dict[tuple[str, int], torch.Tensor] = {}  # candidate ids picked at the first decision layer, per K
        for i, block in enumerate(self.layers):
            y = labels[i]
            shared: dict[tuple[bool, bool, int | None], LayerState] = {}
            for name, measure in self.measures.items():
                key = (measure.needs("h_in"), measure.needs("lens"), measure.candidates)
                state = shared.setdefault(key, states.state(block, measure))
                self.hists[split][i][name].add(score_carrying(measure, state, first_ids, "batch"), y)
            if split == "test":
                self._add_test_row(states, i, block, y)

    def _add_test_row(self, states: BatchStates, i: int, block: int, y: torch.Tensor) -> None:
        self.positives[i] += int(y.sum())
        if i == 0:
            self.tokens += int(y.numel())
        change = (~y).double()
        for acc, layer in ((self.r_delta[i], block), (self.r_next[i], i + 1)):
            norm = states.norm("delta", layer)
            if norm is not None:
                acc.add(norm, change)

    def result(self) -> dict[str, Any]:
        """``{"label", "transitions", "summary"}`` as :func:`~deltaexit.evaluation.evaluate_measures` gives, plus
        ``auroc_error_bound`` / ``auprc_error_bound`` per measure and row."""
        if self.tokens == 0:
            raise ValueError("no test tokens were scored")
        transitions = []
        for i, block in enumerate(self.layers):
            rate = self.positives[i] / self.tokens
            row: dict[str, Any] = {
                "layer": block + 1, "transition": f"{i + 1}→{i + 2}", "positive_rate": rate,
                "change_rate": 1.0 - rate, "trivial_f1": trivial_f1(rate),
                "r_delta_change": _r_or_none(self.r_delta[i]), "r_next_delta_change": _r_or_none(self.r_next[i]),
                "measures": {},
            }  # fmt: skip
            for name in self.measures:
                row["measures"][name] = _scores_result(self.hists["select"][i][name], self.hists["test"][i][name])
            transitions.append(row)
        summary = {name: _summary([t["measures"][name] for t in transitions]) for name in self.measures}
        return json_clean({"label": self.label, "transitions": transitions, "summary": summary})


def _r_or_none(acc: RunningPearson) -> float | None:
    return acc.value() if acc.n else None


def _scores_result(select: ScoreHistogram, test: ScoreHistogram) -> dict[str, float]:
    """:func:`deltaexit.evaluation.evaluate_scores` from histograms, with the AUROC/AUPRC error bounds."""
    if select.num_positive + select.num_negative == 0:
        raise ValueError("no selection tokens were scored")
    threshold, select_f1 = select.best_f1_threshold()
    out: dict[str, float] = {"threshold": threshold, **test.binary_metrics(threshold)}
    total = test.num_positive + test.num_negative
    out["trivial_f1"] = trivial_f1(test.num_positive / total)
    out["f1_gain"] = out["f1"] - out["trivial_f1"]
    out["auroc"] = test.auroc()
    out["auprc"] = test.auprc()
    out["selection_f1"] = select_f1
    out["auroc_error_bound"] = test.auroc_bound()
    out["auprc_error_bound"] = test.auprc_bound()
    return out


def _summary(per: Sequence[dict[str, float]]) -> dict[str, float]:
    """:func:`~deltaexit.evaluation.summarize_transitions`, plus the largest AUROC error bound of the rows."""
    bounds = [m["auroc_error_bound"] for m in per if not math.isnan(m["auroc_error_bound"])]
    return {**summarize_transitions(list(per)), "max_auroc_error_bound": max(bounds) if bounds else math.nan}
