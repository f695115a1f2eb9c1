"""The exit classifier every trainable measure trains: a logistic or one-hidden-layer net, shared or per layer.

Example:
    >>> import torch
    >>> net = ExitNet(in_features=3, hidden_units=4, num_layers=2, per_layer=False)
    >>> net(torch.zeros(5, 3), torch.tensor([0, 1, 0, 1, 1])).shape
    torch.Size([5])
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ExitNet"]


class ExitNet(nn.Module):
    """Logit of "safe to exit" from standardised features, shared or one net per layer.

    A shared net sees the layer through a learned layer embedding added to the first hidden
    layer (a per-layer bias for the logistic net).

    Args:
        in_features: Input width.
        hidden_units: Width of the hidden layer; 0 gives a logistic (linear) classifier.
        num_layers: Number of decision layers the net serves.
        per_layer: One set of weights per layer instead of one shared set.
        generator: Seeded generator for the initialisation.
    """

    def __init__(
        self,
        in_features: int,
        hidden_units: int,
        num_layers: int,
        per_layer: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.hidden_units = hidden_units
        self.num_layers = num_layers
        self.per_layer = per_layer
        groups = num_layers if per_layer else 1
        width = hidden_units if hidden_units > 0 else 1

        def init(*shape: int, fan_in: int) -> nn.Parameter:
            bound = 1.0 / math.sqrt(max(1, fan_in))
            return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)

        self.w1 = init(groups, in_features, width, fan_in=in_features)
        self.b1 = nn.Parameter(torch.zeros(groups, width))
        self.layer_embedding = nn.Parameter(torch.zeros(num_layers, width))
        if hidden_units > 0:
            self.w2 = init(groups, hidden_units, fan_in=hidden_units)
            self.b2 = nn.Parameter(torch.zeros(groups))

    def forward(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Logits ``[n]`` for features ``x [n, in]`` at layer rows ``row [n]`` (0..num_layers-1)."""
        if self.per_layer:
            out = x.new_empty(x.shape[0])
            for g in row.unique().tolist():
                mask = row == g
                out[mask] = self._head(x[mask], g, None)
            return out
        return self._head(x, 0, row)

    def _head(self, x: torch.Tensor, g: int, row: torch.Tensor | None) -> torch.Tensor:
        z = x @ self.w1[g] + self.b1[g]
        if row is not None:
            z = z + self.layer_embedding[row]
        if self.hidden_units == 0:
            return z[:, 0]
        return torch.nn.functional.gelu(z) @ self.w2[g] + self.b2[g]

    def freeze(self) -> ExitNet:
        """Eval mode and no gradients (a fitted or loaded net); returns self."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self
