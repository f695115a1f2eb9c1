"""Honest evaluation of exit measures: thresholds chosen on tokens disjoint from the scored ones.

Metrics are implemented here in numpy (no scikit-learn): AUROC (Mann-Whitney with average
ranks, so ties count one half), average precision (AUPRC, the step-wise sum over distinct
thresholds), F1 / precision / recall / balanced accuracy at a threshold, the F1-maximising
threshold, Pearson's r, and the trivial all-positive F1 ``2p / (1 + p)``.

A prediction is positive ("safe to exit") when ``score >= threshold``. The threshold of
each measure and transition maximises F1 on a *selection* split; the figures reported are
on a disjoint *test* split. ``-inf`` (predict every token positive) is always a candidate,
so on the selection split the tuned F1 can never fall below the trivial F1; on the test split
it can.

Example:
    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> round(trivial_f1(0.5), 4)
    0.6667
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from deltaexit.features import LABELS, StateSet
from deltaexit.jsonable import json_clean
from deltaexit.measures.base import ConfidenceMeasure, LayerState

__all__ = [
    "auroc",
    "average_precision",
    "best_f1_threshold",
    "binary_metrics",
    "evaluate_measures",
    "evaluate_scores",
    "layer_delta_stats",
    "pearson",
    "score_carrying",
    "summarize_transitions",
    "trivial_f1",
]

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


def _as_numpy(x: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double() if dtype is np.float64 else x.detach().cpu()
        x = x.numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _check(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = _as_numpy(scores)
    y = _as_numpy(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    if s.size == 0:
        raise ValueError("no scores to evaluate")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; check the measure's inputs")
    return s, y


def trivial_f1(positive_rate: float) -> float:
    """F1 of predicting every token positive at positive rate ``p``: ``2p / (1 + p)``."""
    p = float(positive_rate)
    return 2 * p / (1 + p) if p > 0 else 0.0


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve; ties count one half. NaN when one class is absent.

    Example:
        >>> auroc([1, 1, 1], [0, 1, 1])
        0.5
    """
    s, y = _check(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value.
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the precision-recall curve as average precision (step-wise, ties grouped).

    ``AP = sum_k (R_k - R_{k-1}) * P_k`` over distinct thresholds in decreasing order.
    NaN when there are no positives.

    Example:
        >>> average_precision([0.9, 0.8, 0.7], [1, 0, 1])
        0.8333333333333333
    """
    s, y = _check(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    tp, pp = _cumulative_by_threshold(s, y)
    precision = tp / pp
    recall = tp / n_pos
    prev = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - prev) * precision))


def _cumulative_by_threshold(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted positives for ``score >= v`` at each distinct ``v``, from high to low."""
    values, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y.astype(np.float64), minlength=values.size)[::-1]
    cnt = np.bincount(inverse, minlength=values.size).astype(np.float64)[::-1]
    return np.cumsum(pos), np.cumsum(cnt)


def best_f1_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """The threshold maximising F1 of ``score >= threshold``, and that F1.

    Candidates are ``-inf`` (every token positive) and every distinct score; ties go to the
    lower threshold (``-inf`` first).

    Example:
        >>> best_f1_threshold([0.1, 0.2, 0.9], [0, 0, 1])
        (0.9, 1.0)
    """
    s, y = _check(scores, labels)
    n_pos = float(y.sum())
    values = np.unique(s)[::-1]  # high -> low
    tp, pp = _cumulative_by_threshold(s, y)
    f1 = np.where(pp + n_pos > 0, 2 * tp / np.maximum(pp + n_pos, 1e-300), 0.0)
    all_pos = 2 * n_pos / (s.size + n_pos) if n_pos > 0 else 0.0
    # Low -> high so that argmax's first hit is the lowest threshold; -inf comes first.
    cand_f1 = np.concatenate([[all_pos], f1[::-1]])
    cand_t = np.concatenate([[-np.inf], values[::-1]])
    best = int(np.argmax(cand_f1))
    return float(cand_t[best]), float(cand_f1[best])


