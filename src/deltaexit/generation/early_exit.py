"""Token-level early-exit ``generate()`` for any ``transformers`` causal LM.

After each block from ``min_exit_layer`` on, a confidence measure scores the residual-stream state of every
row; a row exits when its score reaches the threshold, and its next token comes from the exact lens at that
layer (:mod:`deltaexit.generation.scan`). The blocks after the last exit of a step are not run. The skipped
layers' KV cache is kept consistent by a KV policy (:mod:`deltaexit.generation.policy`).

Everything ``model.generate`` prepares (generation config, logits processors incl. sampling warpers, stopping
criteria, attention mask and position ids, the cache) is prepared by ``model.generate`` itself: this module is
its ``custom_generate`` decoding loop, and the blocks are run with exactly the arguments the model's own
forward gives them (:class:`~deltaexit.generation.runner.BlockRunner`).

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=4)
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> ee = EarlyExit(model, measure="softmax-max", threshold=float("-inf"), kv="verify", min_exit_layer=2)
    >>> out = ee.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    >>> out.sequences.shape, out.exit_layers.shape
    (torch.Size([1, 6]), torch.Size([1, 3]))
    >>> seqs = model.generate(ids, custom_generate=ee.custom_generate, max_new_tokens=3, pad_token_id=0)
    >>> torch.equal(seqs, out.sequences)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar, cast

import torch
from torch import nn
from transformers import Cache

from deltaexit.exits import ThresholdSchedule, as_schedule
from deltaexit.generation.backoff import (
    PRIOR_POLICIES,
    Backoff,
    PayoffMonitor,
    PlainTimes,
    as_backoff,
    block_cost,
    prior_cost,
)
from deltaexit.generation.checks import (
    cache_on_for_loop,
    cache_window,
    check_cache_support,
    check_generate_kwargs,
    check_generation_config,
    check_min_exit_layer,
    check_model,
    default_threshold,
    keeps_own_state_cache,
    resolve_measure,
    start_cache,
    stop_strings_to_criteria,
    warn_threshold,
)
from deltaexit.generation.cost import measure_block_fraction
from deltaexit.generation.kv import check_cache, config_layer_types, fresh_cache, noting_writes
from deltaexit.generation.outputs import EarlyExitOutput
from deltaexit.generation.policy import KVPolicy, get_policy
from deltaexit.generation.run import Run
from deltaexit.generation.runner import BlockRunner
from deltaexit.generation.scan import ExitScan
from deltaexit.generation.skipped import check_text_only, fill_skipped_layers
from deltaexit.generation.statecache import (
    PrefixCache,
    own_cache_class,
    own_state_cache,
    side_state_cache,
    state_argument,
    state_cache,
)
from deltaexit.lens import Lens
from deltaexit.measures.base import ConfidenceMeasure
from deltaexit.structure import find_structure

__all__ = ["EarlyExit"]

T = TypeVar("T")


class EarlyExit:
    """Early-exit generation for a ``transformers`` causal LM.

    Args:
        model: The causal LM (eval mode).
        measure: A registered measure name (e.g. ``"delta-norm"``) or a
            :class:`~deltaexit.measures.ConfidenceMeasure` instance; higher scores exit earlier.
        threshold: Exit when ``score >= threshold``: one float, one per block (0-based; missing = never), or a
            :class:`~deltaexit.exits.ThresholdSchedule` (e.g. CALM's ``DecayingThreshold``).
            ``float('inf')`` never exits. Default (None): ``-inf`` under ``verify``, which drafts every token from
            ``min_exit_layer`` (LayerSkip's self-speculation: lossless, the fastest setting ``dx.tune`` found on
            the LayerSkip-trained reference ``v3``), and the measure's ``example_threshold`` under the lossy
            policies (0.9 for ``softmax-max``); or let :func:`deltaexit.tuning.tune` choose.
        kv: KV policy for skipped layers: a name for its defaults, ``"verify"`` (lossless self-speculation),
            ``"propagate"`` (CALM) or ``"recompute"`` (EE-LLM / FREE), or a policy with its settings, e.g.
            ``Verify(num_draft=4, adaptive=True)``, ``Propagate(query_skip=False)``, ``Recompute(max_pending=8)``.
        min_exit_layer: First 1-based layer after which a row may exit.
        lens: The lens (built from the model if not given).
        backoff: Never slower: watch the pay-off per token and back off to plain full-depth decoding while early
            exit loses, retrying now and then (:class:`~deltaexit.generation.backoff.Backoff`; ``True`` = its
            defaults: wall-clock under ``verify``, the deterministic cost count under the lossy policies; ``False``
            = off, every step an early-exit step as the policy makes it).

    Attributes:
        policy: The :class:`~deltaexit.generation.policy.KVPolicy`; ``kv`` is its name.

    Example:
        >>> import torch
        >>> from deltaexit.generation.verify import Verify
        >>> from deltaexit.testing import ConstantScore, tiny_model
        >>> ee = EarlyExit(tiny_model("llama", num_layers=4), ConstantScore(), 0.5, Verify(num_draft=2))
        >>> ee.kv, ee.policy
        ('verify', Verify(num_draft=2, adaptive=False, ngram=3, ngram_draft=16, ngram_min=1))
        >>> ee.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, pad_token_id=0).shape
        torch.Size([1, 6])
    """

    def __init__(
        self,
        model: nn.Module,
        measure: str | ConfidenceMeasure = "softmax-max",
        threshold: float | Sequence[float] | ThresholdSchedule | None = None,
        kv: str | KVPolicy = "verify",
        *,
        min_exit_layer: int = 1,
        lens: Lens | None = None,
        backoff: bool | Backoff = True,
    ) -> None:
        check_model(model)
        check_cache_support(model)
        self.model: Any = model  # a transformers causal LM (generate, _prefill are not typed on nn.Module)
        self.structure = find_structure(model)
        self.num_layers = self.structure.num_layers
        self.policy = get_policy(kv)
        self.backoff = as_backoff(backoff, self.policy.name)
        self.plain_times: dict[int, PlainTimes] = {}  # per batch size, across calls (the back-off's clock)
        self.cache_layer_types = config_layer_types(getattr(model, "config", None))  # derived once, not per call
        self.cache_window = cache_window(model)  # a sliding window only the model's cache applies (e.g. moshi)
        self.cost_terms: dict[int, tuple[Callable[[Run], float], float | None]] = {}  # per context: signal="cost"
        self.fractions: dict[int, float] = {}  # per context: the stats' measure cost (FLOPs counted once)
        self.runner = BlockRunner(model, self.structure)
        measure = resolve_measure(measure)
        threshold = default_threshold(measure, self.policy.name) if threshold is None else threshold
        self.scan = ExitScan(
            model,
            self.runner,
            lens if lens is not None else Lens(self.structure),
            measure,
            as_schedule(threshold, self.num_layers),
            check_min_exit_layer(min_exit_layer, self.num_layers),
        )
        self.scan.measure.check_sizes(self.structure.hidden_size, self.structure.vocab_size)  # e.g. candidates >= V
        warn_threshold(self.scan.measure, threshold, self.policy.name)

    @property
    def kv(self) -> str:
        """The KV policy's name."""
        return self.policy.name

    @property
    def measure(self) -> ConfidenceMeasure:
        """The confidence measure."""
        return self.scan.measure

    @property
    def schedule(self) -> ThresholdSchedule:
        """The thresholds, as a schedule."""
        return self.scan.schedule

    @property
    def lens(self) -> Lens:
        """The lens the exits read their tokens from."""
        return self.scan.lens

    @property
    def min_exit_layer(self) -> int:
        """First 1-based layer after which a row may exit."""
        return self.scan.min_exit_layer

    def __repr__(self) -> str:
        return (
            f"EarlyExit(measure={self.measure!r}, threshold={self.schedule!r}, kv={self.policy!r}, "
            f"min_exit_layer={self.min_exit_layer}, backoff={self.backoff!r}, layers={self.num_layers})"
        )

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
            ``[batch, prompt + new]`` sequences, or an :class:`EarlyExitOutput` (exit layers, cache, stats) with
            ``return_dict_in_generate=True``.
        """
        check_generate_kwargs(kwargs)
        check_text_only(kwargs, self.runner.skipped)
        stop_strings_to_criteria(self.model, kwargs)
        cache_on_for_loop(kwargs)
        own_state = keeps_own_state_cache(self.model)  # the model's forward makes its own cache class (xLSTM's)
        if own_state:
            kwargs.setdefault("cache", None)
        no_cache = kwargs.get("cache") is None and kwargs.get("past_key_values") is None
        if no_cache and not self.scan.prefix and not own_state:
            own = own_cache_class(self.model)  # the class the model's forward requires (MiniMax's), else ours
            fresh = own() if own else fresh_cache(self.model.config, self.cache_layer_types, self.cache_window)
            kwargs["cache"] = fresh
        kwargs["ee_streamer"] = kwargs.get("streamer")
        return self.model.generate(inputs, custom_generate=self.custom_generate, **kwargs)

    @property
    def custom_generate(self) -> Callable[..., EarlyExitOutput | torch.LongTensor]:
        """The decoding loop to pass as ``model.generate(..., custom_generate=ee.custom_generate)``.

        ``model.generate`` does not hand its ``streamer`` to custom loops: pass it as ``ee_streamer=`` too. It drops
        ``tokenizer`` as well, so ``stop_strings`` work through :meth:`generate` only (or pass a
        ``StopStringCriteria`` in ``stopping_criteria``).
        """
        return self._decode

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
        own = own_cache_class(model)  # model.generate prepares no cache for a model with a class of its own
        if own is not None and model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = own()
        check_generation_config(generation_config, synced_gpus, model_kwargs)
        check_text_only(model_kwargs, self.runner.skipped)
        start_cache(
            model_kwargs, model.config, self.cache_layer_types, self.cache_window, own, keeps_own_state_cache(model)
        )
        run = Run(
            model,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            streamer if streamer is not None else ee_streamer,
            model_kwargs,
            num_layers=self.num_layers,
            policy=self.policy.name,
        )
        self._prefill(run, generation_config)
        state = self.policy.start(self.scan)
        monitor = self._monitor(run)
        while not run.done:
            if monitor is None:
                self.policy.step(run, self.scan, state)
            else:
                monitor.step(run, partial(self.policy.step, run, self.scan, state))
        if run.streamer is not None:
            run.streamer.end()
        out = run.output(self._measure_fraction(run.mean_context))
        return out if run.returns_dict else cast(torch.LongTensor, run.input_ids)

    def _cost_terms(self, context: int) -> tuple[Callable[[Run], float], float | None]:
        """The cost signal's count and (under :data:`PRIOR_POLICIES`) its prior at ``context``."""
        prior = None  # the prior prices one exit scan per token: not a policy that drafts in rounds
        if self.policy.name in PRIOR_POLICIES:
            prior = prior_cost(self.model, self.scan, self.policy.kv_only_per_skipped_block, context)
        return block_cost(self.model, self.measure, context), prior

    def _measure_fraction(self, context: int) -> float:
        """:func:`~deltaexit.generation.cost.measure_block_fraction` at ``context``, counted once per context."""
        return _per_context(self.fractions, context, lambda: measure_block_fraction(self.model, self.measure, context))

    def _monitor(self, run: Run) -> PayoffMonitor | None:
        """The call's pay-off monitor (None with ``backoff=False``)."""
        if self.backoff is None:
            return None
        if self.backoff.signal == "cost":
            context = run.input_ids.shape[1]
            # counting FLOPs from the weights is 0.7 ms: once per prompt length
            cost, prior = _per_context(self.cost_terms, context, lambda: self._cost_terms(context))
            return PayoffMonitor(self.backoff, self.scan, cost, prior=prior)
        plain = self.plain_times.setdefault(run.input_ids.shape[0], PlainTimes(refresh=self.backoff.window))
        return PayoffMonitor(self.backoff, self.scan, plain=plain)

    def _prefill(self, run: Run, generation_config: Any) -> None:
        """The prompt: the model's own full-depth forward (also tells the runner the blocks' output type)."""
        handle = self.runner.probe_output_type() if self.runner.returns_tuple is None else None
        try:
            with noting_writes(run.model_kwargs.get("cache")):  # which cache writes each block makes (propagate)
                outputs = self.model._prefill(run.input_ids, generation_config, run.model_kwargs)
        finally:
            if handle is not None:
                handle.remove()
        self.runner.check_called_once()  # a looped (recurrent-depth) model is refused here, after the prompt
        own = outputs.get("cache")
        if own is not None:  # a cache class of the model's own (xLSTM's): viewed as recurrent layers
            run.model_kwargs["cache"] = own if isinstance(own, Cache) else own_state_cache(own, self.num_layers)
        name = state_argument(self.model)
        if name is not None and outputs.get(name) is not None:  # the model's own recurrent state (e.g. RWKV's)
            run.model_kwargs[name] = outputs[name]
            run.model_kwargs["cache"] = state_cache(outputs[name], self.num_layers)
        elif self.scan.prefix:  # no cache at all (e.g. openai-gpt): a cache that only counts tokens
            run.model_kwargs["cache"] = PrefixCache(self.num_layers)
        elif own_cache_class(self.model) is not None:  # states beside the layers (MiniMax's) as recurrent layers
            side_state_cache(run.cache, self.num_layers)
        fill_skipped_layers(run.cache, self.runner.skipped, self.num_layers)
        check_cache(run.cache, self.num_layers, run.input_ids.shape[1], self.runner.blocks)
        run.stats.prompt_blocks = self.num_layers
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=run.input_ids.device)
        del outputs
        token, _, scores = run.choose(run.input_ids, logits)
        run.append(token, torch.full_like(token, self.num_layers), scores, logits)


def _per_context(table: dict[int, T], context: int, make: Callable[[], T]) -> T:
    """``table[context]``, made on first use; the table is emptied past 256 contexts, so it stays small."""
    if context not in table:
        if len(table) >= 256:
            table.clear()
        table[context] = make()
    return table[context]
