"""The mutable state of one early-exit ``generate`` call: sequences, kwargs, finished rows, exit layers, stats.

:class:`Run` does what ``model.generate``'s own loop does per token (logits processors, argmax or sampling,
padding finished rows, stopping criteria, streamer) so that every KV policy appends tokens the same way.
"""

from __future__ import annotations

import time
from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache

from deltaexit.generation.checks import plain_processors
from deltaexit.generation.outputs import EarlyExitOutput, GenerationStats

__all__ = ["Run", "owned"]


def owned(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, copied if it is a view (a view of verify's ``[B, chunk, V]`` logits would keep the whole chunk)."""
    return t.clone() if t is not None and t._base is not None else t


class Run:
    """Mutable state of one generate call.

    Args:
        model: The causal LM.
        input_ids: ``[batch, prompt]`` prompt ids.
        logits_processor: The processors ``model.generate`` built (or None).
        stopping_criteria: The stopping criteria ``model.generate`` built.
        generation_config: The call's generation config.
        streamer: A streamer (or None).
        model_kwargs: ``model.generate``'s model kwargs (attention mask, cache, ...), updated in place.
        num_layers: Blocks in the model.
        policy: The KV policy's name (for the stats).
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        logits_processor: Any,
        stopping_criteria: Any,
        generation_config: Any,
        streamer: Any,
        model_kwargs: dict[str, Any],
        *,
        num_layers: int,
        policy: str,
    ) -> None:
        self.started = time.perf_counter()
        self.model: Any = model  # a transformers causal LM (its generation helpers are not typed on nn.Module)
        self.num_layers = num_layers
        self.input_ids = input_ids
        self.prompt_len = input_ids.shape[1]
        self.processors = plain_processors(logits_processor)
        self.stopping = stopping_criteria
        self.do_sample = bool(generation_config.do_sample)
        self.returns_dict = bool(generation_config.return_dict_in_generate)
        self.pad = generation_config._pad_token_tensor
        self.has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        if self.has_eos and self.pad is None:
            raise ValueError("eos_token_id is set but pad_token_id is not; pass pad_token_id=... to generate")
        if self.pad is not None:
            self.pad = self.pad.to(input_ids.device)
        eos = [torch.as_tensor(c.eos_token_id).flatten() for c in stopping_criteria if hasattr(c, "eos_token_id")]
        #: The end-of-sequence ids (None without any): drafting stops at one, as the round's output would.
        self.eos: torch.Tensor | None = torch.cat(eos).to(input_ids.device) if eos else None
        self.eos_ids: frozenset[int] = frozenset(self.eos.tolist()) if self.eos is not None else frozenset()
        self.streamer = streamer
        self.model_kwargs = model_kwargs
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        self.done = False
        self.just_finished = False  # the last append finished at least one row (read with done: no extra sync)
        self.exit_cols: list[torch.Tensor] = []
        # model.generate's output_scores / output_logits: per generated token, the processed scores and the raw
        # float32 logits it was chosen from (at its exit layer; the full model's for verify's emitted tokens).
        self.score_cols: list[torch.Tensor | None] | None = (
            [] if self.returns_dict and getattr(generation_config, "output_scores", False) else None
        )
        self.logit_cols: list[torch.Tensor | None] | None = (
            [] if self.returns_dict and getattr(generation_config, "output_logits", False) else None
        )
        self.max_length = getattr(stopping_criteria, "max_length", None)
        self.stats = GenerationStats(num_layers=num_layers, policy=policy)

    @property
    def cache(self) -> DynamicCache:
        """The KV cache of the call."""
        return self.model_kwargs["cache"]

    @property
    def step(self) -> int:
        """Index of the next token to generate (0 = the first after the prompt)."""
        return len(self.exit_cols)

    def extended(
        self, ids: torch.Tensor, kwargs: dict[str, Any], tokens: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``ids`` and model kwargs with one more token per row (``tokens`` ``[B]``), or ``n`` more (``[B, n]``):
        attention mask and positions extended as generate does."""
        new = tokens[:, None] if tokens.dim() == 1 else tokens
        ids = torch.cat([ids, new], dim=-1)
        kwargs = self.model._update_model_kwargs_for_generation(
            {"cache": self.cache}, dict(kwargs), num_new_tokens=new.shape[1]
        )
        return ids, kwargs

    def append(
        self,
        tokens: torch.Tensor,
        exits: torch.Tensor,
        scores: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
    ) -> None:
        """Add one token per row, as ``model.generate`` does (padding finished rows, stopping criteria, streamer),
        with the processed ``scores`` and raw ``logits`` it was chosen from (kept when asked for)."""
        if self.score_cols is not None:
            self.score_cols.append(owned(scores))
        if self.logit_cols is not None:
            self.logit_cols.append(owned(logits))
        if self.has_eos:
            tokens = tokens * self.unfinished + self.pad * (1 - self.unfinished)
        exits = exits * self.unfinished
        self.input_ids, self.model_kwargs = self.extended(self.input_ids, self.model_kwargs, tokens)
        self.exit_cols.append(exits)
        if self.streamer is not None:
            self.streamer.put(tokens.cpu())
        before = self.unfinished
        self.unfinished = self.unfinished & ~self.stopping(self.input_ids, None)
        done, changed = torch.stack(((self.unfinished.max() == 0), (before != self.unfinished).any())).tolist()
        self.done, self.just_finished = bool(done), bool(changed)

    def ends_a_row(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Whether ``tokens`` (``[B]``) is an end-of-sequence token in an unfinished row: a 0-d bool tensor (not
        read here), None without end-of-sequence ids."""
        if self.eos is None:
            return None
        return (torch.isin(tokens, self.eos) & self.unfinished.bool()).any()

    def scores(self, prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` through the logits processors, given the ``prefix`` ids."""
        for processor in self.processors:
            logits = processor(prefix, logits)
        return logits

    def choose(
        self, prefix: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Next tokens from float32 logits; also the probabilities when sampling, and the processed scores."""
        scores = self.scores(prefix, logits)
        tokens, probs = self.pick(scores)
        return tokens, probs, scores

    def pick(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next tokens from processed scores (argmax, or a sample); also the probabilities when sampling."""
        if self.do_sample:
            probs = torch.softmax(scores, dim=-1)
            return torch.multinomial(probs, num_samples=1).squeeze(1), probs
        return torch.argmax(scores, dim=-1), None

    @property
    def mean_context(self) -> int:
        """The mean decode context (prompt plus half the generated tokens)."""
        return (self.input_ids.shape[1] + self.prompt_len) // 2

    def output(self, measure_block_fraction: float) -> EarlyExitOutput:
        """The call's :class:`EarlyExitOutput`, its stats completed (decode steps, tokens, exit layer, time)."""
        stats = self.stats
        ids = self.input_ids
        exit_layers = torch.stack(self.exit_cols, dim=1) if self.exit_cols else ids.new_zeros((ids.shape[0], 0))
        stats.decode_steps = max(0, len(self.exit_cols) - 1)
        stats.full_depth_blocks = stats.decode_steps * self.num_layers
        real = exit_layers > 0
        stats.tokens = int(real.sum())
        stats.mean_exit_layer = float(exit_layers[real].float().mean()) if stats.tokens else float("nan")
        stats.measure_block_fraction = measure_block_fraction
        stats.time_s = time.perf_counter() - self.started
        return EarlyExitOutput(
            sequences=cast(torch.LongTensor, ids),
            exit_layers=cast(torch.LongTensor, exit_layers),
            stats=stats,
            cache=self.cache,
            scores=tuple(self.score_cols) if self.score_cols is not None else None,  # type: ignore[arg-type]
            logits=tuple(self.logit_cols) if self.logit_cols is not None else None,  # type: ignore[arg-type]
        )
