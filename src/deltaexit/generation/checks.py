"""Argument checks of early-exit generation, raised before any block runs, each saying what to do instead.

Example:
    >>> from transformers import GenerationConfig
    >>> check_generation_config(GenerationConfig(num_beams=2), False, {"cache": None})
    Traceback (most recent call last):
        ...
    ValueError: EarlyExit: beam search is not supported; use num_beams=1 (got num_beams=2)
    >>> check_min_exit_layer(5, num_layers=4)
    Traceback (most recent call last):
        ...
    ValueError: min_exit_layer must be an int in [1, 4], got 5
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from deltaexit.generation.kv import UnsupportedCacheError, fresh_cache
from deltaexit.measures.base import ConfidenceMeasure, get_measure, threshold_problem

__all__ = [
    "DRAFTING_POLICIES",
    "UNSUPPORTED_SETTINGS",
    "check_generate_kwargs",
    "check_generation_config",
    "check_min_exit_layer",
    "check_model",
    "plain_processors",
    "resolve_measure",
    "start_cache",
    "stop_strings_to_criteria",
]

#: Policies whose exits only draft (the full model verifies): ``-inf`` (draft every token) is their default threshold.
DRAFTING_POLICIES = ("verify", "tolerant")

#: GenerationConfig fields whose non-default values the early-exit loop cannot honour, with what to do instead.
UNSUPPORTED_SETTINGS: dict[str, tuple[Any, str]] = {
    "num_beams": (1, "beam search is not supported; use num_beams=1"),
    "num_beam_groups": (1, "group beam search is not supported"),
    "penalty_alpha": (None, "contrastive search is not supported"),
    "prompt_lookup_num_tokens": (
        None,
        "prompt-lookup decoding is built into kv='verify': use Verify(ngram=3, ngram_draft=...) instead",
    ),
    "assistant_early_exit": (
        None,
        "assistant_early_exit is transformers' own self-speculation; use kv='verify' with min_exit_layer instead",
    ),
    "output_attentions": (False, "output_attentions is not supported"),
    "output_hidden_states": (False, "output_hidden_states is not supported; use dx.collect"),
}


def check_model(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` is a causal LM with ``.generate``."""
    if not hasattr(model, "generate"):
        raise TypeError(f"expected a transformers causal LM with .generate, got {type(model).__name__}")


def resolve_measure(measure: str | ConfidenceMeasure) -> ConfidenceMeasure:
    """The measure instance for a registered name or an instance; ``TypeError`` for anything else."""
    if isinstance(measure, str):
        measure = get_measure(measure)
    if not isinstance(measure, ConfidenceMeasure):
        raise TypeError(
            f"measure must be a registered name or a ConfidenceMeasure instance, got {type(measure).__name__}"
        )
    return measure


def default_threshold(measure: ConfidenceMeasure, policy: str) -> float:
    """``EarlyExit``'s threshold when none is given: ``-inf`` under ``verify``/``tolerant`` (draft every token), the
    measure's ``example_threshold`` under the lossy policies.

    Raises:
        ValueError: A lossy policy and a measure with no ``example_threshold`` (e.g. a fitted one): pass one.

    Example:
        >>> from deltaexit.measures.base import get_measure
        >>> m = get_measure("softmax-max")
        >>> default_threshold(m, "verify"), default_threshold(m, "propagate")
        (-inf, 0.9)
    """
    if policy in DRAFTING_POLICIES:
        return -math.inf
    example = getattr(measure, "example_threshold", None)
    if example is None:
        raise ValueError(
            f"kv={policy!r} needs a threshold for {measure!r}: pass threshold=..., a value inside its scores' range, "
            "or choose one with dx.calibrate / dx.tune"
        )
    return float(example)


def warn_threshold(measure: ConfidenceMeasure, threshold: Any, policy: str) -> str | None:
    """Warn (``UserWarning``) when ``threshold`` cannot work for ``measure``: no score reaches it, or every token
    exits at the first scored layer under a lossy policy. Returns the message (None when there is nothing to say).

    ``inf`` (never exit) is silent; ``-inf`` is the documented "always draft" setting of ``verify`` (lossless), and
    under ``propagate``/``recompute`` it means every token exits after ``min_exit_layer`` blocks, which is warned.

    Example:
        >>> import warnings
        >>> from deltaexit.measures.base import get_measure
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = warn_threshold(get_measure("delta-norm"), 0.9, "verify")
        >>> "never exits" in str(caught[0].message)
        True
    """
    import warnings

    message = threshold_problem(measure, threshold)
    drafting = policy in DRAFTING_POLICIES
    if message is None and not drafting and isinstance(threshold, (int, float)) and threshold == -math.inf:
        message = (
            f"threshold -inf under kv={policy!r} makes every token exit at min_exit_layer (lossy); pass a threshold "
            f"inside the measure's range (e.g. softmax-max 0.9), use kv='verify', or let dx.tune choose"
        )
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=3)
    return message


def check_min_exit_layer(min_exit_layer: Any, num_layers: int) -> int:
    """``min_exit_layer`` if it is an int in ``[1, num_layers]``; ``ValueError`` otherwise."""
    if not isinstance(min_exit_layer, int) or not 1 <= min_exit_layer <= num_layers:
        raise ValueError(f"min_exit_layer must be an int in [1, {num_layers}], got {min_exit_layer!r}")
    return min_exit_layer


def check_generate_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse the ``generate`` keywords early exit sets itself or cannot honour."""
    if "custom_generate" in kwargs:
        raise ValueError("EarlyExit.generate sets custom_generate itself; do not pass it")
    if kwargs.get("assistant_model") is not None:
        raise ValueError(
            "EarlyExit: assisted decoding (assistant_model) is not supported; kv='verify' drafts with the "
            "model's own early exits"
        )


def stop_strings_to_criteria(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Turn ``stop_strings`` + ``tokenizer`` into a stopping criterion, in place.

    ``model.generate`` drops ``tokenizer`` before calling a ``custom_generate`` callable, so it cannot build
    the stop-string criterion itself; we build it here and hand it in with ``stopping_criteria``.
    """
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
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


def check_generation_config(generation_config: Any, synced_gpus: bool, model_kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` for the generation settings the early-exit loop does not support."""
    for name, (default, message) in UNSUPPORTED_SETTINGS.items():
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


def start_cache(model_kwargs: dict[str, Any]) -> None:
    """Check the cache ``model.generate`` prepared is empty; swap it for a croppable one if needed (in place)."""
    cache = model_kwargs.get("cache")
    if isinstance(cache, DynamicCache) and cache.get_seq_length() == 0:
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            model_kwargs["cache"] = fresh_cache()  # croppable full-length layers; masks keep sliding windows
    elif cache is None or cache.get_seq_length() != 0:
        raise UnsupportedCacheError(
            "early-exit generation starts from an empty DynamicCache; do not pass a filled cache"
        )


def plain_processors(processors: Any) -> list[Any]:
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
