"""The exact logit lens: a residual-stream state after any block -> the model's logits.

:class:`Lens` applies the model's own final norm, post-norm modules, LM head and
logit steps (scaling, soft-capping), so on the last block's output it reproduces
the model's logits. In ``transformers`` the last entry of ``output_hidden_states``
is already normed: feed the lens block *outputs* (what :func:`deltaexit.collect`
captures), not that entry.

Example:
    >>> from deltaexit.collector import collect
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> lens = Lens.from_model(model)
    >>> with collect(model, capture=("h_out",)) as trace:
    ...     logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    >>> torch.allclose(lens(trace.h_out[-1]), logits, atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltaexit.structure import ModelStructure, find_structure

__all__ = ["Lens"]


class Lens:
    """Maps hidden states (block outputs) to logits, exactly as the model's own head does.

    Args:
        structure: The model's :class:`~deltaexit.structure.ModelStructure`.

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> lens = Lens.from_model(tiny_model("llama"))
        >>> ids, probs = lens.topk(torch.zeros(2, lens.structure.hidden_size), k=5)
        >>> ids.shape, probs.shape
        (torch.Size([2, 5]), torch.Size([2, 5]))
    """

    def __init__(self, structure: ModelStructure) -> None:
        self.structure = structure

    @classmethod
    def from_model(cls, model: nn.Module, **overrides: Any) -> Lens:
        """Build the lens of ``model``; keywords override discovery (see :func:`find_structure`)."""
        return cls(find_structure(model, **overrides))

    @property
    def vocab_size(self) -> int:
        """Number of logits the head produces."""
        return self.structure.vocab_size

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the final norm and post-norm modules (the state the head reads)."""
        return self.structure.normalize(h)

    def logits_from_normalized(self, h: torch.Tensor) -> torch.Tensor:
        """Head and logit steps applied to an already normalised state."""
        return self.structure.head_logits(h)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states ``h`` of shape ``[..., hidden]``."""
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"the lens takes a tensor of hidden states, got {type(h).__name__}")
        return self.structure.unembed(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Alias of ``lens(h)``."""
        return self(h)

    def candidate_logits(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits of only the candidate tokens ``ids`` (``[..., K]``): ``lens(h).gather(-1, ids)`` at ``K / vocab``
        of the head's cost (see :meth:`~deltaexit.structure.ModelStructure.candidate_logits`).

        Example:
            >>> from deltaexit.testing import tiny_model
            >>> lens = Lens.from_model(tiny_model("llama"))
            >>> h = torch.randn(2, lens.structure.hidden_size)
            >>> ids = lens(h).topk(3, dim=-1).indices
            >>> torch.allclose(lens.candidate_logits(h, ids), lens(h).topk(3, dim=-1).values, atol=1e-5)
            True
        """
        if not isinstance(h, torch.Tensor) or not isinstance(ids, torch.Tensor):
            raise TypeError("candidate_logits takes a tensor of hidden states and a tensor of token ids")
        return self.structure.candidate_logits(h, ids)

    def probs(self, h: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (float32) over the vocabulary."""
        return torch.softmax(self(h).float(), dim=-1)

    def topk(self, h: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` token ids and their probabilities (float32), each ``[..., k]``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        probs = self.probs(h)
        values, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return ids, values

    def __repr__(self) -> str:
        return f"Lens({self.structure.describe()})"
