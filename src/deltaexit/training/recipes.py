"""Training recipes: the loss a training step minimises.

- :class:`PlainRecipe`: next-token cross-entropy at the last layer.
- :class:`LayerSkipRecipe`: LayerSkip's layer dropout rising with depth plus an early-exit loss at every
  layer through the shared lens (curriculum ``all``, ``rotational`` or ``gradual``), or CALM's
  depth-weighted loss (``exit_loss="calm"``). Works on any causal LM :func:`deltaexit.find_structure`
  understands.

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=64)
    >>> recipe = get_recipe("layerskip", p_max=0.1, curriculum="rotational")
    >>> loss, logs = recipe.loss(model, torch.randint(0, 64, (2, 8)), step=0, total_steps=1000)
    >>> loss.ndim, "loss" in logs
    (0, True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from deltaexit.lens import Lens
from deltaexit.training.layerskip import (
    CURRICULA,
    EXIT_LOSSES,
    early_exit_loss,
    exit_loss_weights,
    layer_dropout_schedule,
)

__all__ = ["RECIPES", "LayerSkipRecipe", "PlainRecipe", "get_recipe"]


@dataclass
class PlainRecipe:
    """Next-token cross-entropy at the final layer."""

    name: str = field(default="plain", init=False)

    def loss(self, model: nn.Module, input_ids: torch.Tensor, step: int, total_steps: int) -> tuple[torch.Tensor, dict]:
        out = model(input_ids=input_ids, labels=input_ids)
        return out.loss, {"loss": float(out.loss.detach())}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerSkipRecipe:
    """LayerSkip (layer dropout + early-exit loss) or CALM's depth-weighted loss.

    Args:
        p_max: Dropout probability of the last block (exponential schedule from 0 at the first).
        exit_loss: ``"layerskip"`` (weights rising with depth, with curriculum), ``"calm"`` (weights
            proportional to layer index) or ``"none"`` (final layer only: layer dropout alone).
        curriculum: ``"all"``, ``"rotational"`` or ``"gradual"`` (``exit_loss="layerskip"`` only).
        scale: Early-exit loss scale (``e_scale``) of the non-final layers.
        rotation: Period of the rotational curriculum.
        dropout_warmup: ``"none"`` or ``"exp"`` (dropout rises from 0 over training).
        seed: Seed of the dropout draws.
    """

    p_max: float = 0.1
    exit_loss: str = "layerskip"
    curriculum: str = "rotational"
    scale: float = 1.0
    rotation: int = 2
    dropout_warmup: str = "none"
    seed: int = 0
    name: str = field(default="layerskip", init=False)

    def __post_init__(self) -> None:
        if self.exit_loss not in EXIT_LOSSES:
            raise ValueError(f"unknown --exit-loss {self.exit_loss!r}: choose one of {EXIT_LOSSES}")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"unknown --curriculum {self.curriculum!r}: choose one of {CURRICULA}")
        layer_dropout_schedule(2, self.p_max, 0, 2, self.dropout_warmup)  # validates p_max and warmup
        if self.scale < 0 or self.rotation < 1:
            raise ValueError(f"need --exit-scale >= 0 and --rotation >= 1, got {self.scale}, {self.rotation}")
        self._generator = torch.Generator().manual_seed(self.seed)
        self._lens: Lens | None = None
        self._model_id: int | None = None

    def loss(self, model: nn.Module, input_ids: torch.Tensor, step: int, total_steps: int) -> tuple[torch.Tensor, dict]:
        if self._lens is None or self._model_id != id(model):
            self._lens, self._model_id = Lens.from_model(model), id(model)
        n = self._lens.structure.num_layers
        probs = layer_dropout_schedule(n, self.p_max, step, total_steps, self.dropout_warmup)
        weights = exit_loss_weights(
            n, step, self.exit_loss, self.curriculum, self.scale, self.rotation, total_steps=total_steps
        )
        loss, per_layer = early_exit_loss(
            model, input_ids, weights, drop_probs=probs, generator=self._generator, lens=self._lens
        )
        return loss, {"loss": float(loss.detach()), "final_ce": per_layer[-1]}

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


RECIPES = {"plain": PlainRecipe, "layerskip": LayerSkipRecipe}


def get_recipe(name: str, **kwargs: Any) -> PlainRecipe | LayerSkipRecipe:
    """Build a recipe by name (``plain`` takes no options)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose one of {sorted(RECIPES)}")
    if name == "plain":
        return PlainRecipe()
    return LayerSkipRecipe(**kwargs)
