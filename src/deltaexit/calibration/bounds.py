"""Concentration p-values and upper confidence bounds for a mean of losses in [0, 1].

For ``n`` i.i.d. losses in ``[0, 1]`` with empirical mean ``risk_hat``, each function gives a
super-uniform p-value for the null hypothesis ``H0: E[loss] > delta`` (small p = strong evidence
that the true risk is at most ``delta``), as used by Learn-then-Test (Angelopoulos, Bates, Candès,
Jordan & Lei, 2021) and by CALM (Schuster et al., 2022):

* Hoeffding: ``exp(-n * h1(min(risk_hat, delta), delta))`` with the binary KL divergence
  ``h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))``;
* Bentkus: ``e * P(Binom(n, delta) <= ceil(n * risk_hat))``;
* Hoeffding–Bentkus: the minimum of the two.

Example:
    >>> round(hoeffding_pvalue(0.0, 100, 0.05), 6)   # (1 - delta) ** n
    0.005921
    >>> hb_pvalue(0.0, 100, 0.05) == hoeffding_pvalue(0.0, 100, 0.05)
    True
    >>> min_examples(0.05, 0.1)                       # even zero risk needs this many
    45
"""

from __future__ import annotations

import math

__all__ = [
    "BOUNDS",
    "bentkus_pvalue",
    "binom_cdf",
    "hb_pvalue",
    "hoeffding_pvalue",
    "min_examples",
    "pvalue",
    "upper_confidence_bound",
]


def _check(risk_hat: float, n: int, delta: float) -> tuple[float, int, float]:
    risk_hat, delta = float(risk_hat), float(delta)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n (number of calibration examples) must be a positive integer, got {n!r}")
    if math.isnan(risk_hat) or not -1e-12 <= risk_hat <= 1 + 1e-12:
        raise ValueError(f"the empirical risk must lie in [0, 1] (losses in [0, 1]), got {risk_hat}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"the tolerance delta must lie in (0, 1), got {delta}")
    return min(max(risk_hat, 0.0), 1.0), int(n), delta


def _kl_bernoulli(a: float, b: float) -> float:
    """Binary KL divergence ``h1(a, b)`` (0 log 0 = 0)."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def hoeffding_pvalue(risk_hat: float, n: int, delta: float) -> float:
    """Hoeffding (Chernoff–KL form) p-value for ``H0: risk > delta``.

    Example:
        >>> round(hoeffding_pvalue(0.0, 10, 0.1), 6)   # 0.9 ** 10
        0.348678
        >>> hoeffding_pvalue(0.5, 10, 0.1)   # no evidence when risk_hat >= delta
        1.0
    """
    risk_hat, n, delta = _check(risk_hat, n, delta)
    return min(1.0, math.exp(-n * _kl_bernoulli(min(risk_hat, delta), delta)))


def binom_cdf(k: int, n: int, p: float) -> float:
    """``P(Binom(n, p) <= k)``, summed in log space (exact to float precision).

    Example:
        >>> round(binom_cdf(1, 4, 0.5), 4)    # (1 + 4) / 16
        0.3125
    """
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lg_n1 = math.lgamma(n + 1)
    terms = [lg_n1 - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def bentkus_pvalue(risk_hat: float, n: int, delta: float) -> float:
    """Bentkus p-value ``e * P(Binom(n, delta) <= ceil(n * risk_hat))`` (capped at 1).

    Example:
        >>> round(bentkus_pvalue(0.0, 10, 0.1), 6)   # e * 0.9 ** 10
        0.947806
    """
    risk_hat, n, delta = _check(risk_hat, n, delta)
    k = math.ceil(n * risk_hat - 1e-9)  # guard against n * (k / n) landing a hair above k
    return min(1.0, math.e * binom_cdf(k, n, delta))


def hb_pvalue(risk_hat: float, n: int, delta: float) -> float:
    """Hoeffding–Bentkus p-value: ``min(hoeffding, bentkus)``.

    Example:
        >>> p = hb_pvalue(0.01, 1000, 0.05)
        >>> p < 1e-10
        True
    """
    return min(hoeffding_pvalue(risk_hat, n, delta), bentkus_pvalue(risk_hat, n, delta))


#: Name -> p-value function.
BOUNDS = {"hb": hb_pvalue, "hoeffding": hoeffding_pvalue, "bentkus": bentkus_pvalue}


def pvalue(risk_hat: float, n: int, delta: float, bound: str = "hb") -> float:
    """The p-value of the named bound (``"hb"``, ``"hoeffding"`` or ``"bentkus"``)."""
    try:
        fn = BOUNDS[bound]
    except KeyError:
        raise ValueError(f"unknown bound {bound!r}; choose one of {sorted(BOUNDS)}") from None
    return fn(risk_hat, n, delta)


def upper_confidence_bound(risk_hat: float, n: int, epsilon: float, bound: str = "hb") -> float:
    """Smallest ``delta`` whose null ``risk > delta`` the bound rejects at level ``epsilon``.

    With probability at least ``1 - epsilon`` the true risk lies below it. Found by bisection
    (the p-values are non-increasing in ``delta``).

    Example:
        >>> ucb = upper_confidence_bound(0.0, 100, 0.1)
        >>> abs(ucb - (1 - 0.1 ** (1 / 100))) < 1e-6      # Hoeffding at zero risk
        True
    """
    _check(risk_hat, n, 0.5)
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    lo, hi = min(max(float(risk_hat), 0.0), 1.0), 1.0
    if lo >= 1.0:
        return 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mid <= 0.0 or mid >= 1.0:
            break
        if pvalue(risk_hat, n, mid, bound) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def min_examples(delta: float, epsilon: float, bound: str = "hb") -> int:
    """Fewest calibration examples with which even a zero empirical risk is rejected at ``epsilon``.

    Below this ``n`` no threshold can be certified for ``(delta, epsilon)``, however good it is.

    Example:
        >>> min_examples(0.01, 0.1)        # ceil(log 0.1 / log 0.99)
        230
    """
    _check(0.0, 1, delta)
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    # The zero-risk p-value is non-increasing in n; start from Hoeffding's closed form.
    n = max(1, math.ceil(math.log(epsilon) / math.log1p(-delta)) - 2)
    while pvalue(0.0, n, delta, bound) > epsilon:
        n += 1
    while n > 1 and pvalue(0.0, n - 1, delta, bound) <= epsilon:
        n -= 1
    return n
