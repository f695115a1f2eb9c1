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

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

__all__ = [
    "INPUT_NAMES",
    "ConfidenceMeasure",
    "LayerState",
    "available_measures",
    "get_measure",
    "register_measure",
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
    hand a layer's logits on to the next one (``logits_in=``).

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
    """

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_lens: ClassVar[bool] = False
    requires_fit: ClassVar[bool] = False

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
        """Approximate FLOPs of one exit decision for one token."""
        return float(2 * hidden_size)

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
