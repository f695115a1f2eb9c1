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
import re
import sys
import weakref
from typing import Any

from torch import nn
from transformers import DynamicCache, masking_utils
from transformers.cache_utils import DynamicSlidingWindowLayer

from deltaexit.aliases import CONTEXT_LENGTH_ATTRS
from deltaexit.generation.kv import (
    SUPPORTED_LAYER_TYPES,
    SUPPORTED_LAYERS,
    UnsupportedCacheError,
    config_layer_types,
    fresh_cache,
    has_kv,
    has_state,
    is_opaque,
    layers_of,
    opaque_layer_types,
)
from deltaexit.generation.statecache import forward_parameters, own_cache_class, recomputes_prefix, state_argument
from deltaexit.measures.base import ConfidenceMeasure, get_measure, threshold_problem
from deltaexit.structure import config_int

__all__ = [
    "DRAFTING_POLICIES",
    "UNSUPPORTED_SETTINGS",
    "cache_on_for_loop",
    "cache_window",
    "check_cache_support",
    "check_generate_kwargs",
    "check_generation_config",
    "check_min_exit_layer",
    "check_model",
    "key_selecting_attention",
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


def keeps_own_state_cache(model: Any) -> bool:
    """Whether ``model`` is a recurrent (``_is_stateful``) model that ``transformers`` gives no ``DynamicCache``:
    its forward makes a cache of its own class (xLSTM's ``xLSTMCache``), which early exit views, after the prompt,
    as recurrent cache layers (:func:`deltaexit.generation.statecache.own_state_cache`).

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> keeps_own_state_cache(tiny_model("llama"))
        False
    """
    supports_dynamic = getattr(model, "_supports_default_dynamic_cache", None)
    return (
        callable(supports_dynamic)
        and not supports_dynamic()
        and bool(getattr(model, "_is_stateful", False))
        and "cache" in forward_parameters(model)
    )


def check_cache_support(model: Any) -> None:
    """Raise :class:`UnsupportedCacheError` for a model whose cache no KV policy can keep consistent, from the model
    alone (before any block runs): one that ``transformers`` cannot give a ``DynamicCache`` (a cache class of its
    own), or one whose config names cache layer types early exit does not know. A forward that takes no cache is
    fine: a state of its own (RWKV's), or a recurrent model's own cache class of per-layer states (xLSTM's), is
    viewed as a cache, and with none at all (``openai-gpt``) the blocks run
    over the whole sequence every step, as ``model.generate`` does (:mod:`deltaexit.generation.statecache`).

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> check_cache_support(tiny_model("llama"))  # nothing to say
    """
    name = type(model).__name__
    # no transformers cache (ours stands in), a recurrent model's own cache class (xLSTM's: viewed), or a
    # DynamicCache subclass of its own (MiniMax's: built; statecache)
    own = (
        state_argument(model) is not None
        or recomputes_prefix(model)
        or keeps_own_state_cache(model)
        or own_cache_class(model) is not None
    )
    supports_dynamic = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports_dynamic) and not supports_dynamic() and not own:
        raise UnsupportedCacheError(
            f"{name} keeps its cache in a class of its own (transformers gives it no DynamicCache); none of the KV "
            "policies (verify, propagate, recompute) can keep it consistent under early exit. Use model.generate."
        )
    types = set(config_layer_types(getattr(model, "config", None)))
    unknown = sorted(types - SUPPORTED_LAYER_TYPES - opaque_layer_types(types))
    if unknown:
        raise UnsupportedCacheError(
            f"{name}'s cache has layers of type {unknown}; none of the KV policies (verify, propagate, recompute) "
            f"supports them (supported layer types: {sorted(SUPPORTED_LAYER_TYPES)}). Use model.generate."
        )


#: ``transformers.masking_utils`` functions that build a windowed (sliding or chunked) attention mask.
_WINDOW_MASKS = tuple(
    getattr(masking_utils, name)
    for name in (
        "create_sliding_window_causal_mask",
        "create_chunked_causal_mask",
        "create_masks_for_generate",
        "sliding_window_overlay",
        "sliding_window_causal_mask_function",
        "chunked_overlay",
        "chunked_causal_mask_function",
    )
    if hasattr(masking_utils, name)
)


def _builds_window_mask(model: nn.Module) -> bool:
    """Whether a modeling module of ``model``'s classes holds one of ``masking_utils``' windowed-mask builders."""
    modules = {type(module).__module__ for module in model.modules()}
    for name in modules:
        namespace = vars(sys.modules[name]) if name in sys.modules else {}
        if any(any(value is mask for mask in _WINDOW_MASKS) for value in namespace.values()):
            return True
    return False


def cache_window(model: Any) -> int | None:
    """The sliding window of a model that only its cache applies (its cache drops old keys, its mask is causal);
    None where the model's mask applies its windows, or it has none.

    Early exit keeps full-length, croppable cache layers. Where the model's mask keeps the window, a plain
    full-length layer does; a model that builds no windowed mask (e.g. ``moshi``, whose config has a
    ``sliding_window`` but whose forward makes a plain causal mask) attends to a window under ``model.generate``
    only because ``transformers``' sliding cache layer drops keys: its cache layers become
    :class:`~deltaexit.generation.windowed.CacheWindowLayer` (full length, each block shown the keys the sliding
    layer would return), and drafts are verified one token at a time.

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> cache_window(tiny_model("llama")) is None
        True
    """
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config
    if config is None or not isinstance(model, nn.Module):
        return None
    try:
        layers = layers_of(DynamicCache(config=config))
    except Exception:  # a config DynamicCache cannot read: the other checks speak for it
        return None
    if not any(type(layer) is DynamicSlidingWindowLayer for layer in layers) or _builds_window_mask(model):
        return None
    window = getattr(config, "sliding_window", None)
    positions = config_int(config, CONTEXT_LENGTH_ATTRS)
    if not isinstance(window, int) or (positions is not None and window >= positions):
        return None  # no sequence the model takes is longer than the window: the cache never drops a key
    return window


