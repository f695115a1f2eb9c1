"""Mergeable, bounded-memory score statistics for streamed evaluation: histograms with stated error bounds.

A :class:`ScoreHistogram` counts positives and negatives per *bin* of a score. Bins follow the
float32 bit pattern: a score's sign, exponent and top ``mantissa_bits`` mantissa bits name its bin,
so every bin is an interval whose width is at most ``2**-mantissa_bits`` of its values (relative
resolution 0.4% at the default 8 bits), over any range, in one pass, with no range given up front.
The number of bins is bounded by ``2**(9 + mantissa_bits)`` whatever the number of tokens (in
practice a few thousand; 24 bytes a bin), plus a buffer of at most 8,192 scores (and one batch) before they
are merged, so memory does not grow with the corpus.

What is exact and what is not:

- **Thresholds are bin edges** (the smallest float32 of a bin), so ``score >= edge`` holds for a whole
  bin or for none of it: F1, precision, recall, balanced accuracy and exit rate *at a bin edge* are
  exact (the counts of the tokens above the edge are exact). The F1-maximising threshold of the
  selection split is chosen among the edges (and ``-inf``); it can differ from the in-memory choice
  among all distinct scores, never with a higher selection F1.
- **AUROC** treats the scores of one bin as ties (one half per positive-negative pair). With ``p_b``
  positives and ``n_b`` negatives in bin ``b`` and ``P``/``N`` in all, the exact AUROC differs by at most
  ``sum_b p_b n_b / (2 P N)`` (:meth:`ScoreHistogram.auroc_bound`): only pairs within a bin can be ordered
  differently. It is 0 when no bin holds both classes.
- **AUPRC** (average precision) gives each positive of bin ``b`` the bin's end precision
  ``(TP + p_b) / (PP + p_b + n_b)`` (``TP``/``PP``: true/predicted positives above the bin). Whatever the
  order inside the bin, the exact value for one of its positives lies in
  ``[(TP + 1) / (PP + 1 + n_b), (TP + p_b) / (PP + p_b)]``, so the error is at most
  ``sum_b (p_b / P) * (hi_b - lo_b)`` (:meth:`ScoreHistogram.auprc_bound`); 0 when no bin holds both classes.

Example:
    >>> import torch
    >>> h = ScoreHistogram()
    >>> h.add(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True]))
    >>> h.auroc(), h.auroc_bound()
    (0.75, 0.0)
"""

from __future__ import annotations

import math
import struct

import torch

__all__ = ["RunningPearson", "ScoreHistogram", "bin_edge", "score_bins"]

_MAGNITUDE = 0x7FFFFFFF
#: Buffered scores per histogram before they are merged into the counts (bounds the buffer at 64 KiB a histogram).
_MERGE_AT = 1 << 13


def score_bins(scores: torch.Tensor, mantissa_bits: int = 8) -> torch.Tensor:
    """``[n]`` int64 bin ids of float scores, in the order of the scores (equal scores share a bin).

    Example:
        >>> score_bins(torch.tensor([-1.0, 0.0, 0.5, 0.5001, 1.0])).tolist() == sorted(
        ...     score_bins(torch.tensor([-1.0, 0.0, 0.5, 0.5001, 1.0])).tolist())
        True
    """
    if not 0 <= mantissa_bits <= 23:
        raise ValueError(f"mantissa_bits must lie in [0, 23], got {mantissa_bits}")
    s = scores.detach().reshape(-1).to(torch.float32).cpu()
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN; check the measure's inputs")
    bits = s.view(torch.int32).to(torch.int64)
    key = torch.where(bits >= 0, bits, -(bits & _MAGNITUDE))  # monotone in the value; -0.0 and 0.0 share 0
    return torch.div(key, 1 << (23 - mantissa_bits), rounding_mode="floor")


def bin_edge(bin_id: int, mantissa_bits: int = 8) -> float:
    """The smallest float32 in bin ``bin_id``: ``score >= bin_edge(b)`` holds exactly for the bins ``>= b``.

    Example:
        >>> b = int(score_bins(torch.tensor([0.7]))[0])
        >>> bin_edge(b) <= 0.7 and int(score_bins(torch.tensor([bin_edge(b)]))[0]) == b
        True
    """
    key = int(bin_id) << (23 - mantissa_bits)
    bits = key if key >= 0 else (-key) | (1 << 31)
    return float(struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0])


