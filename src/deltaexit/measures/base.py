"""The one interface every confidence measure implements, and the name registry.

A measure scores the residual-stream state after block ``l`` (0-based) with
*higher = safer to exit*. It declares what it reads (:attr:`ConfidenceMeasure.inputs`,
``needs_lens``) and what it costs, in the style of torchmetrics' class attributes; whoever
builds a :class:`LayerState` asks :meth:`ConfidenceMeasure.needs` what to put in it.

Example:
    >>> import torch
    >>> h = torch.ones(2, 4); d = torch.tensor([[0.0] * 4, [1.0] * 4])
    >>> m = get_measure("delta-norm")
    >>> m.needs("h_in"), m.needs("lens")
    (True, False)
    >>> m.score(LayerState(layer=2, h_in=h, h_out=h + d)).tolist()
    [-0.0, -2.0]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

__all__ = [
    "INPUT_NAMES",
    "ConfidenceMeasure",
    "LayerState",
    "available_measures",
    "get_measure",
    "register_measure",
    "threshold_problem",
]

#: What a measure's ``inputs`` may name: the states before and after block ``l`` and its delta.
INPUT_NAMES: tuple[str, ...] = ("h_in", "h_out", "delta")
_NEEDS = (*INPUT_NAMES, "lens")


class LayerState:
    """The residual-stream state after block ``layer`` for a set of tokens.

    Tensors share leading token dims (e.g. ``[tokens]`` or ``[batch, seq]``) and end in
    ``hidden``. ``delta`` is derived as ``h_out - h_in`` when first read; ``logits`` and
    ``logits_in`` are filled lazily from ``lens`` into the public caches ``cached_logits`` and
    ``cached_logits_in``, so several lens-based measures share one head call, and the caller can
    hand a layer's logits on to the next one (``logits_in=``). Candidate-set measures
    (``candidates=K``) pick ``K`` token ids at a token's first scored layer into :attr:`candidates`;
    the later layers' states take them over (:meth:`take_from`) and read only those ``K`` rows of the
    head (:attr:`candidate_logits`), kept apart from the full logits.

    Args:
        layer: 0-based block index.
        h_out: State after the block.
        h_in: State before the block (None if unknown or not needed).
        num_layers: Total blocks in the model (None if unknown).
        lens: The model's :class:`~deltaexit.lens.Lens` (None if not available or not needed).
        topk_probs: Optional precomputed lens top-k probabilities ``[..., k]`` (descending,
            e.g. ``trace.topk_probs[l]``); softmax measures read them instead of calling the lens.
        logits: Lens logits of ``h_out`` if already computed (fills ``cached_logits``).
        logits_in: Lens logits of ``h_in`` if already computed, e.g. the previous layer's
            ``cached_logits`` (fills ``cached_logits_in``).
        delta: ``h_out - h_in`` if already computed.
        candidates: ``[..., K]`` candidate token ids picked at an earlier layer (see :meth:`take_from`).

    Example:
        >>> s = LayerState(layer=0, h_out=torch.ones(1, 2), logits_in=torch.zeros(1, 3))
        >>> s.cached_logits is None, s.logits_in.shape
        (True, torch.Size([1, 3]))
    """

    def __init__(
        self,
        layer: int,
        h_out: torch.Tensor,
        h_in: torch.Tensor | None = None,
        num_layers: int | None = None,
        lens: Any = None,
        topk_probs: torch.Tensor | None = None,
        *,
        logits: torch.Tensor | None = None,
        logits_in: torch.Tensor | None = None,
        delta: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
    ) -> None:
        self.layer = layer
        self.h_out = h_out
        self.h_in = h_in
        self.num_layers = num_layers
        self.lens = lens
        self.topk_probs = topk_probs
        #: Lens logits of ``h_out`` once computed (read/write; None until then).
        self.cached_logits: torch.Tensor | None = logits
        #: Lens logits of ``h_in`` once computed or handed on (read/write; None until then).
        self.cached_logits_in: torch.Tensor | None = logits_in
        self._delta: torch.Tensor | None = delta  # given (e.g. collected), else h_out - h_in on first use
        #: Lens logits of ``h_out`` at :attr:`candidates` only (``[..., K]``; never full-vocabulary logits).
        self.cached_candidate_logits: torch.Tensor | None = None
        #: Lens logits of ``h_in`` at :attr:`candidates` only, e.g. the previous layer's ``cached_candidate_logits``.
        self.cached_candidate_logits_in: torch.Tensor | None = None
        self._candidates: torch.Tensor | None = candidates

    def __repr__(self) -> str:
        has = f"h_in={self.h_in is not None}, lens={self.lens is not None}"
        return f"LayerState(layer={self.layer}, h_out={tuple(self.h_out.shape)}, {has})"

    @property
    def delta(self) -> torch.Tensor:
        """``h_out - h_in`` (computed once)."""
        if self._delta is None:
            if self.h_in is None:
                raise ValueError("this measure needs h_in (or delta); the state has neither")
            self._delta = self.h_out - self.h_in
        return self._delta

    @property
    def logits(self) -> torch.Tensor:
        """Lens logits of ``h_out`` (computed once, kept in ``cached_logits``)."""
        if self.cached_logits is None:
            if self.lens is None:
                raise ValueError("this measure needs the lens; build the state with lens=dx.Lens.from_model(model)")
            self.cached_logits = self.lens(self.h_out)
        return self.cached_logits

    @property
    def cached_logits(self) -> torch.Tensor | None:
        """The lens logits of ``h_out`` if some measure computed (or a caller set) them, else None."""
        return self._logits

    @cached_logits.setter
    def cached_logits(self, value: torch.Tensor | None) -> None:
        self._logits = value

    @property
    def cached_logits_in(self) -> torch.Tensor | None:
        """The lens logits of ``h_in`` if known (handed in, or computed by a measure), else None."""
        return self._logits_in

    @cached_logits_in.setter
    def cached_logits_in(self, value: torch.Tensor | None) -> None:
        self._logits_in = value

    @property
    def logits_in(self) -> torch.Tensor:
        """Lens logits of ``h_in`` (the previous layer's lens; computed once, kept in ``cached_logits_in``).

        The early-exit loop passes the previous layer's logits in, so a measure that compares
        consecutive layers pays one lens call per layer, not two.
        """
        if self.cached_logits_in is None:
            if self.h_in is None:
                raise ValueError("this measure needs h_in (the state before the block)")
            if self.lens is None:
                raise ValueError("this measure needs the lens; build the state with lens=dx.Lens.from_model(model)")
            self.cached_logits_in = self.lens(self.h_in)
        return self.cached_logits_in

    @property
    def candidates(self) -> torch.Tensor | None:
        """``[..., K]`` candidate token ids (long) of these tokens, picked by a candidate-set measure at their first
        scored layer and handed on to the later layers' states; None until picked. Setting new ids drops the
        candidate logits cached for the old ones."""
        return self._candidates

    @candidates.setter
    def candidates(self, value: torch.Tensor | None) -> None:
        if value is not self._candidates:
            self.cached_candidate_logits = None
            self.cached_candidate_logits_in = None
        self._candidates = value

    @property
    def candidate_logits(self) -> torch.Tensor:
        """Lens logits of ``h_out`` at :attr:`candidates` (``[..., K]``; computed once, kept in
        ``cached_candidate_logits``): gathered from the full logits when cached, else ``K`` rows of the head."""
        if self.cached_candidate_logits is None:
            self.cached_candidate_logits = self._at_candidates(self.h_out, self.cached_logits)
        return self.cached_candidate_logits

    @property
    def candidate_logits_in(self) -> torch.Tensor:
        """Lens logits of ``h_in`` at :attr:`candidates` (``[..., K]``; computed once, kept in
        ``cached_candidate_logits_in``)."""
        if self.cached_candidate_logits_in is None:
            if self.h_in is None:
                raise ValueError("this measure needs h_in (the state before the block)")
            self.cached_candidate_logits_in = self._at_candidates(self.h_in, self.cached_logits_in)
        return self.cached_candidate_logits_in

    def _at_candidates(self, h: torch.Tensor, full: torch.Tensor | None) -> torch.Tensor:
        if self.candidates is None:
            raise ValueError("no candidate ids on this state; a candidate-set measure picks them at the first layer")
        if full is not None:
            return full.gather(-1, self.candidates.to(full.device))
        if self.lens is None:
            raise ValueError("this measure needs the lens; build the state with lens=dx.Lens.from_model(model)")
        return self.lens.candidate_logits(h, self.candidates)

    def take_from(self, previous: LayerState) -> LayerState:
        """Take over what an earlier scored layer's state of the same tokens computed; returns self.

        Always its :attr:`candidates`; when ``previous`` is the state after the block right before
        (``previous.layer == self.layer - 1``, so its ``h_out`` is this ``h_in``) also its lens logits, full
        and candidate-only, as this state's ``logits_in`` (one head call per layer, not two).

        Example:
            >>> a = LayerState(layer=2, h_out=torch.ones(1, 2), candidates=torch.tensor([[3, 1]]))
            >>> a.cached_candidate_logits = torch.zeros(1, 2)
            >>> b = LayerState(layer=3, h_out=torch.ones(1, 2), h_in=torch.ones(1, 2)).take_from(a)
            >>> b.candidates.tolist(), b.cached_candidate_logits_in.shape
            ([[3, 1]], torch.Size([1, 2]))
        """
        if self.candidates is None:
            self.candidates = previous.candidates
        if previous.layer != self.layer - 1:
            return self
        if self.cached_logits_in is None:
            self.cached_logits_in = previous.cached_logits
        if self.cached_candidate_logits_in is None and self.candidates is previous.candidates:
            self.cached_candidate_logits_in = previous.cached_candidate_logits
        return self


_REGISTRY: dict[str, type[ConfidenceMeasure]] = {}


class ConfidenceMeasure(ABC):
    """Base class of all confidence measures: ``score(state) -> [tokens]``, higher = exit.

    Class attributes (read by :func:`register_measure`, :meth:`needs` and whoever builds states):
        name: Registry name (e.g. ``"delta-norm"``).
        higher_is_better: Must be True: every score is "higher = safer to exit" (negate a
            score of change); :func:`register_measure` rejects False.
        needs_lens: Reads the lens logits (``state.logits`` / ``logits_in`` / ``topk_probs``).
        requires_fit: Must be fitted before scoring.
        inputs: Which of ``"h_in"``, ``"h_out"``, ``"delta"`` the score reads (a class attribute
            for fixed measures; trainable measures derive it from their ``features``).
        score_range: ``(low, high)``: every score lies in it (``-inf``/``inf`` for an open end);
            :func:`threshold_problem` reads it to flag thresholds no score can pass.
        example_threshold: A threshold that exits a useful share of tokens, named in warnings (None: none known).
    """

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_lens: ClassVar[bool] = False
    requires_fit: ClassVar[bool] = False
    score_range: ClassVar[tuple[float, float]] = (-math.inf, math.inf)
    example_threshold: ClassVar[float | None] = None
    #: Candidate-set size of measures that read only ``K`` rows of the head after a token's first scored layer
    #: (:mod:`deltaexit.measures.candidates`); None: the full vocabulary (or no lens at all).
    candidates: int | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """Which of :data:`INPUT_NAMES` the score reads (default: ``("h_out",)``)."""
        return ("h_out",)

    def needs(self, what: str) -> bool:
        """Whether scoring reads ``what``: ``"h_in"``, ``"h_out"``, ``"delta"`` or ``"lens"``.

        ``"h_in"`` is needed for ``delta`` too; ``"lens"`` is :attr:`needs_lens`.

        Raises:
            ValueError: ``what`` is none of these.
        """
        if what not in _NEEDS:
            raise ValueError(f"needs() takes one of {list(_NEEDS)}, got {what!r}")
        if what == "lens":
            return bool(self.needs_lens)
        inputs = self.inputs
        return what in inputs or (what == "h_in" and "delta" in inputs)

    @abstractmethod
    def score(self, state: LayerState) -> torch.Tensor:
        """Scores of shape ``state.h_out.shape[:-1]``; higher means safer to exit."""

    def flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        """Approximate FLOPs of one exit decision for one token (a later decision, for candidate-set measures)."""
        return float(2 * hidden_size)

    def setup_flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        """Extra FLOPs a token pays once, at its first scored layer, on top of :meth:`flops_per_token`
        (candidate-set measures: the full head that picks the candidates); 0 for most measures."""
        return 0.0

    def check_sizes(self, hidden_size: int, vocab_size: int) -> None:
        """Raise a clear ``ValueError`` when the measure's settings cannot work on a model of these sizes
        (e.g. ``candidates`` >= the vocabulary); the default accepts every model."""
        return None

    def threshold_hint(self, threshold: float) -> str:
        """What ``score >= threshold`` means in the measure's own quantity, e.g. ``" (exits when ‖delta‖ <= 2)"``."""
        return ""

    def __call__(self, state: LayerState) -> torch.Tensor:
        return self.score(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def register_measure(cls: type[ConfidenceMeasure]) -> type[ConfidenceMeasure]:
    """Class decorator that adds a measure to the registry under ``cls.name``.

    Raises:
        ValueError: The name is empty or already registered, ``higher_is_better`` is False, or a
            class-level ``inputs`` names something outside :data:`INPUT_NAMES`.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`; set a class attribute name = '...'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(
            f"a measure named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__}); choose another name"
        )
    if not cls.higher_is_better:
        raise ValueError(f"{cls.__name__}: scores must be higher = safer to exit; negate the score instead")
    low, high = cls.score_range
    if not low <= high:
        raise ValueError(f"{cls.__name__}.score_range must be (low, high) with low <= high, got {cls.score_range}")
    inputs = cls.__dict__.get("inputs")
    if isinstance(inputs, tuple) and not set(inputs) <= set(INPUT_NAMES):
        raise ValueError(f"{cls.__name__}.inputs must name only {list(INPUT_NAMES)}, got {inputs}")
    _REGISTRY[cls.name] = cls
    return cls


def available_measures() -> list[str]:
    """Names of all registered measures."""
    return sorted(_REGISTRY)


def get_measure(name: str, **kwargs: Any) -> ConfidenceMeasure:
    """Instantiate the measure registered as ``name`` with the keyword arguments of its constructor.

    Raises:
        KeyError: Unknown name; the message lists the known ones.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown measure {name!r}; available: {available_measures()}") from None
    return cls(**kwargs)


def _finite_thresholds(threshold: Any) -> list[float]:
    """The finite values of a threshold: a float, per-layer floats, or a schedule (``values(step, num_layers)``)."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        values = [float(threshold)]
    elif isinstance(threshold, torch.Tensor):
        values = [float(v) for v in threshold.reshape(-1)]
    elif isinstance(threshold, Sequence) and not isinstance(threshold, str):
        values = [float(v) for v in threshold]
    elif callable(getattr(threshold, "values", None)):
        n = getattr(threshold, "num_layers", None) or len(getattr(threshold, "thresholds", ())) or 1
        steps = {0, int(getattr(threshold, "max_steps", 0) or 0)}
        values = [float(v) for step in sorted(steps) for v in threshold.values(step, n)]
    else:
        raise TypeError(f"threshold must be a float, per-layer floats or a schedule, got {type(threshold).__name__}")
    return sorted({v for v in values if math.isfinite(v)})


def threshold_problem(measure: ConfidenceMeasure, threshold: Any) -> str | None:
    """What is wrong with ``threshold`` for ``measure`` (a message naming a useful value), or None if nothing.

    A threshold is a problem when no score of the measure's :attr:`~ConfidenceMeasure.score_range` can pass
    it (``score >= threshold`` never holds: it never exits) or when every score passes (it always exits at the
    first scored layer). ``inf`` (the documented never-exit) and ``-inf`` (always exit) are fine, and so is
    every value of a measure whose scores are unbounded. Per-layer thresholds and schedules are checked value by
    value (a schedule at its first and last step).

    Example:
        >>> print(threshold_problem(get_measure("delta-norm"), 0.9))  # doctest: +ELLIPSIS
        delta-norm scores lie in (-inf, 0]; a threshold of 0.9 never exits ...; try e.g. -2 (exits when ‖delta‖ <= 2)...
        >>> threshold_problem(get_measure("softmax-max"), [0.9, float("inf")]) is None
        True
    """
    low, high = measure.score_range
    span = f"{'(' if math.isinf(low) else '['}{low:g}, {high:g}{')' if math.isinf(high) else ']'}"
    example = measure.example_threshold
    if example is not None:
        suggest = f"try e.g. {example:g}{measure.threshold_hint(example)}"
    else:
        suggest = "pick a value inside that range"
    for t in _finite_thresholds(threshold):
        if t > high or (t == high and not math.isinf(high)):
            what = "never exits (no score reaches it)" if t > high else f"exits only on a score of exactly {high:g}"
            also = ", or softmax-max with 0.9" if measure.name != "softmax-max" else ""
            return f"{measure.name} scores lie in {span}; a threshold of {t:g} {what}; {suggest}{also}"
        if t <= low:
            return (
                f"{measure.name} scores lie in {span}; a threshold of {t:g} lets every token exit at the first "
                f"scored layer; pass -inf to mean that, or {suggest}"
            )
    return None
