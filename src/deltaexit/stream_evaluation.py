"""Evaluate exit measures on a streamed collection, batch by batch, with bounded memory.

The streamed counterpart of :func:`deltaexit.evaluation.evaluate_measures`: the same rows (one per
transition), the same figures and the same decision protocol, accumulated over batches of a
:class:`~deltaexit.streaming.ShardDataset` instead of read off tensors in memory. Scores go into
:class:`~deltaexit.histogram.ScoreHistogram` s (AUROC/AUPRC with a stated error bound, F1 at a threshold
chosen among bin edges on the selection split and exact at that threshold on the test split);
correlations into :class:`~deltaexit.histogram.RunningPearson`.

What a measure can read from a collection (:func:`missing_input`): ``h_out``, ``h_in`` and ``delta`` are
each either stored or derived from the other two (``h_out = h_in + delta``, ...); softmax-max and
softmax-gap over the full vocabulary read the stored lens top-k probabilities; every other lens measure
needs the model's lens (pass the model). A measure whose inputs were not collected is refused before any
work, naming the feature to add to ``--features``.

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
    >>> missing_input(get_measure("delta-norm"), manifest), missing_input(get_measure("state-cosine"), manifest)[:29]
    (None, 'state-cosine reads h_in: this')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from deltaexit.evaluation import score_carrying, summarize_transitions, trivial_f1
from deltaexit.histogram import RunningPearson, ScoreHistogram
from deltaexit.jsonable import json_clean
from deltaexit.measures.base import ConfidenceMeasure, LayerState
from deltaexit.measures.simple import SoftmaxGap, SoftmaxMax
from deltaexit.saturation import LABELS, saturation_from_topk
from deltaexit.streaming.dataset import read_shard
from deltaexit.streaming.manifest import Manifest, ManifestError
from deltaexit.streaming.writer import model_fingerprint

__all__ = [
    "BatchStates",
    "LabelEvaluator",
    "batch_labels",
    "check_collection",
    "check_measures",
    "check_model",
    "missing_input",
    "stored_features",
    "window_counts",
]

_VECTORS = ("h_in", "h_out", "delta")


def stored_features(manifest: Manifest) -> set[str]:
    """The feature names a collection holds (``lens_topk`` for the lens top-k)."""
    return set(manifest.features)


def _derivable(name: str, stored: set[str]) -> bool:
    """Whether vector ``name`` is stored or follows from the other two (``h_out = h_in + delta``, ...)."""
    return name in stored or all(other in stored for other in _VECTORS if other != name)


def _reads_topk_only(measure: ConfidenceMeasure, manifest: Manifest) -> bool:
    """softmax-max (k >= 1) and softmax-gap (k >= 2) over the full vocabulary score from the stored top-k."""
    k = int(manifest.settings.get("topk") or 0)
    if "lens_topk" not in manifest.features or measure.candidates is not None:
        return False
    return (isinstance(measure, SoftmaxMax) and k >= 1) or (isinstance(measure, SoftmaxGap) and k >= 2)


def _add_hint(manifest: Manifest, *names: str) -> str:
    features = list(dict.fromkeys([*manifest.features, *names]))
    return (
        f"collect again with --features {','.join(features)} (collect_to_disk(..., features={tuple(features)!r})) "
        "into a new directory"
    )


def missing_input(measure: ConfidenceMeasure, manifest: Manifest, *, lens: Any = None, name: str = "") -> str | None:
    """Why ``measure`` cannot be scored from this collection (naming the feature to add), or None if it can."""
    name = name or getattr(measure, "display_name", measure.name)
    stored = stored_features(manifest)
    where = f"this collection ({str(manifest.root)!r}) holds {sorted(stored)}"
    if measure.needs("lens") and _reads_topk_only(measure, manifest):
        return None
    for what in measure.inputs:
        if not _derivable(what, stored):
            others = " and ".join(o for o in _VECTORS if o != what)
            return f"{name} reads {what}: {where}, neither {what} nor {others}; {_add_hint(manifest, what)}"
    if measure.needs("lens") and lens is None:
        if not _derivable("h_out", stored):
            return f"{name} reads the lens of h_out: {where}; {_add_hint(manifest, 'h_out')}, and pass the model"
        return (
            f"{name} reads the lens (the model's final norm and head): pass the model the collection was made with "
            "(deltaexit analyze --shards DIR --model MODEL; model= in Python)"
        )
    if measure.needs("lens") and "h_in" in measure.inputs and not _derivable("h_in", stored):
        return f"{name} reads h_in: {where}; {_add_hint(manifest, 'h_in')}"
    return None


def check_measures(measures: Mapping[str, ConfidenceMeasure], manifest: Manifest, *, lens: Any = None) -> None:
    """Raise :class:`~deltaexit.streaming.ManifestError` naming the first measure whose inputs were not collected."""
    for name, measure in measures.items():
        why = missing_input(measure, manifest, lens=lens, name=name)
        if why is not None:
            raise ManifestError(why)


def window_counts(manifest: Manifest) -> torch.Tensor:
    """``[windows]`` int64 tokens per global window id (reads only the ``window`` metadata of each shard)."""
    size = max((stop for s in manifest.shards for _, stop in s["windows"]), default=0)
    counts = torch.zeros(size, dtype=torch.int64)
    for path in manifest.shard_paths():
        if not path.is_file():
            raise ManifestError(f"shard {str(path)!r} listed in the manifest is missing; re-collect it")
        window = read_shard(path, ["window"])["window"].long()
        counts.index_add_(0, window, torch.ones_like(window))
    return counts


def check_model(manifest: Manifest, model: nn.Module) -> None:
    """Raise :class:`ManifestError` when ``model`` is not the one the collection was made with."""
    recorded = manifest.settings["model"]
    config = getattr(model, "config", None)
    for key in ("hidden_size", "num_layers"):
        have = getattr(config, key, None) if key == "hidden_size" else getattr(config, "num_hidden_layers", None)
        if recorded.get(key) is not None and have is not None and int(have) != int(recorded[key]):
            raise ManifestError(
                f"the collection in {str(manifest.root)!r} was made with a model of {key} {recorded[key]}, this "
                f"model has {have}: pass the model it was collected with, or collect again with this one"
            )
    if model_fingerprint(model) != recorded["fingerprint"]:
        raise ManifestError(
            f"the collection in {str(manifest.root)!r} was made with another model (fingerprint "
            f"{recorded['fingerprint'][:12]}…, {recorded.get('name_or_path') or recorded.get('model_type')}); "
            f"this model's is {model_fingerprint(model)[:12]}…: pass the model it was collected with, or collect "
            "again with this one"
        )


def check_collection(manifest: Manifest) -> None:
    """Raise :class:`ManifestError` unless the collection holds the lens top-k of every block (the labels)."""
    if "lens_topk" not in manifest.features:
        raise ManifestError(
            f"the collection in {str(manifest.root)!r} has no lens top-k, which every label is made of: collect again "
            f"with --features {','.join([*manifest.features, 'lens_topk'])}"
        )
    if list(manifest.layers) != list(range(manifest.num_layers)):
        raise ManifestError(
            f"labels need every block; the collection in {str(manifest.root)!r} stored layers "
            f"{list(manifest.layers)} of {manifest.num_layers}: collect again with --layers all"
        )


def batch_labels(topk_ids: torch.Tensor, kind: str) -> torch.Tensor:
    """``[L-1, tokens]`` bool labels of a batch's ``[tokens, L, k]`` top-k ids (rows as ``StateSet.labels``)."""
    if kind not in LABELS:
        raise ValueError(f"label must be one of {list(LABELS)}, got {kind!r}")
    sat = saturation_from_topk(topk_ids.movedim(1, 0).long())
    return sat.stable if kind in ("next", "kept") else sat.saturated[:-1]


def decision_layers(kind: str, num_layers: int) -> list[int]:
    """Blocks scored for label ``kind``: ``0 .. L-2``, or ``1 .. L-1`` for ``kept``."""
    first = 1 if kind == "kept" else 0
    return list(range(first, first + num_layers - 1))


class BatchStates:
    """The per-block vectors of one batch of a collection, stored or derived, handed out as :class:`LayerState`.

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
        """``[tokens, hidden]`` float32 ``h_in``/``h_out``/``delta`` after block ``layer``, or None if not derivable."""
        key = (name, layer)
        if key not in self._cache:
            row, b = self.rows[layer], self.batch
            if name in b:
                value: torch.Tensor | None = b[name][:, row].float()
            elif name == "delta" and "h_in" in b and "h_out" in b:
                value = b["h_out"][:, row].float() - b["h_in"][:, row].float()
            elif name == "h_out" and "h_in" in b and "delta" in b:
                value = b["h_in"][:, row].float() + b["delta"][:, row].float()
            elif name == "h_in" and "h_out" in b and "delta" in b:
                value = b["h_out"][:, row].float() - b["delta"][:, row].float()
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
