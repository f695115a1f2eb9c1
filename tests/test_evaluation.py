"""Evaluation metrics against hand-computed cases and brute force; per-transition evaluation."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deltaexit.evaluation import (
    auroc,
    average_precision,
    best_f1_threshold,
    binary_metrics,
    evaluate_measures,
    evaluate_scores,
    layer_delta_stats,
    pearson,
    trivial_f1,
)
from deltaexit.features import StateSet
from deltaexit.measures import get_measure

# Integer-valued scores make ties frequent.
scores_labels = st.integers(2, 30).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-3, 3), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)


def _f1(pred, y):
    tp = sum(p and t for p, t in zip(pred, y))
    fp = sum(p and not t for p, t in zip(pred, y))
    fn = sum(t and not p for p, t in zip(pred, y))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def test_auroc_hand_cases_with_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 1, 1], [0, 1, 1]) == 0.5
    # positives {0.5, 0.9} vs negatives {0.5, 0.2}: 0.5 (tie) + 1 + 1 + 1 = 3.5 of 4
    assert auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == 0.875
    assert auroc([3, 2, 1], [1, 1, 0]) == 1.0
    assert auroc([1, 2, 3], [1, 1, 0]) == 0.0
    assert math.isnan(auroc([1, 2], [1, 1]))


@given(scores_labels)
def test_auroc_equals_pairwise_count(data):
    s, y = data
    pos = [a for a, t in zip(s, y) if t]
    neg = [a for a, t in zip(s, y) if not t]
    if not pos or not neg:
        assert math.isnan(auroc(s, y))
        return
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    assert auroc(s, y) == pytest.approx(wins / (len(pos) * len(neg)))


def test_average_precision_hand_cases():
    # thresholds 0.9: P=1, R=1/2; 0.8: no recall gain; 0.7: P=2/3, R=1
    assert average_precision([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision([0.5, 0.5], [1, 0]) == 0.5  # one tied group: P = 1/2 at R = 1
    assert average_precision([0.3, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert math.isnan(average_precision([1, 2], [0, 0]))


@given(scores_labels)
def test_average_precision_equals_definition(data):
    s, y = data
    n_pos = sum(y)
    if n_pos == 0:
        assert math.isnan(average_precision(s, y))
        return
    expected, prev_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        pred = [a >= t for a in s]
        tp = sum(p and q for p, q in zip(pred, y))
        recall, precision = tp / n_pos, tp / sum(pred)
        expected += (recall - prev_recall) * precision
        prev_recall = recall
    assert average_precision(s, y) == pytest.approx(expected)


@given(scores_labels)
def test_best_threshold_is_the_best_candidate_and_never_below_trivial(data):
    s, y = data
    threshold, f1 = best_f1_threshold(s, y)
    candidates = [-math.inf, *sorted(set(s))]
    best = max(_f1([a >= t for a in s], y) for t in candidates)
    assert f1 == pytest.approx(best)
    assert _f1([a >= threshold for a in s], y) == pytest.approx(f1)
    assert f1 >= trivial_f1(sum(y) / len(y)) - 1e-12


def test_best_threshold_ties_go_to_the_lowest_threshold():
    # every threshold gives F1 = 1 on all-positive labels: -inf (all positive) wins
    assert best_f1_threshold([1, 2, 3], [1, 1, 1]) == (-math.inf, 1.0)
    assert best_f1_threshold([0.1, 0.2, 0.9], [0, 0, 1]) == (0.9, 1.0)


def test_binary_metrics_hand_case():
    m = binary_metrics([0.2, 0.6, 0.7, 0.1], [0, 1, 0, 1], 0.5)
    # pred [0,1,1,0]: tp=1 fp=1 fn=1 tn=1
    assert m == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "balanced_accuracy": 0.5, "exit_rate": 0.5}
    m = binary_metrics([1, 1, 0, 0, 0], [1, 0, 0, 0, 0], 0.5)
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 3 / 4) / 2)
    assert m["f1"] == pytest.approx(2 / 3)
    assert binary_metrics([0, 0], [1, 1], 1)["f1"] == 0.0


def test_trivial_f1_and_pearson():
    assert trivial_f1(0.607) == pytest.approx(2 * 0.607 / 1.607)
    assert round(trivial_f1(0.607), 3) == 0.755  # the 6→7 example
    assert trivial_f1(0.0) == 0.0
    x, y = np.array([1.0, 2, 3, 5]), np.array([2.0, 4, 7, 7])
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="length"):
        auroc([0.1, 0.2], [0, 1, 1])


def test_threshold_comes_from_the_selection_split():
    # On 'select' the best threshold is 0.5; on 'test' that threshold misses every positive,
    # though a threshold tuned on test itself would be perfect.
    out = evaluate_scores([0.4, 0.6], [0, 1], [0.1, 0.2, 0.3], [0, 1, 1])
    assert out["threshold"] == 0.6
    assert out["f1"] == 0.0 and out["selection_f1"] == 1.0
    assert out["trivial_f1"] == pytest.approx(0.8)
    assert out["f1_gain"] == pytest.approx(-0.8)
    assert out["auroc"] == 1.0


def _random_states(layers=4, n=240, d=6, seed=0, window=40) -> StateSet:
    g = torch.Generator().manual_seed(seed)
    h_in = torch.randn(layers, n, d, generator=g)
    h_out = h_in + torch.randn(layers, n, d, generator=g)
    ids = torch.randint(0, 3, (layers, n, 2), generator=g)
    probs = torch.sort(torch.rand(layers, n, 2, generator=g), dim=-1, descending=True).values / 2
    return StateSet(h_in, h_out, ids, probs, torch.arange(n) // window)


def test_evaluate_measures_is_per_transition_and_json_ready():
    select, test = _random_states(seed=1), _random_states(seed=2)
    measures = {n: get_measure(n) for n in ("delta-norm", "state-cosine", "softmax-gap")}
    for label in ("next", "final"):
        out = evaluate_measures(measures, select, test, label=label)
        json.dumps(out, allow_nan=False)
        assert [t["layer"] for t in out["transitions"]] == [1, 2, 3]
        y = test.labels(label)
        for t in out["transitions"]:
            rate = float(y[t["layer"] - 1].float().mean())
            assert t["positive_rate"] == pytest.approx(rate)
            assert t["change_rate"] == pytest.approx(1 - rate)
            assert t["trivial_f1"] == pytest.approx(trivial_f1(rate))
            assert set(t["measures"]) == set(measures)
            norm = test.delta.norm(dim=-1)[t["layer"] - 1]
            assert t["r_delta_change"] == pytest.approx(pearson(norm, ~y[t["layer"] - 1]))
        assert set(out["summary"]) == set(measures)
    # 'final' at the decision after block l means saturated[l]
    assert torch.equal(test.labels("final"), test.saturation.saturated[:-1])
    assert torch.equal(test.labels("next"), test.topk_ids[:-1, :, 0] == test.topk_ids[1:, :, 0])
    with pytest.raises(ValueError, match="label"):
        evaluate_measures(measures, select, test, label="soon")


def test_kept_label_scores_the_block_that_made_the_change():
    """The research note's protocol: transition l→l+1 is scored from block l+1's own state."""
    select, test = _random_states(seed=3), _random_states(seed=4)
    assert test.decision_layers("next") == [0, 1, 2]
    assert test.decision_layers("kept") == [1, 2, 3]
    assert [s.layer for s in test.decision_states("kept")] == [1, 2, 3]
    assert torch.equal(test.labels("kept"), test.topk_ids[:-1, :, 0] == test.topk_ids[1:, :, 0])
    measures = {"delta-norm": get_measure("delta-norm")}
    out = evaluate_measures(measures, select, test, label="kept")
    assert [t["transition"] for t in out["transitions"]] == ["1→2", "2→3", "3→4"]
    assert [t["layer"] for t in out["transitions"]] == [2, 3, 4]
    norm = test.delta.norm(dim=-1)
    y = test.labels("kept")
    for i, t in enumerate(out["transitions"]):
        # ‖delta‖ of the block that made (or not) the change, i.e. block i+1 (0-based)
        assert t["r_delta_change"] == pytest.approx(pearson(norm[i + 1], ~y[i]))
        assert t["r_delta_change"] == pytest.approx(t["r_next_delta_change"])
        # the score evaluated is (minus: small = safe) the delta norm of block i+1, not of block i
        expected = evaluate_scores(-select.delta.norm(dim=-1)[i + 1], select.labels("kept")[i], -norm[i + 1], y[i])
        assert t["measures"]["delta-norm"]["auroc"] == pytest.approx(expected["auroc"])
    with pytest.raises(ValueError, match="label"):
        test.decision_layers("soon")


def test_layer_delta_stats():
    states = _random_states()
    stats = layer_delta_stats(states)
    assert [s["layer"] for s in stats] == [1, 2, 3, 4]
    norm = (states.h_out - states.h_in).norm(dim=-1)
    assert stats[2]["delta_norm"] == pytest.approx(float(norm[2].mean()))
    assert stats[2]["delta_ratio"] == pytest.approx(float((norm[2] / states.h_in[2].norm(dim=-1)).mean()))


def test_split_windows_is_disjoint_and_complete():
    states = _random_states(n=250, window=25)  # 10 windows
    a, b, c = states.split_windows([0.6, 0.2, 0.2])
    assert a.num_tokens + b.num_tokens + c.num_tokens == 250
    assert set(a.window.tolist()).isdisjoint(b.window.tolist())
    assert set(b.window.tolist()).isdisjoint(c.window.tolist())
    assert a.window.max() < b.window.min() <= b.window.max() < c.window.min()
    with pytest.raises(ValueError, match="window"):
        _random_states(n=40, window=40).split_windows([0.5, 0.5])


def test_state_hands_a_measure_only_what_it_declares():
    states = _random_states()
    full = states.state(1)
    assert full.h_in is not None and full.topk_probs is not None
    delta_only = states.state(1, get_measure("delta-norm"))
    assert delta_only.h_in is not None and delta_only.lens is None and delta_only.topk_probs is None
    lens_only = states.state(1, get_measure("softmax-gap"))
    assert lens_only.h_in is None and lens_only.topk_probs is not None
    assert [s.h_in is None for s in states.decision_states("next", get_measure("linear", features="h"))] == [True] * 3
    torch.testing.assert_close(get_measure("softmax-gap").score(lens_only), get_measure("softmax-gap").score(full))
