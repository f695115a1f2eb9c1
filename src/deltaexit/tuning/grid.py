"""What :func:`~deltaexit.tuning.tune` searches over: :class:`Candidate` settings and the :class:`TuneConfig` grid.

A candidate is one ``EarlyExit`` setting in plain data (a registered, training-free measure by name, a KV policy
name with its settings, a threshold, ``min_exit_layer`` and any further ``EarlyExit`` keywords), so it saves as
JSON and rebuilds the same ``EarlyExit``. The grid is the product of a few tuples in :class:`TuneConfig`: a new
policy setting (an n-gram draft option of ``Verify``) or a new ``EarlyExit`` keyword (a back-off flag) is one more
entry in ``draft_settings`` or ``exit_options``.

Example:
    >>> from deltaexit.testing import tiny_model
    >>> grid = lossless_grid(TuneConfig(exit_layers=(1, 2), draft_settings=({"num_draft": 2},)), num_layers=4)
    >>> [c.name for c in grid]
    ['verify E=1 num_draft=2', 'verify E=2 num_draft=2', 'verify softmax-max>=0.9 num_draft=4']
    >>> ee = grid[1].early_exit(tiny_model("llama", num_layers=4))
    >>> ee.policy, ee.min_exit_layer
    (Verify(num_draft=2, adaptive=False, ngram=3, ngram_draft=16, ngram_min=1), 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import nn

from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.policy import KV_POLICIES
from deltaexit.measures.base import available_measures, get_measure

__all__ = [
    "FIXED_EXIT_MEASURE",
    "Candidate",
    "TuneConfig",
    "calibrated_candidate",
    "check_training_free",
    "lossless_grid",
    "tolerant_candidates",
]

#: The cheapest measure, used where the threshold is ``-inf`` (every row exits at ``min_exit_layer``).
FIXED_EXIT_MEASURE = "delta-norm"


def _float_json(value: float) -> float | str:
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else float(value)


def _float_from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_float_from_json(v) for v in value]
    return float(value) if isinstance(value, (str, int, float)) else value


@dataclass(frozen=True)
class Candidate:
    """One early-exit setting the tuner times.

    Attributes:
        measure: A registered training-free measure name (``"softmax-max"``, ``"delta-norm"``, ...).
        kv: KV policy name (``"verify"``, ``"propagate"``, ``"recompute"``).
        threshold: Exit when ``score >= threshold``: one float (``-inf``: every row exits at ``min_exit_layer``)
            or one per block.
        min_exit_layer: First 1-based layer a row may exit after.
        policy: The KV policy's settings, e.g. ``{"num_draft": 4}`` (its dataclass fields).
        options: Further ``EarlyExit`` keywords (none yet; e.g. a back-off flag once ``EarlyExit`` has one).
        calibrated: The threshold was certified by Learn-then-Test for the tolerance asked.
    """

    measure: str
    kv: str
    threshold: float | list[float]
    min_exit_layer: int = 1
    policy: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    calibrated: bool = False

    @property
    def lossless(self) -> bool:
        """Whether the output is ``model.generate``'s by construction (``verify``)."""
        return self.kv == "verify"

    @property
    def name(self) -> str:
        """A short label, e.g. ``"verify E=2 num_draft=4"`` or ``"recompute softmax-max>=0.93 (LTT)"``."""
        t = self.threshold
        if isinstance(t, float) and t == -math.inf:
            head = f"{self.kv} E={self.min_exit_layer}"
        else:
            shown = f"{t:.3g}" if isinstance(t, float) else "per-layer"
            head = f"{self.kv} {self.measure}>={shown}" + (
                f" E>={self.min_exit_layer}" if self.min_exit_layer > 1 else ""
            )
        extra = " ".join(f"{k}={v}" for k, v in {**self.policy, **self.options}.items())
        return " ".join(p for p in (head, extra, "(LTT)" if self.calibrated else "") if p)

    def kv_policy(self) -> Any:
        """The KV policy object with :attr:`policy`'s settings."""
        if self.kv not in KV_POLICIES:
            raise ValueError(f"unknown kv policy {self.kv!r}; choose one of {sorted(KV_POLICIES)}")
        return KV_POLICIES[self.kv](**self.policy)

    def early_exit(self, model: nn.Module) -> EarlyExit:
        """The :class:`~deltaexit.generation.early_exit.EarlyExit` of this setting on ``model``."""
        return EarlyExit(
            model, get_measure(self.measure), self.threshold, self.kv_policy(), min_exit_layer=self.min_exit_layer,
            **self.options,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``inf`` thresholds as strings)."""
        t = self.threshold
        return {
            "measure": self.measure,
            "kv": self.kv,
            "threshold": [_float_json(v) for v in t] if isinstance(t, list) else _float_json(t),
            "min_exit_layer": self.min_exit_layer,
            "policy": dict(self.policy),
            "options": dict(self.options),
            "calibrated": self.calibrated,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        """Inverse of :meth:`to_dict`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown candidate field(s) {unknown}; a Candidate has {sorted(known)}")
        return cls(**{**d, "threshold": _float_from_json(d["threshold"])})


