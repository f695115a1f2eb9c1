"""What an exit decision costs, as a fraction of one decoder block's FLOPs.

A block's FLOPs per token are counted from its weights (``2 * in * out`` for every
matrix: attention projections and MLP, all experts of an MoE block) plus the attention
scores and weighted sum at a stated context length ``T`` (``4 * T * heads * head_dim``:
``QK^T`` and ``AV`` for one new token attending to ``T`` positions). The sizes come from
the model's :class:`~deltaexit.structure.ModelStructure`.

Example:
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=2, hidden=32)
    >>> block_flops_per_token(model, context=0) > 0
    True
    >>> lens_head_flops(hidden_size=4, vocab_size=10)
    130.0
"""

from __future__ import annotations

from torch import nn

from deltaexit.measures.base import ConfidenceMeasure
from deltaexit.structure import find_structure

__all__ = ["block_flops_per_token", "lens_head_flops", "measure_cost"]


def lens_head_flops(hidden_size: int, vocab_size: int) -> float:
    """FLOPs of one lens call for one token: final norm + LM head matmul + softmax."""
    return 2.0 * hidden_size * vocab_size + 5.0 * hidden_size + 3.0 * vocab_size


def block_flops_per_token(model: nn.Module, *, context: int = 256, layer: int = 0) -> float:
    """FLOPs of block ``layer`` for one token at context length ``context``.

    Matrix weights (2-D parameters) count ``2 * numel`` each; attention over ``context``
    positions adds ``4 * context * heads * head_dim``.
    """
    structure = find_structure(model, validate=False)  # counting weights needs no forward
    matmul = sum(2.0 * p.numel() for p in structure.blocks[layer].parameters() if p.dim() == 2)
    heads, head_dim = structure.attention_heads(layer), structure.attention_head_dim(layer)
    return matmul + 4.0 * context * heads * head_dim


def measure_cost(measure: ConfidenceMeasure, model: nn.Module, *, context: int = 256) -> dict[str, float]:
    """FLOPs per decision of ``measure`` on ``model`` and its fraction of one block.

    ``flops_per_decision`` is what every decision costs (for a candidate-set measure, a decision after the
    token's first scored layer: ``K`` rows of the head); ``setup_flops_per_token`` is what a token pays once
    on top, at its first scored layer (the full head that picks the candidates; 0 for most measures). A token
    scored at ``n`` layers costs ``n * flops_per_decision + setup_flops_per_token``.

    Returns:
        ``{"flops_per_decision", "setup_flops_per_token", "block_flops", "fraction_of_block",
        "setup_fraction_of_block", "context"}``.

    Example:
        >>> from deltaexit.measures.base import get_measure
        >>> from deltaexit.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=512)
        >>> full, top8 = (measure_cost(get_measure("softmax-max", candidates=k), model) for k in (None, 8))
        >>> top8["fraction_of_block"] < full["fraction_of_block"], full["setup_flops_per_token"]
        (True, 0.0)
    """
    structure = find_structure(model, validate=False)
    hidden, vocab = structure.hidden_size, structure.vocab_size
    measure.check_sizes(hidden, vocab)
    flops = float(measure.flops_per_token(hidden, vocab))
    setup = float(measure.setup_flops_per_token(hidden, vocab))
    block = block_flops_per_token(model, context=context)
    return {
        "flops_per_decision": flops,
        "setup_flops_per_token": setup,
        "block_flops": block,
        "fraction_of_block": flops / block,
        "setup_fraction_of_block": setup / block,
        "context": float(context),
    }
