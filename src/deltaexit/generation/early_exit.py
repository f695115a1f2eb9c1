"""Token-level early-exit ``generate()`` for any ``transformers`` causal LM.

After each block from ``min_exit_layer`` on, a confidence measure scores the residual-stream state of every
row; a row exits when its score reaches the threshold, and its next token comes from the exact lens at that
layer. The blocks after the last exit of a step are not run. The skipped layers' KV cache is kept consistent
by one of three policies (see :mod:`deltaexit.generation.kv`).

Everything ``model.generate`` prepares (generation config, logits processors incl. sampling warpers, stopping
criteria, attention mask and position ids, the cache) is prepared by ``model.generate`` itself: this module is
its ``custom_generate`` decoding loop, and the blocks are run with exactly the arguments the model's own
forward gives them (:class:`~deltaexit.generation.runner.BlockRunner`).

Example:
    >>> import deltaexit as dx
    >>> ee = dx.EarlyExit(model, measure="delta-norm", threshold=0.9, kv="verify")   # doctest: +SKIP
    >>> out = ee.generate(ids, attention_mask=mask, max_new_tokens=32,
    ...                   return_dict_in_generate=True)                              # doctest: +SKIP
    >>> out.sequences, out.exit_layers, out.stats.implied_speedup                   # doctest: +SKIP
    >>> model.generate(ids, custom_generate=ee.custom_generate, max_new_tokens=32)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from deltaexit.exits import ThresholdSchedule, as_schedule
from deltaexit.generation.kv import (
    KV_POLICIES,
    UnsupportedCacheError,
    cache_view,
    check_cache,
    crop_cache,
    fresh_cache,
    store_kv_only,
)
from deltaexit.generation.outputs import EarlyExitOutput, GenerationStats
from deltaexit.generation.runner import BlockRunner
from deltaexit.generation.speculative import speculative_token
from deltaexit.lens import Lens
from deltaexit.measures.base import ConfidenceMeasure, LayerState, get_measure
from deltaexit.measures.cost import block_flops_per_token
from deltaexit.structure import find_structure

__all__ = ["EarlyExit"]

# GenerationConfig fields whose non-default values this loop cannot honour, with what to do instead.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "num_beams": (1, "beam search is not supported; use num_beams=1"),
    "num_beam_groups": (1, "group beam search is not supported"),
    "penalty_alpha": (None, "contrastive search is not supported"),
    "prompt_lookup_num_tokens": (
        None,
        "prompt-lookup decoding is not supported (kv='verify' is self-speculative)",
    ),
    "assistant_early_exit": (
        None,
        "assistant_early_exit is transformers' own self-speculation; use kv='verify' with min_exit_layer instead",
    ),
    "output_attentions": (False, "output_attentions is not supported"),
    "output_hidden_states": (False, "output_hidden_states is not supported; use dx.collect"),
}


def _plain_processors(processors: Any) -> list[Any]:
    """The logits processors as a plain list, checked once (``LogitsProcessorList`` re-inspects every call)."""
    if processors is None:
        return []
    plain = list(processors)
    for processor in plain:
        params = inspect.signature(processor.__call__).parameters
        if len(params) > 2:
            raise ValueError(
                f"EarlyExit: the logits processor {type(processor).__name__} needs extra arguments "
                f"{list(params)[2:]}; only processors called as processor(input_ids, scores) are supported"
            )
    return plain


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, copied if it is a view (a view of verify's ``[B, chunk, V]`` logits would keep the whole chunk)."""
    return t.clone() if t is not None and t._base is not None else t


@dataclass
class _Step:
    depth: int  # blocks run
    exit_layer: torch.Tensor  # [B] 1-based; 0 for finished rows; depth for rows that did not exit
    logits_fn: Any  # () -> [B, V] float32 logits at each row's exit (or at depth), computed on demand
    all_exited: bool  # every active row exited before reaching max_depth
    states: list[torch.Tensor] | None  # states[l] = output after l blocks ([B, T, H]); states[0] = embeddings
    calls: list[Any]


