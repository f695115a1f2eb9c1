"""Concentration bounds and fixed-sequence Learn-then-Test: hand-computed values and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaexit.calibration.bounds import (
    bentkus_pvalue,
    binom_cdf,
    hb_pvalue,
    hoeffding_pvalue,
    min_examples,
    pvalue,
    upper_confidence_bound,
)
from deltaexit.calibration.ltt import InsufficientCalibrationData, fixed_sequence_test, learn_then_test

SETTINGS = settings(max_examples=40, deadline=None)


def brute_binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, min(k, n) + 1))


# -- hand-computed values --------------------------------------------------------------------------
def test_hoeffding_hand_values():
    assert hoeffding_pvalue(0.0, 100, 0.05) == pytest.approx(0.95**100, rel=1e-12)
    # risk 0.02 vs delta 0.05, n = 100: exp(-100 * KL(0.02 || 0.05)) written out
    kl = 0.02 * math.log(0.02 / 0.05) + 0.98 * math.log(0.98 / 0.95)
    assert hoeffding_pvalue(0.02, 100, 0.05) == pytest.approx(math.exp(-100 * kl), rel=1e-12)
    assert hoeffding_pvalue(0.05, 100, 0.05) == 1.0
    assert hoeffding_pvalue(0.3, 100, 0.05) == 1.0


def test_bentkus_hand_values():
    assert bentkus_pvalue(0.0, 10, 0.1) == pytest.approx(math.e * 0.9**10, rel=1e-12)
    # ceil(100 * 0.015) = 2
    want = math.e * sum(math.comb(100, i) * 0.05**i * 0.95 ** (100 - i) for i in range(3))
    assert bentkus_pvalue(0.015, 100, 0.05) == pytest.approx(want, rel=1e-10)
    # n * risk an exact integer: 100 * 0.03 = 3 (not 4 from float round-off)
    want3 = math.e * sum(math.comb(100, i) * 0.05**i * 0.95 ** (100 - i) for i in range(4))
    assert bentkus_pvalue(0.03, 100, 0.05) == pytest.approx(want3, rel=1e-10)
    assert bentkus_pvalue(0.5, 10, 0.1) == 1.0  # capped


def test_hb_is_the_minimum():
    for r, n, d in [(0.0, 50, 0.1), (0.02, 400, 0.05), (0.009, 2000, 0.01), (0.2, 30, 0.3)]:
        assert hb_pvalue(r, n, d) == min(hoeffding_pvalue(r, n, d), bentkus_pvalue(r, n, d))
    # Bentkus wins at moderate risk and large n, Hoeffding at zero risk
    assert bentkus_pvalue(0.03, 2000, 0.05) < hoeffding_pvalue(0.03, 2000, 0.05)
    assert hoeffding_pvalue(0.0, 100, 0.05) < bentkus_pvalue(0.0, 100, 0.05)


@SETTINGS
@given(st.integers(1, 60), st.integers(-1, 70), st.floats(0.001, 0.999))
def test_binom_cdf_matches_brute_force(n, k, p):
    assert binom_cdf(k, n, p) == pytest.approx(min(1.0, brute_binom_cdf(k, n, p)), rel=1e-9, abs=1e-300)


def test_min_examples_hand_values():
    assert min_examples(0.01, 0.1) == 230  # ceil(log 0.1 / log 0.99) = ceil(229.1)
    assert min_examples(0.05, 0.1) == 45  # ceil(44.89)
    for d, e in [(0.01, 0.1), (0.05, 0.05), (0.2, 0.3)]:
        n = min_examples(d, e)
        assert hb_pvalue(0.0, n, d) <= e < hb_pvalue(0.0, n - 1, d) if n > 1 else True
    assert min_examples(0.05, 0.1, "bentkus") > min_examples(0.05, 0.1, "hoeffding")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="delta"):
        hb_pvalue(0.1, 10, 1.5)
    with pytest.raises(ValueError, match="positive integer"):
        hb_pvalue(0.1, 0, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        hb_pvalue(float("nan"), 10, 0.1)
    with pytest.raises(ValueError, match="unknown bound"):
        pvalue(0.1, 10, 0.1, "chernoff")


# -- monotonicity --------------------------------------------------------------------------------------
BOUND_FNS = [hoeffding_pvalue, bentkus_pvalue, hb_pvalue]


@SETTINGS
@given(st.integers(1, 400), st.data(), st.floats(0.005, 0.5))
def test_pvalue_non_increasing_as_risk_falls(n, data, delta):
    k1 = data.draw(st.integers(0, n))
    k2 = data.draw(st.integers(0, k1))  # k2 <= k1: lower empirical risk
    for fn in BOUND_FNS:
        assert fn(k2 / n, n, delta) <= fn(k1 / n, n, delta) + 1e-15


@SETTINGS
@given(st.integers(1, 200), st.data(), st.floats(0.01, 0.5), st.integers(2, 4))
def test_more_examples_same_risk_lower_pvalue(n, data, delta, mult):
    k = data.draw(st.integers(0, max(0, math.ceil(n * delta) - 1)))
    risk = k / n
    if risk >= delta:
        return
    # Hoeffding strictly falls with n at any fixed risk below delta
    assert hoeffding_pvalue(risk, n * mult, delta) < hoeffding_pvalue(risk, n, delta)
    # HB (with its ceil(n r) exact at multiples of n) never rises
    assert hb_pvalue(risk, n * mult, delta) <= hb_pvalue(risk, n, delta) + 1e-15


@SETTINGS
@given(st.integers(5, 500), st.data(), st.floats(0.02, 0.5))
def test_upper_confidence_bound(n, data, epsilon):
    k = data.draw(st.integers(0, n))
    ucb = upper_confidence_bound(k / n, n, epsilon)
    assert k / n <= ucb <= 1.0
    if ucb < 1.0:
        assert hb_pvalue(k / n, n, ucb) <= epsilon + 1e-9
    assert upper_confidence_bound(k / n, 4 * n, epsilon) <= ucb + 1e-9


# -- fixed-sequence testing ----------------------------------------------------------------------------
@SETTINGS
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30), st.floats(0.01, 0.5))
def test_fixed_sequence_never_passes_a_non_rejection(pvals, epsilon):
    i = fixed_sequence_test(pvals, epsilon)
    assert all(p <= epsilon for p in pvals[: i + 1])
    assert i == len(pvals) - 1 or pvals[i + 1] > epsilon


@SETTINGS
@given(st.lists(st.floats(0.0, 0.3), min_size=1, max_size=12), st.floats(0.02, 0.2))
def test_learn_then_test_stops_at_first_non_rejection(risks, delta):
    n = 300
    calls = []

    def losses(j):
        calls.append(j)
        return torch.full((n,), risks[j], dtype=torch.float64)

    out = learn_then_test(losses, range(len(risks)), delta=delta, epsilon=0.1)
    expected_p = [hb_pvalue(r, n, delta) for r in risks]
    first_fail = next((j for j, p in enumerate(expected_p) if p > 0.1), None)
    if first_fail is None:
        assert out.index == len(risks) - 1 and calls == list(range(len(risks)))
    else:
        assert out.index == first_fail - 1
        assert calls == list(range(first_fail + 1))  # nothing evaluated past the non-rejection
    assert out.pvalues == pytest.approx(expected_p[: len(calls)])
    full = learn_then_test(losses, range(len(risks)), delta=delta, epsilon=0.1, test_all=True)
    assert full.index == out.index and full.num_tested == len(risks)


def test_learn_then_test_validates_losses():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        learn_then_test(lambda t: torch.full((300,), 1.5), [0], delta=0.05, epsilon=0.1)
    with pytest.raises(ValueError, match="NaN"):
        learn_then_test(lambda t: torch.full((300,), float("nan")), [0], delta=0.05, epsilon=0.1)
    with pytest.raises(ValueError, match="expected 300"):
        learn_then_test(lambda t: torch.zeros(300 if t == 0 else 299), [0, 1], delta=0.05, epsilon=0.1)
    with pytest.raises(InsufficientCalibrationData, match="at least 45"):
        learn_then_test(lambda t: torch.zeros(44), [0], delta=0.05, epsilon=0.1)