class ScoreHistogram:
    """Positive and negative counts per score bin, filled batch by batch (see the module docstring).

    Args:
        mantissa_bits: Mantissa bits kept per bin (relative bin width ``2**-mantissa_bits``).
    """

    def __init__(self, mantissa_bits: int = 8) -> None:
        self.mantissa_bits = mantissa_bits
        self.bins = torch.zeros(0, dtype=torch.int64)  # sorted, distinct
        self.pos = torch.zeros(0, dtype=torch.int64)
        self.neg = torch.zeros(0, dtype=torch.int64)
        self._pending: list[torch.Tensor] = []  # codes 2 * bin + label, merged in bulk
        self._pending_n = 0

    def add(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Count ``scores`` ``[n]`` with bool ``labels`` ``[n]``."""
        y = labels.detach().reshape(-1).to(torch.int64).cpu()
        bins = score_bins(scores, self.mantissa_bits)
        if bins.shape != y.shape:
            raise ValueError(f"scores ({bins.numel()}) and labels ({y.numel()}) differ in length")
        self._pending.append(bins * 2 + y)
        self._pending_n += int(y.numel())
        if self._pending_n >= _MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        codes, counts = torch.cat(self._pending).unique(return_counts=True)
        self._pending, self._pending_n = [], 0
        bins = torch.div(codes, 2, rounding_mode="floor")
        is_pos = (codes - 2 * bins).bool()
        all_bins, inverse = torch.cat([self.bins, bins]).unique(return_inverse=True)
        pos = torch.zeros(all_bins.numel(), dtype=torch.int64)
        neg = torch.zeros(all_bins.numel(), dtype=torch.int64)
        k = self.bins.numel()
        pos.index_add_(0, inverse[:k], self.pos)
        neg.index_add_(0, inverse[:k], self.neg)
        new = inverse[k:]
        pos.index_add_(0, new[is_pos], counts[is_pos])
        neg.index_add_(0, new[~is_pos], counts[~is_pos])
        self.bins, self.pos, self.neg = all_bins, pos, neg

    def counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(bins, positives, negatives)``, bins ascending."""
        self._merge()
        return self.bins, self.pos, self.neg

    @property
    def num_positive(self) -> int:
        return int(self.counts()[1].sum())

    @property
    def num_negative(self) -> int:
        return int(self.counts()[2].sum())

    @property
    def num_bins(self) -> int:
        return int(self.counts()[0].numel())

    def _totals(self) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        _, pos, neg = self.counts()
        if pos.numel() == 0:
            raise ValueError("no scores to evaluate")
        p, n = pos.double(), neg.double()
        return p, n, float(p.sum()), float(n.sum())

    # -- threshold-free --------------------------------------------------------------------------------
    def auroc(self) -> float:
        """AUROC with the scores of one bin as ties; NaN when one class is absent."""
        p, n, total_p, total_n = self._totals()
        if total_p == 0 or total_n == 0:
            return float("nan")
        below = torch.cumsum(n, 0) - n
        return float((p * (below + n / 2)).sum() / (total_p * total_n))

    def auroc_bound(self) -> float:
        """Largest possible gap between :meth:`auroc` and the exact AUROC of the same scores."""
        p, n, total_p, total_n = self._totals()
        if total_p == 0 or total_n == 0:
            return float("nan")
        return float((p * n).sum() / (2 * total_p * total_n))

    def _descending(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Per bin, high to low: positives, negatives, and the true/predicted positives above the bin."""
        p, n, total_p, _ = self._totals()
        p, n = p.flip(0), n.flip(0)
        tp_above = torch.cumsum(p, 0) - p
        pp_above = torch.cumsum(p + n, 0) - p - n
        return p, n, tp_above, pp_above, total_p

    def auprc(self) -> float:
        """Average precision with the scores of one bin as ties; NaN without positives."""
        p, n, tp0, pp0, total_p = self._descending()
        if total_p == 0:
            return float("nan")
        precision = (tp0 + p) / (pp0 + p + n).clamp_min(1.0)
        return float((p / total_p * precision).sum())

    def auprc_bound(self) -> float:
        """Largest possible gap between :meth:`auprc` and the exact average precision of the same scores."""
        p, n, tp0, pp0, total_p = self._descending()
        if total_p == 0:
            return float("nan")
        has = p > 0
        lo = (tp0 + 1) / (pp0 + 1 + n)
        hi = (tp0 + p) / (pp0 + p).clamp_min(1.0)
        return float(torch.where(has, p / total_p * (hi - lo), torch.zeros_like(p)).sum())

    # -- thresholds ------------------------------------------------------------------------------------
    def best_f1_threshold(self) -> tuple[float, float]:
        """The bin edge (or ``-inf``) maximising F1 of ``score >= threshold``, and that F1; ties go low."""
        bins, _, _ = self.counts()
        p, n, tp0, pp0, total_p = self._descending()
        tp, pp = tp0 + p, pp0 + p + n  # score >= edge of each bin, high -> low
        f1 = torch.where(pp + total_p > 0, 2 * tp / (pp + total_p).clamp_min(1e-300), torch.zeros_like(tp))
        total = float(pp[-1])
        all_pos = 2 * total_p / (total + total_p) if total_p > 0 else 0.0
        cand_f1 = torch.cat([torch.tensor([all_pos], dtype=torch.float64), f1.flip(0)])  # low -> high, -inf first
        best = int(torch.argmax(cand_f1))
        threshold = -math.inf if best == 0 else bin_edge(int(bins[best - 1]), self.mantissa_bits)
        return threshold, float(cand_f1[best])

    def above(self, threshold: float) -> tuple[float, float]:
        """``(positives, negatives)`` with ``score >= threshold``; exact for ``-inf`` and for bin edges.

        Raises:
            ValueError: ``threshold`` is not a bin edge (the counts would be approximate).
        """
        bins, pos, neg = self.counts()
        if threshold == -math.inf:
            return float(pos.sum()), float(neg.sum())
        b = int(score_bins(torch.tensor([threshold]), self.mantissa_bits)[0])
        if bin_edge(b, self.mantissa_bits) != float(torch.tensor(threshold, dtype=torch.float32)):
            raise ValueError(f"threshold {threshold!r} is not a bin edge; counts above it would be approximate")
        keep = bins >= b
        return float(pos[keep].sum()), float(neg[keep].sum())

    def binary_metrics(self, threshold: float) -> dict[str, float]:
        """Precision, recall, F1, balanced accuracy and exit rate at a bin edge (as ``evaluation.binary_metrics``)."""
        tp, fp = self.above(threshold)
        total_p, total_n = float(self.num_positive), float(self.num_negative)
        fn, tn = total_p - tp, total_n - fp
        precision = tp / (tp + fp) if tp + fp > 0 else 0.0
        recall = tp / (tp + fn) if tp + fn > 0 else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
        rates = ([recall] if total_p > 0 else []) + ([tn / total_n] if total_n > 0 else [])
        return {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "balanced_accuracy": float(sum(rates) / len(rates)) if rates else math.nan,
            "exit_rate": (tp + fp) / (total_p + total_n),
        }


class RunningPearson:
    """Pearson's r of two streams, merged batch by batch (Chan et al.'s pairwise update, float64).

    Example:
        >>> r = RunningPearson()
        >>> r.add(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])); r.add(torch.tensor([3.0]), torch.tensor([7.0]))
        >>> round(r.value(), 4)
        0.9934
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean_x = 0.0
        self.mean_y = 0.0
        self.m2x = 0.0
        self.m2y = 0.0
        self.cxy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        a, b = x.detach().reshape(-1).double().cpu(), y.detach().reshape(-1).double().cpu()
        k = int(a.numel())
        if k == 0:
            return
        ma, mb = float(a.mean()), float(b.mean())
        da, db = a - ma, b - mb
        m2a, m2b, cab = float(da @ da), float(db @ db), float(da @ db)
        total = self.n + k
        dx, dy = ma - self.mean_x, mb - self.mean_y
        w = self.n * k / total
        self.m2x += m2a + dx * dx * w
        self.m2y += m2b + dy * dy * w
        self.cxy += cab + dx * dy * w
        self.mean_x += dx * k / total
        self.mean_y += dy * k / total
        self.n = total

    def value(self) -> float:
        """r, NaN when either stream is constant or shorter than 2."""
        denom = math.sqrt(self.m2x * self.m2y)
        return self.cxy / denom if self.n >= 2 and denom > 0 else float("nan")