class _Run:
    """Mutable state of one generate call (sequences, kwargs, finished rows, exit layers, stats)."""

    def __init__(
        self,
        ee: EarlyExit,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        streamer,
        model_kwargs,
    ) -> None:
        self.ee = ee
        self.model = ee.model
        self.input_ids = input_ids
        self.prompt_len = input_ids.shape[1]
        self.processors = _plain_processors(logits_processor)
        self.stopping = stopping_criteria
        self.do_sample = bool(generation_config.do_sample)
        self.pad = generation_config._pad_token_tensor
        self.has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        if self.has_eos and self.pad is None:
            raise ValueError("eos_token_id is set but pad_token_id is not; pass pad_token_id=... to generate")
        if self.pad is not None:
            self.pad = self.pad.to(input_ids.device)
        self.streamer = streamer
        self.model_kwargs = model_kwargs
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        self.done = False
        self.exit_cols: list[torch.Tensor] = []
        returns_dict = bool(generation_config.return_dict_in_generate)
        # model.generate's output_scores / output_logits: per generated token, the processed scores and the raw
        # float32 logits it was chosen from (at its exit layer; the full model's for verify's emitted tokens).
        self.score_cols: list[torch.Tensor] | None = (
            [] if returns_dict and getattr(generation_config, "output_scores", False) else None
        )
        self.logit_cols: list[torch.Tensor] | None = (
            [] if returns_dict and getattr(generation_config, "output_logits", False) else None
        )
        self.max_length = getattr(stopping_criteria, "max_length", None)
        self.stats = GenerationStats(num_layers=ee.num_layers, policy=ee.kv)
        self.accept_rate = 0.8  # verify's running per-draft acceptance (adaptive_draft), optimistic start
        self.draft_depth = float(ee.min_exit_layer)  # verify's running draft depth (adaptive_draft)

    @property
    def cache(self) -> DynamicCache:
        return self.model_kwargs["cache"]

    @property
    def step(self) -> int:
        """Index of the next token to generate (0 = the first after the prompt)."""
        return len(self.exit_cols)

    def extended(self, ids: torch.Tensor, kwargs: dict[str, Any], tokens: torch.Tensor):
        ids = torch.cat([ids, tokens[:, None]], dim=-1)
        kwargs = self.model._update_model_kwargs_for_generation({"cache": self.cache}, dict(kwargs), num_new_tokens=1)
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
            self.score_cols.append(_own(scores))
        if self.logit_cols is not None:
            self.logit_cols.append(_own(logits))
        if self.has_eos:
            tokens = tokens * self.unfinished + self.pad * (1 - self.unfinished)
        exits = exits * self.unfinished
        self.input_ids, self.model_kwargs = self.extended(self.input_ids, self.model_kwargs, tokens)
        self.exit_cols.append(exits)
        if self.streamer is not None:
            self.streamer.put(tokens.cpu())
        self.unfinished = self.unfinished & ~self.stopping(self.input_ids, None)
        self.done = bool(self.unfinished.max() == 0)

    def scores(self, prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
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


class EarlyExit:
    """Early-exit generation for a ``transformers`` causal LM.

    Args:
        model: The causal LM (eval mode).
        measure: A registered measure name (e.g. ``"delta-norm"``) or a
            :class:`~deltaexit.measures.ConfidenceMeasure` instance; higher scores exit earlier.
        threshold: Exit when ``score >= threshold``: one float, one per block (0-based; missing = never), or a
            :class:`~deltaexit.exits.ThresholdSchedule` (e.g. CALM's ``DecayingThreshold``).
            ``float('inf')`` never exits.
        kv: KV policy for skipped layers: ``"verify"`` (lossless self-speculation), ``"propagate"`` (CALM) or
            ``"recompute"`` (EE-LLM / FREE).
        min_exit_layer: First 1-based layer after which a row may exit.
        num_draft: Most draft tokens per round (``verify``).
        adaptive_draft: ``verify`` only: choose each round's draft budget in ``0..num_draft`` from the running
            acceptance rate and draft depth, maximising expected tokens per block (0 = a plain full-depth step
            when drafts keep being rejected, e.g. at batch > 1 where every row must accept). Output is unchanged
            (still lossless); only the speed differs.
        max_pending: Most tokens held back before a full-depth step is forced (``recompute``).
        lens: The lens (built from the model if not given).

    Example:
        >>> ee = EarlyExit(model, measure=my_measure, threshold=0.8, kv="propagate")   # doctest: +SKIP
        >>> out = ee.generate(ids, max_new_tokens=16, return_dict_in_generate=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        measure: str | ConfidenceMeasure = "delta-norm",
        threshold: float | Sequence[float] | ThresholdSchedule = 0.9,
        kv: str = "verify",
        *,
        min_exit_layer: int = 1,
        num_draft: int = 4,
        adaptive_draft: bool = False,
        max_pending: int = 8,
        lens: Lens | None = None,
    ) -> None:
        if not hasattr(model, "generate"):
            raise TypeError(f"expected a transformers causal LM with .generate, got {type(model).__name__}")
        self.model = model
        self.structure = find_structure(model)
        self.lens = lens if lens is not None else Lens(self.structure)
        self.runner = BlockRunner(model, self.structure)
        self.num_layers = self.structure.num_layers
        if isinstance(measure, str):
            measure = get_measure(measure)
        if not isinstance(measure, ConfidenceMeasure):
            raise TypeError(
                f"measure must be a registered name or a ConfidenceMeasure instance, got {type(measure).__name__}"
            )
        self.measure = measure
        if kv not in KV_POLICIES:
            raise ValueError(f"unknown kv policy {kv!r}; choose one of {list(KV_POLICIES)}")
        self.kv = kv
        if not isinstance(min_exit_layer, int) or not 1 <= min_exit_layer <= self.num_layers:
            raise ValueError(f"min_exit_layer must be an int in [1, {self.num_layers}], got {min_exit_layer!r}")
        self.min_exit_layer = min_exit_layer
        if num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.num_draft, self.max_pending = int(num_draft), int(max_pending)
        self.adaptive_draft = bool(adaptive_draft)
        self.schedule = as_schedule(threshold, self.num_layers)
        self.last_output: EarlyExitOutput | None = None

    def __repr__(self) -> str:
        return (
            f"EarlyExit(measure={self.measure!r}, threshold={self.schedule!r}, kv={self.kv!r}, "
            f"min_exit_layer={self.min_exit_layer}, layers={self.num_layers})"
        )

    # ------------------------------------------------------------------ public entry points
    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> EarlyExitOutput | torch.LongTensor:
        """Generate with early exits; takes ``model.generate``'s arguments.

        Supported: ``attention_mask``, ``generation_config``, ``max_new_tokens``/``max_length``,
        ``eos_token_id`` (int or list), ``pad_token_id``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``
        (and any other logits processor ``model.generate`` builds), ``logits_processor``,
        ``stopping_criteria``, ``stop_strings`` (with ``tokenizer``), ``streamer``, ``return_dict_in_generate``,
        ``output_scores``, ``output_logits``. Beam search, contrastive search, assisted decoding
        (``assistant_model``, ``assistant_early_exit``, prompt lookup) and
        ``output_attentions``/``output_hidden_states`` raise ``ValueError``.

        Returns:
            ``[batch, prompt + new]`` sequences, or an :class:`EarlyExitOutput` with
            ``return_dict_in_generate=True``. The output is also kept as ``self.last_output``.
        """
        if "custom_generate" in kwargs:
            raise ValueError("EarlyExit.generate sets custom_generate itself; do not pass it")
        if kwargs.get("assistant_model") is not None:
            raise ValueError(
                "EarlyExit: assisted decoding (assistant_model) is not supported; kv='verify' drafts with the "
                "model's own early exits"
            )
        self._stop_strings_to_criteria(kwargs)
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs["cache"] = fresh_cache()
        kwargs["ee_streamer"] = kwargs.get("streamer")
        return self.model.generate(inputs, custom_generate=self.custom_generate, **kwargs)

    def _stop_strings_to_criteria(self, kwargs: dict[str, Any]) -> None:
        """Turn ``stop_strings`` + ``tokenizer`` into a stopping criterion, in place.

        ``model.generate`` drops ``tokenizer`` before calling a ``custom_generate`` callable, so it cannot build
        the stop-string criterion itself; we build it here and hand it in with ``stopping_criteria``.
        """
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        stop = kwargs.get("stop_strings", getattr(config, "stop_strings", None))
        tokenizer = kwargs.pop("tokenizer", None)
        if not stop:
            return
        if tokenizer is None:
            raise ValueError("EarlyExit: stop_strings need the model's tokenizer; pass tokenizer=... to generate")
        from transformers import StoppingCriteriaList
        from transformers.generation.stopping_criteria import StopStringCriteria

        criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop))
        kwargs["stopping_criteria"] = criteria
        kwargs["stop_strings"] = None  # built above; model.generate could not (it has no tokenizer here)

    @property
    def custom_generate(self):
        """The decoding loop to pass as ``model.generate(..., custom_generate=ee.custom_generate)``.

        ``model.generate`` does not hand its ``streamer`` to custom loops: pass it as ``ee_streamer=`` too. It drops
        ``tokenizer`` as well, so ``stop_strings`` work through :meth:`generate` only (or pass a
        ``StopStringCriteria`` in ``stopping_criteria``).
        """
        return self._decode

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def _decode(
        self,
        model: nn.Module,
        input_ids: torch.LongTensor,
        logits_processor: Any = None,
        stopping_criteria: Any = None,
        generation_config: Any = None,
        synced_gpus: bool = False,
        streamer: Any = None,
        ee_streamer: Any = None,
        **model_kwargs: Any,
    ) -> EarlyExitOutput | torch.LongTensor:
        if model is not self.model:
            raise ValueError("this EarlyExit was built for another model")
        self._check_config(generation_config, synced_gpus, model_kwargs)
        started = time.perf_counter()
        cache = model_kwargs.get("cache")
        if isinstance(cache, DynamicCache) and cache.get_seq_length() == 0:
            if any(type(layer) is not DynamicLayer for layer in cache.layers):
                model_kwargs["cache"] = fresh_cache()  # croppable full-length layers; masks keep sliding windows
        elif cache is None or cache.get_seq_length() != 0:
            raise UnsupportedCacheError(
                "early-exit generation starts from an empty DynamicCache; do not pass a filled cache"
            )
        run = _Run(
            self,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            streamer if streamer is not None else ee_streamer,
            model_kwargs,
        )

        # The prompt: the model's own full-depth forward (also tells the runner the blocks' output type).
        handle = self.runner.probe_output_type() if self.runner.returns_tuple is None else None
        try:
            outputs = model._prefill(input_ids, generation_config, run.model_kwargs)
        finally:
            if handle is not None:
                handle.remove()
        if outputs.get("cache") is not None:
            run.model_kwargs["cache"] = outputs["cache"]
        check_cache(run.cache, self.num_layers, input_ids.shape[1])
        run.stats.prompt_blocks = self.num_layers
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        del outputs
        token, _, scores = run.choose(run.input_ids, logits)
        run.append(token, torch.full_like(token, self.num_layers), scores, logits)

        while not run.done:
            if self.kv == "verify":
                self._verify_round(run)
            elif self.kv == "propagate":
                self._propagate_step(run)
            else:
                self._recompute_step(run)

        if run.streamer is not None:
            run.streamer.end()
        return self._finish(run, started, generation_config)

    def _finish(self, run: _Run, started: float, generation_config: Any) -> EarlyExitOutput | torch.LongTensor:
        stats = run.stats
        exit_layers = (
            torch.stack(run.exit_cols, dim=1) if run.exit_cols else run.input_ids.new_zeros((run.input_ids.shape[0], 0))
        )
        stats.decode_steps = max(0, len(run.exit_cols) - 1)
        stats.full_depth_blocks = stats.decode_steps * self.num_layers
        real = exit_layers > 0
        stats.tokens = int(real.sum())
        stats.mean_exit_layer = float(exit_layers[real].float().mean()) if stats.tokens else float("nan")
        context = (run.input_ids.shape[1] + run.prompt_len) // 2  # mean decode context
        stats.measure_block_fraction = self._measure_block_fraction(context)
        stats.time_s = time.perf_counter() - started
        out = EarlyExitOutput(
            sequences=run.input_ids,
            exit_layers=exit_layers,
            stats=stats,
            cache=run.cache,
            scores=tuple(run.score_cols) if run.score_cols is not None else None,
            logits=tuple(run.logit_cols) if run.logit_cols is not None else None,
        )
        self.last_output = out
        if generation_config.return_dict_in_generate:
            return out
        return run.input_ids

    def _measure_block_fraction(self, context: int) -> float:
        """One measure call's FLOPs over one block's FLOPs at ``context`` (0 if either is unknown)."""
        try:
            cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else None
            cfg = cfg if cfg is not None else self.model.config
            flops = float(self.measure.flops_per_token(int(cfg.hidden_size), int(cfg.vocab_size)))
            block = block_flops_per_token(self.model, context=context)
        except (AttributeError, TypeError, ValueError, NotImplementedError):
            return 0.0
        return flops / block if block > 0 and math.isfinite(flops) else 0.0

    def _check_config(self, generation_config: Any, synced_gpus: bool, model_kwargs: dict[str, Any]) -> None:
        for name, (default, message) in _UNSUPPORTED.items():
            value = getattr(generation_config, name, default)
            if value is not None and value != default and not (default is None and value is None):
                raise ValueError(f"EarlyExit: {message} (got {name}={value!r})")
        if synced_gpus:
            raise ValueError("EarlyExit: synced_gpus is not supported")
        if generation_config.use_cache is False or "cache" not in model_kwargs:
            raise ValueError("EarlyExit needs the KV cache; do not pass use_cache=False")
        impl = getattr(generation_config, "cache_implementation", None)
        if impl not in (None, "dynamic"):
            raise ValueError(f"EarlyExit supports the dynamic cache only, got cache_implementation={impl!r}")
        if model_kwargs.get("inputs_embeds") is not None:
            raise ValueError("EarlyExit takes input_ids, not inputs_embeds")

    # ------------------------------------------------------------------ one forward with exits
    def _model_inputs(self, run: _Run, ids: torch.Tensor, kwargs: dict[str, Any], start: int, end: int):
        kw = dict(kwargs)
        for key in ("attention_mask", "position_ids", "token_type_ids"):
            value = kw.get(key)
            if isinstance(value, torch.Tensor) and value.shape[-1] > end:
                kw[key] = value[..., :end]
        return self.model.prepare_inputs_for_generation(ids[:, :end], next_sequence_length=end - start, **kw)

    def _forward(
        self,
        run: _Run,
        ids: torch.Tensor,
        kwargs: dict[str, Any],
        start: int,
        *,
        max_depth: int,
        exits: bool,
        freeze: bool,
        keep_states: bool,
        step: int,
    ) -> _Step:
        """Run tokens ``ids[:, start:]`` block by block; rows exit on their last position's score."""
        end = ids.shape[1]
        hidden, calls = self.runner.record(**self._model_inputs(run, ids, kwargs, start, end))
        batch, n_tok = hidden.shape[0], hidden.shape[1]
        active = run.unfinished.bool()
        exited = ~active
        exit_layer = torch.zeros(batch, dtype=torch.long, device=hidden.device)
        exit_state = hidden[:, -1].clone()
        cached_logits: torch.Tensor | None = None
        have_logits = torch.zeros(batch, dtype=torch.bool, device=hidden.device)
        thresholds = self.schedule.values(step, self.num_layers)
        states = [hidden] if keep_states else None
        stats = run.stats
        depth, h, all_exited = 0, hidden, False
        any_frozen = False  # whether an active row has exited (tracked on the host: no sync per block)
        prev_logits: torch.Tensor | None = None
        for layer in range(max_depth):
            out = self.runner.run_block(layer, h, calls[layer])
            stats.blocks_run += 1
            stats.token_blocks_run += n_tok
            if freeze and any_frozen:
                frozen = (exited & active)[:, None, None]
                out = torch.where(frozen, h, out)
            h_prev, h = h, out
            depth = layer + 1
            if states is not None:
                states.append(h)
            threshold = thresholds[layer]
            logits_in, prev_logits = prev_logits, None  # valid only for the block right after the one scored
            if exits and self.min_exit_layer <= depth < self.num_layers and threshold != math.inf:
                state = LayerState(
                    layer=layer,
                    h_out=h[:, -1],
                    h_in=h_prev[:, -1],
                    num_layers=self.num_layers,
                    lens=self.lens,
                    _logits_in=logits_in,  # the previous layer's lens of this h_in, when a measure made it
                )
                score = self.measure.score(state)
                prev_logits = state._logits
                stats.measure_calls += 1
                new = (score >= threshold) & ~exited
                # One device-to-host transfer per scored block (the exit decision needs one; a GPU pays per sync).
                has_nan, any_new, now_all = torch.stack(
                    (torch.isnan(score).any(), new.any(), (exited | new).all())
                ).tolist()
                if has_nan:
                    raise ValueError(f"the measure {self.measure!r} returned NaN at layer {depth}")
                if any_new:
                    exit_layer = torch.where(new, depth, exit_layer)
                    exit_state = torch.where(new[:, None], h[:, -1], exit_state)
                    if state._logits is not None:
                        lg = state._logits.float()
                        cached_logits = lg if cached_logits is None else torch.where(new[:, None], lg, cached_logits)
                        have_logits |= new
                    exited = exited | new
                    any_frozen = True
                    if now_all:
                        all_exited = True
                        break
        remaining = active & (exit_layer == 0)
        exit_layer = torch.where(remaining, depth, exit_layer)
        exit_state = torch.where(remaining[:, None], h[:, -1], exit_state)
        lens = self.lens

        def logits() -> torch.Tensor:
            if cached_logits is not None and bool(have_logits[active].all()):
                return cached_logits
            fresh = lens(exit_state[:, None, :])[:, 0].float()
            if cached_logits is not None:
                fresh = torch.where(have_logits[:, None], cached_logits, fresh)
            return fresh

        return _Step(depth, exit_layer, logits, all_exited, states, calls)

    # ------------------------------------------------------------------ policies
    def _propagate_step(self, run: _Run) -> None:
        start = run.cache.get_seq_length()
        res = self._forward(
            run,
            run.input_ids,
            run.model_kwargs,
            start,
            max_depth=self.num_layers,
            exits=True,
            freeze=True,
            keep_states=True,
            step=run.step,
        )
        if res.depth < self.num_layers:
            h_exit = res.states[-1]  # every active row is frozen at its exit state
            for layer in range(res.depth, self.num_layers):
                store_kv_only(
                    run.cache,
                    layer,
                    lambda layer=layer: self.runner.run_block(layer, h_exit, res.calls[layer]),
                    block=self.runner.blocks[layer],
                )
                run.stats.kv_only_calls += 1
        logits = res.logits_fn()
        token, _, scores = run.choose(run.input_ids, logits)
        run.append(token, res.exit_layer, scores, logits)

    def _recompute_step(self, run: _Run) -> None:
        start = run.cache.get_seq_length()
        held_back = run.input_ids.shape[1] - start
        exits = held_back <= self.max_pending
        res = self._forward(
            run,
            run.input_ids,
            run.model_kwargs,
            start,
            max_depth=self.num_layers,
            exits=exits,
            freeze=False,
            keep_states=False,
            step=run.step,
        )
        if res.depth < self.num_layers:
            crop_cache(run.cache, start)  # held back: re-run with the next token that goes deep
            run.stats.rounds += 1
        logits = res.logits_fn()
        token, _, scores = run.choose(run.input_ids, logits)
        run.append(token, res.exit_layer, scores, logits)

    # Per-forward overhead (recording pass, lens, bookkeeping) in block equivalents, for the draft budget.
    _FORWARD_OVERHEAD_BLOCKS = 1.0
    _ACCEPT_PRIOR = 0.5

    def _draft_budget(self, run: _Run) -> int:
        """Drafts to allow this round: argmax over k of expected tokens per block-equivalent of cost."""
        alpha = min(max(run.accept_rate, 0.0), 0.99)
        L, o = self.num_layers, self._FORWARD_OVERHEAD_BLOCKS
        m = min(max(run.draft_depth, 1.0), L)
        best_k, best = 0, 1.0 / (L + o)  # k = 0: one plain full-depth step
        tokens = 1.0
        for k in range(1, self.num_draft + 1):
            tokens += alpha**k  # expected emitted tokens with k drafts: 1 + a + ... + a^k
            cost = (k + 1) * (m + o) + (L - m) + o
            if tokens / cost > best:
                best_k, best = k, tokens / cost
        return best_k

    def _learn_acceptance(self, run: _Run, drafted: int, accepted: int, depth: int) -> None:
        """Update the running per-draft acceptance rate and draft depth (exponential moving averages)."""
        if drafted == 0:  # no evidence this round: drift back to the prior so drafting is retried
            run.accept_rate += 0.1 * (self._ACCEPT_PRIOR - run.accept_rate)
            return
        failures = 1 if accepted < drafted else 0
        rate = accepted / (accepted + failures)
        run.accept_rate = 0.6 * run.accept_rate + 0.4 * rate
        run.draft_depth = 0.6 * run.draft_depth + 0.4 * depth

    def _verify_round(self, run: _Run) -> None:
        L = self.num_layers
        cache = run.cache
        start = cache.get_seq_length()  # x0 (the last token) is in input_ids, not yet in the cache
        room = (run.max_length - run.input_ids.shape[1]) if run.max_length is not None else self.num_draft + 1
        k_max = max(0, min(self.num_draft, room - 1))
        if self.adaptive_draft:
            k_max = min(k_max, self._draft_budget(run))
        ids, kwargs = run.input_ids, run.model_kwargs
        cap = L
        chunk_states: list[list[torch.Tensor]] = []
        drafts: list[torch.Tensor] = []
        draft_exits: list[torch.Tensor] = []
        draft_probs: list[torch.Tensor | None] = []
        while True:
            j = len(drafts)
            res = self._forward(
                run,
                ids,
                kwargs,
                start + j,
                max_depth=cap,
                exits=j < k_max,
                freeze=False,
                keep_states=True,
                step=run.step + j,
            )
            chunk_states.append(res.states)
            if j >= k_max or not res.all_exited:
                break
            token, probs, _ = run.choose(ids, res.logits_fn())
            drafts.append(token)
            draft_exits.append(res.exit_layer)
            draft_probs.append(probs)
            ids, kwargs = run.extended(ids, kwargs, token)
            cap = min(cap, res.depth)
        n_chunk = len(chunk_states)
        m = cap
        # Verification: the shallow layers' cache (< m) is the draft's; the deep layers run once over the chunk.
        crop_cache(cache, start, range(m, L))
        h = torch.cat([states[m] for states in chunk_states], dim=1)
        if m < L:
            with cache_view(cache, start):
                _, calls = self.runner.record(**self._model_inputs(run, ids, kwargs, start, start + n_chunk))
            for layer in range(m, L):
                h = self.runner.run_block(layer, h, calls[layer])
                run.stats.blocks_run += 1
                run.stats.token_blocks_run += n_chunk
        target = self.lens(h).float()  # [B, n_chunk, V]
        active = run.unfinished.bool()
        emitted: list[torch.Tensor] = []
        exits: list[torch.Tensor] = []
        full = torch.full_like(run.unfinished, L)
        prefix = run.input_ids
        step_scores: list[torch.Tensor] = []  # the full model's processed scores at each emitted position
        for i in range(n_chunk):
            scores = run.scores(prefix, target[:, i])
            step_scores.append(scores)  # every iteration emits exactly one token
            if i == n_chunk - 1:  # every draft so far accepted by all rows: the bonus token
                tok, _ = run.pick(scores)
                emitted.append(tok)
                exits.append(full)
                break
            draft = drafts[i]
            if run.do_sample:
                ok, tok = speculative_token(draft, torch.softmax(scores, dim=-1), draft_probs[i])
                if bool(ok[active].all()):
                    emitted.append(draft)
                    exits.append(draft_exits[i])
                    prefix = torch.cat([prefix, draft[:, None]], dim=-1)
                    continue
                emitted.append(tok)
                exits.append(torch.where(ok, draft_exits[i], full))
                break
            target_tok = scores.argmax(dim=-1)
            if bool((target_tok == draft)[active].all()):
                emitted.append(draft)
                exits.append(draft_exits[i])
                prefix = torch.cat([prefix, draft[:, None]], dim=-1)
                continue
            emitted.append(target_tok)
            exits.append(full)
            break
        accepted = len(emitted) - 1
        if self.adaptive_draft:
            self._learn_acceptance(run, len(drafts), accepted, m)
        run.stats.drafted += len(drafts)
        run.stats.accepted += accepted
        run.stats.rounds += 1
        crop_cache(cache, start + len(emitted))
        for i, (tok, ex) in enumerate(zip(emitted, exits)):
            run.append(tok, ex, step_scores[i], target[:, i])
            if run.done:
                break
