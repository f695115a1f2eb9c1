"""What an exit decision costs, as a fraction of one decoder block's FLOPs.

A block's FLOPs per token are counted from its weights (``2 * in * out`` for every
matrix: attention projections and MLP, all experts of an MoE block) plus the attention
scores and weighted sum at a stated context length ``T`` (``4 * T * heads * head_dim``:
``QK^T`` and ``AV`` for one new token attending to ``T`` positions).

Example:
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=2, hidden=32)
    >>> block_flops_per_token(model, context=0) > 0
    True
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deltaexit.measures.base import ConfidenceMeasure
from deltaexit.structure import find_structure

__all__ = ["block_flops_per_token", "measure_cost"]


def _text_config(model: nn.Module) -> Any:
    config = model.config  # type: ignore[attr-defined]
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def block_flops_per_token(model: nn.Module, *, context: int = 256, layer: int = 0) -> float:
    """FLOPs of block ``layer`` for one token at context length ``context``.

    Matrix weights (2-D parameters) count ``2 * numel`` each; attention over ``context``
    positions adds ``4 * context * heads * head_dim``.
    """
    block = find_structure(model, validate=False).blocks[layer]  # counting weights needs no forward
    matmul = sum(2.0 * p.numel() for p in block.parameters() if p.dim() == 2)
    cfg = _text_config(model)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    head_dim = int(getattr(cfg, "head_dim", 0) or (hidden // heads if heads else 0))
    return matmul + 4.0 * context * heads * head_dim


def measure_cost(measure: ConfidenceMeasure, model: nn.Module, *, context: int = 256) -> dict[str, float]:
    """FLOPs per decision of ``measure`` on ``model`` and its fraction of one block.

    Returns:
        ``{"flops_per_decision", "block_flops", "fraction_of_block", "context"}``.
    """
    cfg = _text_config(model)
    hidden = int(cfg.hidden_size)
    vocab = int(cfg.vocab_size)
    flops = float(measure.flops_per_token(hidden, vocab))
    block = block_flops_per_token(model, context=context)
    return {
        "flops_per_decision": flops,
        "block_flops": block,
        "fraction_of_block": flops / block,
        "context": float(context),
    }
