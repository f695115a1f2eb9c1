"""What early-exit generation returns: the sequences, each token's exit layer, and the compute it took.

Example:
    >>> import torch
    >>> from deltaexit.generation.early_exit import EarlyExit
    >>> from deltaexit.testing import ConstantScore, tiny_model
    >>> ee = EarlyExit(tiny_model("llama", num_layers=4), ConstantScore(), 0.5, "propagate", min_exit_layer=2)
    >>> out = ee.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, pad_token_id=0, return_dict_in_generate=True)
    >>> out.sequences.shape, out.exit_layers.tolist(), out.stats.implied_speedup
    (torch.Size([1, 7]), [[4, 2, 2, 2]], 2.0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers.generation import GenerateDecoderOnlyOutput

__all__ = ["EarlyExitOutput", "GenerationStats"]


@dataclass
class GenerationStats:
    """Compute counters of one early-exit ``generate`` call (the prompt's forward is counted apart).

    Attributes:
        num_layers: Blocks in the model (L).
        policy: The KV policy.
        decode_steps: Generated positions after the first token (each would be one full-depth forward).
        blocks_run: Block calls on the batch while decoding (a call runs one block for every row).
        full_depth_blocks: ``decode_steps * L``: block calls a full-depth decode makes.
        token_blocks_run: Sum over forwards of block calls times the tokens in that forward.
        kv_only_calls: Blocks run only up to their key/value projections (``propagate``).
        state_calls: Skipped recurrent blocks (linear attention, Mamba) run until their mixer stored its state from
            the exit state (``propagate``); priced as whole blocks by ``CostModel`` (an upper bound).
        measure_calls: Calls of the confidence measure.
        measure_block_fraction: FLOPs of one measure call as a fraction of one block's FLOPs
            (``measure.flops_per_token(hidden, vocab)`` over :func:`deltaexit.measures.cost.block_flops_per_token`
            at the mean decode context); 0 when unknown.
        prompt_blocks: Block calls of the prompt's forward (L).
        drafted: Draft tokens proposed (``verify``), n-gram drafts included.
        accepted: Draft tokens accepted (``verify``), n-gram drafts included.
        ngram_drafted: Of ``drafted``, the n-gram drafts (``Verify(ngram=...)``: prompt-lookup drafts, no compute).
        ngram_accepted: Of ``accepted``, the n-gram drafts.
        rounds: Draft/verify rounds (``verify``) or held-back tokens re-run (``recompute``).
        backoff_steps: Plain full-depth steps (the model's own forward) run instead of early exit by the pay-off
            monitor (:mod:`deltaexit.generation.backoff`), probes included.
        probe_steps: Of ``backoff_steps``, those that only measured a full-depth step's time.
        backoffs: Times the monitor found early exit losing and backed off to full-depth decoding.
        retries: Times early exit was tried again after backing off.
        tokens: Real (non-padding) generated tokens.
        mean_exit_layer: Mean 1-based exit layer of the real generated tokens.
        time_s: Wall-clock seconds of the whole call.
    """

    num_layers: int
    policy: str
    decode_steps: int = 0
    blocks_run: int = 0
    full_depth_blocks: int = 0
    token_blocks_run: int = 0
    kv_only_calls: int = 0
    state_calls: int = 0
    measure_calls: int = 0
    measure_block_fraction: float = 0.0
    prompt_blocks: int = 0
    drafted: int = 0
    accepted: int = 0
    ngram_drafted: int = 0
    ngram_accepted: int = 0
    rounds: int = 0
    backoff_steps: int = 0
    probe_steps: int = 0
    backoffs: int = 0
    retries: int = 0
    tokens: int = 0
    mean_exit_layer: float = float("nan")
    time_s: float = 0.0

    @property
    def blocks_saved(self) -> float:
        """Share of the full-depth decode's block calls that were not run (negative if more were run)."""
        if self.full_depth_blocks == 0:
            return 0.0
        return 1.0 - self.blocks_run / self.full_depth_blocks

    @property
    def implied_speedup(self) -> float:
        """``full_depth_blocks / blocks_run``: the decode speed-up the saved blocks imply."""
        return self.full_depth_blocks / self.blocks_run if self.blocks_run else float("nan")

    @property
    def measure_block_equivalents(self) -> float:
        """``measure_calls * measure_block_fraction``: the measure's cost counted in blocks."""
        return self.measure_calls * self.measure_block_fraction

    @property
    def implied_speedup_with_measure(self) -> float:
        """``full_depth_blocks / (blocks_run + measure_block_equivalents)``: the speed-up the saved blocks imply
        once the exit decisions are paid for (the figure the speed benchmark compares wall-clock against)."""
        cost = self.blocks_run + self.measure_block_equivalents
        return self.full_depth_blocks / cost if cost else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted (``verify``)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict, derived figures included."""
        d = asdict(self)
        d.update(
            blocks_saved=self.blocks_saved,
            implied_speedup=self.implied_speedup,
            measure_block_equivalents=self.measure_block_equivalents,
            implied_speedup_with_measure=self.implied_speedup_with_measure,
            acceptance_rate=self.acceptance_rate,
        )
        return d


@dataclass
class EarlyExitOutput(GenerateDecoderOnlyOutput):
    """Result of :meth:`deltaexit.EarlyExit.generate` with ``return_dict_in_generate=True``.

    A :class:`transformers.generation.GenerateDecoderOnlyOutput` (what ``model.generate`` returns for
    decoder-only sampling and greedy search: same fields, same dict and tuple access) with two fields added.

    Attributes:
        sequences: ``[batch, prompt + new]`` token ids, as ``model.generate`` returns them.
        scores: With ``output_scores=True``, as ``model.generate``: one ``[batch, vocab]`` tensor per generated
            token, the processed scores it was chosen from (at its exit layer; for ``verify``, the full model's
            scores at that position, so greedy ``verify`` returns ``model.generate``'s scores). Otherwise None.
        logits: With ``output_logits=True``, the same for the raw float32 logits (before the processors).
        cache: The KV cache after generation.
        exit_layers: ``[batch, new]`` 1-based layer each generated token came from (L = full depth; 0 = padding
            after the row finished).
        stats: :class:`GenerationStats`.
    """

    exit_layers: torch.LongTensor | None = None
    stats: GenerationStats | None = None
