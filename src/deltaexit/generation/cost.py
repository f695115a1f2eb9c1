"""The speed-up early exit can reach at best: a FLOP model of a decode step, from the model's weights.

``GenerationStats.implied_speedup`` (``L / blocks run``) counts decoder blocks only. A decode step does more:
the LM head runs once per token on both sides (the exit's lens is a full head), and under ``kv="propagate"``
every skipped block still computes its keys/values from the exit state. :class:`CostModel` counts those from
the weights (``2 * in * out`` per matrix), so :meth:`CostModel.speedup` is what a perfect implementation
reaches where time follows FLOPs (or bytes of weights read, which is the same count at batch 1), and
:meth:`CostModel.share_ceiling` is the largest share of ``L / blocks run`` any implementation can reach.

The model may live on the ``meta`` device: nothing is computed, so the ceiling of a 70B configuration costs no
memory.

Example:
    >>> from deltaexit.testing import tiny_model
    >>> cost = CostModel.from_model(tiny_model("llama", num_layers=4, hidden=32, vocab=128))
    >>> round(cost.speedup(blocks_per_token=4), 6)   # never exiting saves nothing
    1.0
    >>> cost.share_ceiling(blocks_per_token=2) < 1.0  # the head and propagate's K/V are not free
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import nn

from deltaexit.aliases import FUSED_QKV_NAMES, QKV_NAMES
from deltaexit.generation.kv import fresh_cache, has_state, layers_of
from deltaexit.generation.outputs import GenerationStats
from deltaexit.generation.policy import KVPolicy, get_policy
from deltaexit.measures.base import ConfidenceMeasure
from deltaexit.measures.cost import block_flops_per_token
from deltaexit.structure import find_structure, query_projection

__all__ = ["CostModel", "kv_only_flops", "measure_block_fraction", "measure_setup_block_fraction"]

# Names of attention projections a K/V-only call runs: the separate ones structure discovery knows, and fused ones.
_KV_PROJECTIONS = frozenset(name for names in QKV_NAMES for name in names) | frozenset(FUSED_QKV_NAMES)


def kv_only_flops(block: nn.Module, *, query_skip: bool = True) -> float:
    """FLOPs per token of ``propagate``'s K/V-only call in ``block``: its key/value projections, plus the query
    projection where it is fused with them or ``query_skip`` is off (``Propagate(query_skip=False)``).
    """
    found = query_projection(block) if query_skip else None
    projection: Any = found[0]._modules[found[1]] if found is not None else None
    skipped = {id(p) for p in projection.parameters()} if projection is not None else set()
    total = 0.0
    for name, p in block.named_parameters():
        if id(p) in skipped or p.dim() != 2:
            continue
        if any(part in _KV_PROJECTIONS for part in name.split(".")):
            total += 2.0 * p.numel()
    return total


@dataclass(frozen=True)
class CostModel:
    """FLOPs per token of one decode step's parts, and the speed-ups they allow.

    Attributes:
        num_layers: Decoder blocks (L).
        block_flops: One block for one token at ``context`` (weights plus attention over the context).
        head_flops: The LM head for one token (paid once per token by early exit and by the full model).
        kv_only_flops: One K/V-only call of ``propagate`` (see :func:`kv_only_flops`).
        context: Context length the attention FLOPs were counted at.
        recurrent_share: Share of the blocks whose cache is a recurrent state (linear attention, Mamba): a skipped
            one costs ``propagate`` a state call (:attr:`state_call_blocks`) instead of a K/V-only call.
    """

    num_layers: int
    block_flops: float
    head_flops: float
    kv_only_flops: float
    context: int
    recurrent_share: float = 0.0

    @classmethod
    def from_model(cls, model: nn.Module, *, context: int = 256, query_skip: bool = True) -> CostModel:
        """Count the parts from ``model``'s weights (block 0 stands for every block; ``meta`` weights are fine).

        Args:
            model: A ``transformers`` causal LM.
            context: Context length for the attention FLOPs of a block.
            query_skip: Whether K/V-only calls skip a separate query projection (as
                :class:`~deltaexit.generation.propagate.Propagate`'s field of the same name).
        """
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        structure = find_structure(model, validate=False)
        head = structure.lm_head
        head_params = sum(p.numel() for p in head.parameters() if p.dim() == 2)
        if head_params == 0:
            raise ValueError(f"the LM head {type(head).__name__} has no weight matrix to count")
        layers = layers_of(fresh_cache(getattr(model, "config", None)))
        return cls(
            num_layers=structure.num_layers,
            block_flops=block_flops_per_token(model, context=context),
            head_flops=2.0 * head_params,
            kv_only_flops=kv_only_flops(structure.blocks[0], query_skip=query_skip),
            context=int(context),
            recurrent_share=sum(has_state(layer) for layer in layers) / len(layers) if layers else 0.0,
        )

    @property
    def head_blocks(self) -> float:
        """The LM head in block equivalents."""
        return self.head_flops / self.block_flops

    @property
    def kv_only_blocks(self) -> float:
        """One K/V-only call in block equivalents."""
        return self.kv_only_flops / self.block_flops

    #: ``propagate``'s update of a skipped recurrent layer's state from the exit state
    #: (:func:`deltaexit.generation.recurrent.advance_state`), in block equivalents: it runs the block's mixer up to
    #: its state update (the input projections, convolution and scan), priced as the whole block (an upper bound).
    state_call_blocks: ClassVar[float] = 1.0

    @property
    def skipped_call_blocks(self) -> float:
        """``propagate``'s call for one skipped block in block equivalents: a K/V-only call, or a state call for the
        :attr:`recurrent_share` of recurrent blocks."""
        share = self.recurrent_share
        return (1.0 - share) * self.kv_only_blocks + share * self.state_call_blocks

    def _check(self, blocks_per_token: float) -> None:
        if not 0 < blocks_per_token <= self.num_layers:
            raise ValueError(f"blocks_per_token must be in (0, {self.num_layers}], got {blocks_per_token}")

    def speedup(
        self,
        blocks_per_token: float,
        *,
        kv: str | KVPolicy = "propagate",
        measure_blocks_per_token: float = 0.0,
        kv_only_per_token: float | None = None,
    ) -> float:
        """The FLOP speed-up of decoding with ``blocks_per_token`` blocks run per token, head included.

        Args:
            blocks_per_token: Mean blocks run per generated token (``L`` = no exit).
            kv: The KV policy (name or instance); ``propagate`` pays a K/V-only call per skipped block unless
                ``kv_only_per_token`` says otherwise, the others none (``KVPolicy.kv_only_per_skipped_block``).
            measure_blocks_per_token: The exit decisions' cost in block equivalents per token.
            kv_only_per_token: K/V-only (or, in recurrent blocks, state) calls per token (default:
                ``L - blocks_per_token`` for ``propagate``), each priced :attr:`skipped_call_blocks`.
        """
        self._check(blocks_per_token)
        per_skipped = get_policy(kv).kv_only_per_skipped_block
        if kv_only_per_token is None:
            kv_only_per_token = (self.num_layers - blocks_per_token) * per_skipped if per_skipped else 0.0
        full = self.num_layers + self.head_blocks
        ours = (
            blocks_per_token
            + measure_blocks_per_token
            + kv_only_per_token * self.skipped_call_blocks
            + self.head_blocks
        )
        return full / ours

    def share_ceiling(self, blocks_per_token: float, **kwargs: Any) -> float:
        """:meth:`speedup` over ``L / (blocks_per_token + measure_blocks_per_token)``: the largest share of the
        blocks-implied speed-up (measure cost included) that any implementation can reach."""
        implied = self.num_layers / (blocks_per_token + kwargs.get("measure_blocks_per_token", 0.0))
        return self.speedup(blocks_per_token, **kwargs) / implied

    def speedup_of(self, stats: GenerationStats) -> float:
        """The FLOP speed-up of one early-exit ``generate`` call's decode steps, from its :class:`GenerationStats`
        (blocks, measure calls, K/V-only calls, ``propagate``'s recurrent-state calls priced as whole blocks, and one
        head per decode step on both sides)."""
        if stats.num_layers != self.num_layers:
            raise ValueError(f"stats are for {stats.num_layers} layers, this cost model for {self.num_layers}")
        head = stats.decode_steps * self.head_blocks
        full = stats.full_depth_blocks + head
        kv_only = stats.kv_only_calls * self.kv_only_blocks + stats.state_calls * self.state_call_blocks
        ours = stats.blocks_run + stats.measure_block_equivalents + kv_only + head
        return full / ours if ours else float("nan")

    def to_dict(self) -> dict[str, float]:
        """JSON-friendly dict, block equivalents included."""
        d: dict[str, float] = dict(asdict(self))
        d.update(head_blocks=self.head_blocks, kv_only_blocks=self.kv_only_blocks)
        d.update(state_call_blocks=self.state_call_blocks)
        return d


def measure_block_fraction(model: nn.Module, measure: ConfidenceMeasure, context: int) -> float:
    """One ``measure`` call's FLOPs over one block's FLOPs at ``context`` (0 if either is unknown).

    For a candidate-set measure (``candidates=K``) this is a call after the token's first scored layer (``K``
    rows of the head); the first scored layer of each forward pays :func:`measure_setup_block_fraction` on top.

    Example:
        >>> from deltaexit.measures.base import get_measure
        >>> from deltaexit.testing import tiny_model
        >>> 0 < measure_block_fraction(tiny_model("llama", num_layers=2), get_measure("softmax-max"), 8) < 10
        True
    """
    return _over_block(model, measure.flops_per_token, context)


def measure_setup_block_fraction(model: nn.Module, measure: ConfidenceMeasure, context: int) -> float:
    """What ``measure`` pays once per token at its first scored layer, on top of :func:`measure_block_fraction`,
    over one block's FLOPs (candidate-set measures: the full head that picks the candidates; 0 for the others).

    Example:
        >>> from deltaexit.measures.base import get_measure
        >>> from deltaexit.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=2)
        >>> measure_setup_block_fraction(model, get_measure("softmax-max"), 8)
        0.0
        >>> measure_setup_block_fraction(model, get_measure("softmax-max", candidates=8), 8) > 0
        True
    """
    return _over_block(model, measure.setup_flops_per_token, context)


def _over_block(model: nn.Module, flops_of: Callable[[int, int], float], context: int) -> float:
    """``flops_of(hidden, vocab)`` over one block's FLOPs per token at ``context``; 0 where either is unknown."""
    try:
        structure = find_structure(model, validate=False)
        flops = float(flops_of(structure.hidden_size, structure.vocab_size))
        block = block_flops_per_token(model, context=context)
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return 0.0
    return flops / block if block > 0 and math.isfinite(flops) else 0.0