def binary_metrics(scores: ArrayLike, labels: ArrayLike, threshold: float) -> dict[str, float]:
    """Precision, recall, F1, balanced accuracy and exit rate of ``score >= threshold``.

    Example:
        >>> binary_metrics([0.2, 0.6, 0.7, 0.1], [0, 1, 0, 1], 0.5)["f1"]
        0.5
    """
    s, y = _check(scores, labels)
    pred = s >= threshold
    tp = float(np.sum(pred & y))
    fp = float(np.sum(pred & ~y))
    fn = float(np.sum(~pred & y))
    tn = float(np.sum(~pred & ~y))
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
    tpr = recall if tp + fn > 0 else float("nan")
    tnr = tn / (tn + fp) if tn + fp > 0 else float("nan")
    rates = [r for r in (tpr, tnr) if not math.isnan(r)]
    balanced = float(np.mean(rates)) if rates else float("nan")
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "balanced_accuracy": balanced,
        "exit_rate": float(pred.mean()),
    }


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson's correlation; NaN when either input is constant.

    Example:
        >>> round(pearson([1, 2, 3], [2, 4, 7]), 4)
        0.9934
    """
    a, b = _as_numpy(x), _as_numpy(y)
    if a.shape != b.shape or a.size < 2:
        raise ValueError("pearson needs two inputs of equal length >= 2")
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def evaluate_scores(
    select_scores: ArrayLike, select_labels: ArrayLike, test_scores: ArrayLike, test_labels: ArrayLike
) -> dict[str, float]:
    """Choose the F1 threshold on the selection split, report every metric on the test split.

    Returns:
        ``threshold``, ``f1``, ``precision``, ``recall``, ``balanced_accuracy``, ``exit_rate``,
        ``trivial_f1``, ``f1_gain`` (F1 - trivial F1), ``auroc``, ``auprc``, ``selection_f1``.
    """
    threshold, select_f1 = best_f1_threshold(select_scores, select_labels)
    s, y = _check(test_scores, test_labels)
    out = {"threshold": threshold, **binary_metrics(s, y, threshold)}
    out["trivial_f1"] = trivial_f1(float(y.mean()))
    out["f1_gain"] = out["f1"] - out["trivial_f1"]
    out["auroc"] = auroc(s, y)
    out["auprc"] = average_precision(s, y)
    out["selection_f1"] = select_f1
    return out


def layer_delta_stats(states: StateSet) -> list[dict[str, float]]:
    """Per block (1-based ``layer``): mean ‖delta‖, mean ‖h_in‖ and mean ‖delta‖/‖h_in‖."""
    delta = states.delta.norm(dim=-1)
    h_in = states.h_in.norm(dim=-1)
    ratio = delta / h_in.clamp_min(1e-12)
    return [
        {
            "layer": layer + 1,
            "delta_norm": float(delta[layer].mean()),
            "h_in_norm": float(h_in[layer].mean()),
            "delta_ratio": float(ratio[layer].mean()),
        }
        for layer in range(states.num_layers)
    ]


def evaluate_measures(
    measures: Mapping[str, ConfidenceMeasure],
    select: StateSet,
    test: StateSet,
    *,
    label: str = "next",
) -> dict[str, Any]:
    """Per transition and per measure: thresholds from ``select``, metrics on ``test``.

    Row ``l`` (1-based ``layer``) is the decision after block ``l``; measures read the state
    after that block (its ``h_out``, its delta, its lens). For ``next`` it predicts that block
    ``l+1`` keeps the top-1 (transition ``l→l+1``); for ``final`` that the top-1 is final. For
    ``kept`` (the research note's protocol) transition ``l→l+1`` is scored from block ``l+1``'s
    own state: did the block whose delta is read leave the top-1 unchanged. A candidate-set measure
    (``candidates=K``) picks each token's candidates at the first decision layer (block 0, or 1 for ``kept``)
    and reads only those ``K`` logits at the later ones, as early exit does from ``min_exit_layer`` on.

    Returns:
        ``{"label", "transitions": [...], "summary": {measure: {...}}}`` where each transition
        has ``positive_rate``, ``change_rate``, ``trivial_f1``, ``r_delta_change`` (‖delta‖ of
        the scored block vs change), ``r_next_delta_change`` (‖delta of block l+1‖ vs change: for
        ``next``/``final`` it looks ahead, for comparison only) and ``measures`` (the output of
        :func:`evaluate_scores`).
    """
    if label not in LABELS:
        raise ValueError(f"label must be one of {list(LABELS)}, got {label!r}")
    if select.num_layers != test.num_layers:
        raise ValueError("select and test states come from models with different depths")
    sel_y, test_y = select.labels(label), test.labels(label)
    test_norm = test.delta.norm(dim=-1)
    first_ids: dict[tuple[str, int], torch.Tensor] = {}  # candidate ids picked at the first decision layer
    transitions = []
    for i, block in enumerate(test.decision_layers(label)):
        y = test_y[i]
        change = (~y).double()
        row: dict[str, Any] = {
            "layer": block + 1,
            "transition": f"{i + 1}→{i + 2}",
            "positive_rate": float(y.double().mean()),
            "change_rate": float(change.mean()),
            "trivial_f1": trivial_f1(float(y.double().mean())),
            "r_delta_change": pearson(test_norm[block], change),
            "r_next_delta_change": pearson(test_norm[i + 1], change),
            "measures": {},
        }
        sel_states: dict[tuple[bool, bool, int | None], LayerState] = {}
        test_states: dict[tuple[bool, bool, int | None], LayerState] = {}
        for name, measure in measures.items():
            # Each measure gets only what it declares; measures that read the same share one state (one lens call).
            key = (measure.needs("h_in"), measure.needs("lens"), measure.candidates)
            sel_state = sel_states.setdefault(key, select.state(block, measure))
            test_state = test_states.setdefault(key, test.state(block, measure))
            s_sel = score_carrying(measure, sel_state, first_ids, "select")
            s_test = score_carrying(measure, test_state, first_ids, "test")
            row["measures"][name] = evaluate_scores(s_sel, sel_y[i], s_test, y)
        transitions.append(row)
    summary = {name: summarize_transitions([t["measures"][name] for t in transitions]) for name in measures}
    return json_clean({"label": label, "transitions": transitions, "summary": summary})


def score_carrying(
    measure: ConfidenceMeasure, state: LayerState, first_ids: dict[tuple[str, int], torch.Tensor], split: str
) -> torch.Tensor:
    """``measure.score(state)``; a candidate-set measure's tokens keep the candidates picked at their first
    decision layer (the first state it scores; the later layers' states take them over)."""
    if measure.candidates is None:
        return measure.score(state)
    key = (split, measure.candidates)
    if key in first_ids and state.candidates is None:
        state.candidates = first_ids[key]
    score = measure.score(state)
    if key not in first_ids and state.candidates is not None:
        first_ids[key] = state.candidates
    return score


def summarize_transitions(per: list[dict[str, float]]) -> dict[str, float]:
    """Means over the transitions of one measure's :func:`evaluate_scores` figures."""
    return {
        "mean_f1": float(np.mean([m["f1"] for m in per])),
        "mean_trivial_f1": float(np.mean([m["trivial_f1"] for m in per])),
        "mean_f1_gain": float(np.mean([m["f1_gain"] for m in per])),
        "beats_trivial": int(sum(m["f1_gain"] > 0 for m in per)),
        "transitions": len(per),
        "mean_auroc": float(np.nanmean([m["auroc"] for m in per])),
        "mean_auprc": float(np.nanmean([m["auprc"] for m in per])),
        "mean_balanced_accuracy": float(np.nanmean([m["balanced_accuracy"] for m in per])),
    }