@dataclass
class TuneConfig:
    """The settings of :func:`~deltaexit.tuning.tune` (every keyword of ``tune`` but the data).

    Attributes:
        tolerance: Tolerated token disagreement with ``model.generate``, in [0, 1); 0 = identical output.
        max_new_tokens: New tokens per timed and calibrated prompt.
        timing_prompts: How many of the prompts (the first ones) are timed.
        screen_prompts: How many of those time every candidate once (the coarse round).
        keep: Candidates re-timed in the fine round.
        repeats: Alternated repeats of the fine round (median and spread over these).
        budget_s: Wall-clock budget of the timing (None: none); the coarse round stops taking new candidates
            when it is spent, the fine round keeps at least 3 repeats.
        max_candidates: Most candidates timed (calibrated ones first, then the grid in the order below; None: all).
        exit_layers: Fixed exit layers ``E`` of the ``threshold=-inf`` ``verify`` drafts (None: ``1 .. L // 2``).
        draft_settings: ``Verify`` settings tried at each fixed exit layer (one dict per try).
        verify_measure: Measure of the thresholded ``verify`` candidates.
        verify_thresholds: Its thresholds (with ``verify_draft``).
        verify_draft: ``Verify`` settings of the thresholded candidates.
        exit_options: ``EarlyExit`` keyword sets tried with every candidate (``({},)``: the defaults).
        calibrated: ``(measure, kv)`` pairs calibrated by Learn-then-Test when ``tolerance > 0``.
        calibrated_min_exit_layer: ``min_exit_layer`` of the calibrated candidates.
        tolerant_exit_layers: Fixed exit layers of the ``kv="tolerant"`` candidates (``verify`` that also accepts
            drafts within a Learn-then-Test calibrated ``ratio`` of the full model's top-1) when ``tolerance > 0``;
            ``()``: none.
        tolerant_draft: ``Tolerant`` settings tried at each of those layers (with the certified ``ratio``).
        epsilon: Learn-then-Test error level (the guarantee holds with probability ``1 - epsilon``).
        bound: Learn-then-Test bound (``"hb"``, ``"hoeffding"``, ``"bentkus"``).
        grid_fraction: Share of the prompts that builds the calibration's threshold grid.
        num_thresholds: Calibration candidate thresholds.
        progress: tqdm progress bars.
    """

    tolerance: float = 0.0
    max_new_tokens: int = 64
    timing_prompts: int = 8
    screen_prompts: int = 2
    keep: int = 4
    repeats: int = 5
    budget_s: float | None = None
    max_candidates: int | None = None
    exit_layers: tuple[int, ...] | None = None
    draft_settings: tuple[dict[str, Any], ...] = (
        {"num_draft": 2},
        {"num_draft": 3},
        {"num_draft": 4},
        {"num_draft": 6},
    )
    verify_measure: str = "softmax-max"
    verify_thresholds: tuple[float, ...] = (0.9,)
    verify_draft: dict[str, Any] = field(default_factory=lambda: {"num_draft": 4})
    exit_options: tuple[dict[str, Any], ...] = ({},)
    calibrated: tuple[tuple[str, str], ...] = (("softmax-max", "recompute"),)
    calibrated_min_exit_layer: int = 1
    tolerant_exit_layers: tuple[int, ...] = (1, 2)
    tolerant_draft: tuple[dict[str, Any], ...] = ({"num_draft": 4}, {"num_draft": 6})
    epsilon: float = 0.1
    bound: str = "hb"
    grid_fraction: float = 0.2
    num_thresholds: int = 32
    progress: bool = True

    def with_settings(self, **settings: Any) -> TuneConfig:
        """A copy with ``settings`` replaced; an unknown name raises a TypeError listing the known ones."""
        known = [f.name for f in fields(self)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise TypeError(f"unknown tune setting(s) {unknown}; TuneConfig has {known}")
        return replace(self, **settings)

    def check(self, num_layers: int) -> None:
        """Raise ``ValueError`` for settings no search can use (called before anything runs)."""
        t = self.tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
            raise ValueError(
                f"tolerance must lie in [0, 1) (0 = output identical to model.generate, 0.01 = 1% of tokens may "
                f"differ), got {t!r}"
            )
        for name in ("max_new_tokens", "timing_prompts", "screen_prompts", "keep", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0 seconds (or None for no budget), got {self.budget_s!r}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1 (or None for the whole grid), got {self.max_candidates}")
        for name in ("exit_layers", "tolerant_exit_layers"):
            bad = [e for e in getattr(self, name) or () if not 1 <= e < num_layers]
            if bad:
                raise ValueError(f"{name} {bad} outside 1..{num_layers - 1} (the model has {num_layers} layers)")
        for measure in {self.verify_measure, *(m for m, _ in self.calibrated)}:
            check_training_free(measure)


def check_training_free(measure: str) -> None:
    """Raise ``ValueError`` unless ``measure`` is a registered measure that needs no fitting."""
    if measure not in available_measures():
        raise ValueError(f"unknown measure {measure!r}; the tuner takes one of {available_measures()}")
    if getattr(get_measure(measure), "requires_fit", False):
        raise ValueError(
            f"measure {measure!r} must be fitted; the tuner searches training-free measures only "
            "(calibrate a fitted measure with dx.calibrate instead)"
        )


def _default_exit_layers(num_layers: int) -> tuple[int, ...]:
    return tuple(range(1, max(1, num_layers // 2) + 1)) if num_layers > 1 else ()


def lossless_grid(config: TuneConfig, num_layers: int) -> list[Candidate]:
    """The ``verify`` candidates: fixed exit layers x draft settings, then thresholded drafts, x exit options."""
    layers = config.exit_layers if config.exit_layers is not None else _default_exit_layers(num_layers)
    out: list[Candidate] = []
    for options in config.exit_options:
        for exit_layer in layers:
            for draft in config.draft_settings:
                out.append(Candidate(FIXED_EXIT_MEASURE, "verify", -math.inf, exit_layer, dict(draft), dict(options)))
        for threshold in config.verify_thresholds:
            draft = dict(config.verify_draft)
            out.append(Candidate(config.verify_measure, "verify", float(threshold), 1, draft, dict(options)))
    return out


def calibrated_candidate(
    measure: str, kv: str, threshold: Any, config: TuneConfig, options: dict[str, Any]
) -> Candidate:
    """The candidate of a certified threshold (a float or a per-layer list)."""
    value: float | list[float] = [float(v) for v in threshold] if isinstance(threshold, list) else float(threshold)
    return Candidate(measure, kv, value, config.calibrated_min_exit_layer, {}, dict(options), calibrated=True)


def tolerant_candidates(ratio: float, exit_layer: int, config: TuneConfig) -> list[Candidate]:
    """The ``kv="tolerant"`` candidates of a certified ``ratio`` drafting from ``exit_layer``: one per
    ``tolerant_draft`` setting and exit option."""
    out: list[Candidate] = []
    for options in config.exit_options:
        for draft in config.tolerant_draft:
            policy = {**draft, "ratio": float(ratio)}
            out.append(Candidate(FIXED_EXIT_MEASURE, "tolerant", -math.inf, exit_layer, policy, dict(options), True))
    return out
