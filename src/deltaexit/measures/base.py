"""The one interface every confidence measure implements, and the name registry.

A measure scores the residual-stream state after block ``l`` (0-based) with
*higher = safer to exit*. It declares what it reads and what it costs, in the
style of torchmetrics' class attributes.

Example:
    >>> from deltaexit.measures import get_measure
    >>> m = get_measure("delta-norm")                      # doctest: +SKIP
    >>> m.score(LayerState(layer=2, h_in=h, h_out=h + d))  # doctest: +SKIP
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

__all__ = [
    "ConfidenceMeasure",
    "LayerState",
    "available_measures",
    "get_measure",
    "register_measure",
]


@dataclass
class LayerState:
    """The residual-stream state after block ``layer`` for a set of tokens.

    Tensors share leading token dims (e.g. ``[tokens]`` or ``[batch, seq]``) and end in
    ``hidden``. ``delta`` is derived as ``h_out - h_in`` when not given; ``logits`` is filled
    lazily from ``lens`` and cached, so several lens-based measures share one head call.

    Attributes:
        layer: 0-based block index.
        h_out: State after the block.
        h_in: State before the block (None if unknown).
        num_layers: Total blocks in the model (None if unknown).
        lens: The model's :class:`~deltaexit.lens.Lens` (None if not available).
        topk_probs: Optional precomputed lens top-k probabilities ``[..., k]`` (descending,
            e.g. ``trace.topk_probs[l]``); softmax measures read them instead of calling the lens.
    """

    layer: int
    h_out: torch.Tensor
    h_in: torch.Tensor | None = None
    num_layers: int | None = None
    lens: Any = None
    topk_probs: torch.Tensor | None = None
    _delta: torch.Tensor | None = field(default=None, repr=False)
    _logits: torch.Tensor | None = field(default=None, repr=False)
    _logits_in: torch.Tensor | None = field(default=None, repr=False)

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
        """Lens logits of ``h_out`` (computed once)."""
        if self._logits is None:
            if self.lens is None:
                raise ValueError("this measure needs the lens; build the state with lens=dx.Lens.from_model(model)")
            self._logits = self.lens(self.h_out)
        return self._logits

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
        """Lens logits of ``h_in`` (the previous layer's lens; computed once).

        The early-exit loop passes the previous layer's logits in, so a measure that compares
        consecutive layers pays one lens call per layer, not two.
        """
        if self._logits_in is None:
            if self.h_in is None:
                raise ValueError("this measure needs h_in (the state before the block)")
            if self.lens is None:
                raise ValueError("this measure needs the lens; build the state with lens=dx.Lens.from_model(model)")
            self._logits_in = self.lens(self.h_in)
        return self._logits_in


_REGISTRY: dict[str, type[ConfidenceMeasure]] = {}


class ConfidenceMeasure(ABC):
    """Base class of all confidence measures: ``score(state) -> [tokens]``, higher = exit.

    Class attributes:
        name: Registry name (e.g. ``"delta-norm"``).
        higher_is_better: Always True for scores (kept for torchmetrics-style introspection).
        needs_lens: Reads the lens logits.
        requires_fit: Must be fitted before scoring.
        inputs: Which of ``"h_in"``, ``"h_out"``, ``"delta"`` the score reads.
    """

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_lens: ClassVar[bool] = False
    requires_fit: ClassVar[bool] = False
    inputs: ClassVar[tuple[str, ...]] = ("h_out",)

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
        ValueError: The name is empty or already registered.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`; set a class attribute name = '...'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(
            f"a measure named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__}); choose another name"
        )
    _REGISTRY[cls.name] = cls
    return cls


def available_measures() -> list[str]:
    """Names of all registered measures."""
    return sorted(_REGISTRY)


def get_measure(name: str, **kwargs: Any) -> ConfidenceMeasure:
    """Instantiate the measure registered as ``name``.

    Raises:
        KeyError: Unknown name; the message lists the known ones.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown measure {name!r}; available: {available_measures()}") from None
    return cls(**kwargs)