#: Per module class: whether its source updates a cache and picks entries by ``topk`` (read once per class).
_SELECTS_KEYS: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _selects_cached_keys(cls: type) -> bool:
    """Whether class ``cls``'s source both updates a cache and picks entries by ``topk``."""
    if cls not in _SELECTS_KEYS:
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # built-in or dynamically made classes
            source = ""
        _SELECTS_KEYS[cls] = bool(re.search(r"\.topk\(", source) and re.search(r"cache\w*\.update\(", source))
    return _SELECTS_KEYS[cls]


def key_selecting_attention(model: nn.Module) -> str | None:
    """The name of a module class of ``model`` that updates the cache and picks keys by ``topk`` (else None).

    Such attention (e.g. Doge's dynamic mask attention, keeping the ``keep_window_size`` best-scored keys) selects
    keys by a score over the whole cache, so one multi-token pass is not the same computation as one-token steps
    (even in ``transformers`` itself): ``verify`` then checks its drafts one token at a time
    (:func:`deltaexit.generation.recurrent.steps_one_at_a_time`), as ``model.generate`` steps.

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> key_selecting_attention(tiny_model("llama")) is None
        True
    """
    for cls in {type(module) for module in model.modules()}:
        if _selects_cached_keys(cls):
            return cls.__name__
    return None


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


def cache_on_for_loop(kwargs: dict[str, Any]) -> None:
    """Ask ``model.generate`` for the cache unless the user turned it off (in place).

    A ``use_cache=False`` in the model's config or generation config (e.g. ``mpt``) is the model's default for its
    own decoding, not the user's request: early exit needs the cache for its loop and turns it on. ``use_cache=False``
    passed by the user (as a keyword or in the ``generation_config`` they pass) still gets the clear error of
    :func:`check_generation_config`.
    """
    config = kwargs.get("generation_config")
    if "use_cache" not in kwargs and getattr(config, "use_cache", True) is not False:
        kwargs["use_cache"] = True


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
        raise ValueError(
            "EarlyExit needs the KV cache; do not pass use_cache=False (where the model's own generation config "
            "sets it, as on mpt, ee.generate turns it on; with model.generate(custom_generate=...) pass "
            "use_cache=True)"
        )
    impl = getattr(generation_config, "cache_implementation", None)
    if impl not in (None, "dynamic"):
        raise ValueError(f"EarlyExit supports the dynamic cache only, got cache_implementation={impl!r}")
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("EarlyExit takes input_ids, not inputs_embeds")


def _is_empty(cache: DynamicCache) -> bool:
    """Whether no layer of ``cache`` holds a token or a state yet."""
    for layer in layers_of(cache):
        if has_kv(layer) and layer.get_seq_length() > 0:
            return False
        if is_opaque(layer) and getattr(layer, "is_initialized", False):
            return False
        if has_state(layer) and not is_opaque(layer) and any(layer.has_previous_state.values()):
            return False
    return True


def start_cache(
    model_kwargs: dict[str, Any],
    config: Any = None,
    types: list[str] | None = None,
    window: int | None = None,
    own: type[DynamicCache] | None = None,
    own_state: bool = False,
) -> None:
    """Check the cache ``model.generate`` prepared is empty; swap it for a croppable one if needed (in place).

    ``config`` (the model's) tells :func:`~deltaexit.generation.kv.fresh_cache` which layers hold recurrent states;
    ``types``, its :func:`~deltaexit.generation.kv.config_layer_types` when the caller keeps them, saves deriving
    them on every call; ``window``, the model's :func:`cache_window`. ``own``: the cache class the model's forward
    requires (:func:`~deltaexit.generation.statecache.own_cache_class`): an empty one is kept as it is.
    ``own_state``: the model makes a cache of its own class (:func:`keeps_own_state_cache`): none is fine, the
    prompt's forward makes it.
    """
    cache = model_kwargs.get("cache")
    if own_state and cache is None:
        return
    if own is not None and isinstance(cache, own) and _is_empty(cache):
        return
    if isinstance(cache, DynamicCache) and _is_empty(cache):
        if any(type(layer) not in SUPPORTED_LAYERS for layer in layers_of(cache)):
            model_kwargs["cache"] = fresh_cache(config, types, window)  # croppable full-length layers
        elif not layers_of(cache):  # created lazily: fine unless the model has recurrent or cache-window layers
            fresh = fresh_cache(config, types, window)
            if fresh.layers:
                model_kwargs["cache"] = fresh
    elif cache is not None and not isinstance(cache, DynamicCache):
        raise UnsupportedCacheError(
            f"early-exit generation keeps its own croppable cache; got a {type(cache).__name__} (static, quantised "
            "and offloaded caches cannot be cropped back to the tokens kept). Pass no cache (none of the KV "
            "policies verify, propagate, recompute takes one), or use model.generate for that cache."
        )
    else:
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
