"""Find the residual-stream parts of a causal LM by structure, not by class name.

A decoder-only model is, for our purposes: a list of blocks that each update the
residual stream, a final norm (plus anything applied after it, e.g. OPT's
``project_out``), an LM head, and model-specific steps on the logits (Gemma-2's
final soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``).
:func:`find_structure` locates these pieces on any ``transformers`` causal LM and
checks them once with a dummy forward; every piece can be overridden. Where the
blocks do not pass the residual stream as one ``[batch, seq, hidden]`` tensor
(sequence-first blocks, several streams), the check also finds the
:class:`~deltaexit.readout.Readout` that gives the state the head reads.

Example:
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    >>> model = AutoModelForCausalLM.from_config(cfg)
    >>> s = find_structure(model)
    >>> s.num_layers, s.block_path
    (2, 'model.layers')
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltaexit.aliases import (
    CONTEXT_LENGTH_ATTRS,
    FINAL_NORM_NAMES,
    HEAD_DIM_ATTRS,
    HIDDEN_SIZE_ATTRS,
    KV_HEADS_ATTRS,
    LOGIT_CONFIG_ATTRS,
    NUM_HEADS_ATTRS,
    NUM_LAYERS_ATTRS,
    POST_NORM_NAMES,
    QKV_NAMES,
    VOCAB_SIZE_ATTRS,
)
from deltaexit.headpath import trace_head_path
from deltaexit.parallel import ParallelBlocks, parallel_blocks
from deltaexit.readout import Readout, readout_candidates
from deltaexit.stacked import stacked_state_readout
from deltaexit.streams import from_state, leading_streams, to_state, trace_stream_merge

__all__ = [
    "ModelStructure",
    "StructureError",
    "block_output",
    "check_causal_lm",
    "find_structure",
    "input_device",
    "query_projection",
    "resolve_module",
    "text_config",
]

#: Elements (tokens x candidates x hidden) of head rows :meth:`ModelStructure.candidate_logits` gathers at once.
CANDIDATE_CHUNK = 1 << 22
_OVERRIDE_HINT = (
    "Pass the piece explicitly, e.g. dx.find_structure(model, blocks='model.layers', "
    "final_norm='model.norm', lm_head='lm_head') (dotted paths or modules); the same keywords "
    "work for dx.collect(...) and dx.Lens.from_model(...)."
)


class StructureError(ValueError):
    """Raised when a model's residual-stream structure cannot be found or fails its check."""


def resolve_module(model: nn.Module, path: str | nn.Module | None) -> nn.Module | None:
    """Return ``path`` as a module of ``model`` (a dotted path, a module, or None).

    Example:
        >>> resolve_module(nn.Sequential(nn.Linear(2, 2)), "0")
        Linear(in_features=2, out_features=2, bias=True)
    """
    if path is None or isinstance(path, nn.Module):
        return path
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise StructureError(f"model has no submodule {path!r}. {_OVERRIDE_HINT}") from exc


def _is_linear(module: nn.Module | None) -> bool:
    """A linear-like layer: a module with integer ``in_features`` and ``out_features``."""
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def query_projection(block: nn.Module) -> tuple[nn.Module, str] | None:
    """The separate query projection of a decoder block's attention, as ``(attention module, attribute name)``.

    Found by structure: the one submodule of ``block`` that holds a query, a key and a value projection as three
    separate linear layers (``in_features``/``out_features``, same input width) under one of the name triples in
    :data:`QKV_NAMES`. None when there is no such module (fused projections such as GPT-2's ``c_attn``, Phi-3's
    ``qkv_proj`` or Falcon's ``query_key_value``) or more than one (e.g. self- and cross-attention).

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> attn, name = query_projection(find_structure(tiny_model("llama")).blocks[0])
        >>> type(attn).__name__, name
        ('LlamaAttention', 'q_proj')
    """
    found: list[tuple[nn.Module, str]] = []
    for module in block.modules():
        for names in QKV_NAMES:
            projs = [module._modules.get(n) for n in names]
            if all(_is_linear(p) for p in projs) and len({p.in_features for p in projs}) == 1:  # type: ignore[union-attr]
                found.append((module, names[0]))
                break
    return found[0] if len(found) == 1 else None


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def block_output(output: object) -> torch.Tensor:
    """The hidden-state tensor of a block's output (a tensor, or the first item of a tuple).

    Example:
        >>> h = torch.zeros(1, 2, 4)
        >>> block_output((h, None)) is h
        True
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise StructureError(
        f"a decoder block returned {type(output).__name__}; expected a tensor or a tuple whose "
        "first item is the hidden states."
    )


def block_input(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a block was called with: its first positional argument, else ``hidden_states=``.

    Example:
        >>> h = torch.zeros(1, 2, 4)
        >>> block_input((), {"hidden_states": h}) is h
        True
    """
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise StructureError(
        f"a decoder block was called without hidden states (keywords {sorted(kwargs)}); expected them as the "
        "first positional argument or as hidden_states=."
    )


def with_block_input(args: Sequence[Any], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a block call with its hidden states replaced by ``hidden``.

    Example:
        >>> args, kwargs = with_block_input((1, 2), {"x": 3}, "h")
        >>> args, kwargs
        (('h', 2), {'x': 3})
    """
    if args:
        return (hidden, *args[1:]), dict(kwargs)
    return (), {**kwargs, "hidden_states": hidden}


def _execution_device(module: nn.Module | None) -> torch.device | None:
    """Where ``accelerate`` runs ``module`` (its ``_hf_hook``), or None without such a hook."""
    hooks = [getattr(module, "_hf_hook", None)]
    while hooks:
        hook = hooks.pop(0)
        if hook is None:
            continue
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}") if isinstance(device, int) else torch.device(device)
        hooks.extend(getattr(hook, "hooks", ()))
    return None


def input_device(model: nn.Module) -> torch.device:
    """Device the input ids must be on: the input embedding's, offload-aware (``accelerate`` hooks, meta weights).

    Example:
        >>> input_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    for module in (embeddings, model):
        device = _execution_device(module)
        if device is not None:
            return device
    params = list(embeddings.parameters()) if isinstance(embeddings, nn.Module) else []
    for p in [*params, *model.parameters()]:
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def text_config(model: nn.Module) -> Any:
    """The config of the model's text decoder (``config.get_text_config()``), or None without a config.

    Example:
        >>> text_config(nn.Linear(2, 2)) is None
        True
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _config_attr(config: Any, name: str, layer: int | None) -> Any:
    """``config.<name>``; on a heterogeneous config (``per_layer_config``), layer ``layer``'s value.

    A per-layer attribute of a heterogeneous ``transformers`` config refuses global reads (it may differ
    across layers, e.g. Gemma 4's head size): it is read from layer ``layer``'s config, or without a layer
    as the largest value over the layers.
    """
    if layer is not None and getattr(config, "is_heterogeneous", False) and 0 <= layer < len(config.per_layer_config):
        return getattr(config.per_layer_config[layer], name, None)
    try:
        return getattr(config, name, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        if not getattr(config, "is_heterogeneous", False):
            raise
        values: list[Any] = [getattr(layer_config, name, None) for layer_config in config.per_layer_config]
        ints = [int(v) for v in values if _is_int(v)]
        return max(ints) if ints else None


def config_int(config: Any, names: Sequence[str], layer: int | None = None) -> int | None:
    """The first positive integer among ``config``'s attributes ``names`` (None if none is set).

    On a heterogeneous config (``transformers``' ``per_layer_config``) a per-layer attribute is read from
    layer ``layer``'s config; without ``layer``, as its largest value over the layers.

    Example:
        >>> class C: n_embd = 64
        >>> config_int(C(), ("hidden_size", "n_embd"))
        64
    """
    for name in names:
        value = _config_attr(config, name, layer)
        if _is_int(value):
            return int(value)
    return None


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()`` when the model has one (the LM head), else None.

    Example:
        >>> output_embeddings(nn.Linear(2, 2)) is None
        True
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, nn.Module) else None


def _causal_lm_class_names() -> set[str]:
    """Class names ``transformers`` registers as causal LMs (``AutoModelForCausalLM``'s mapping)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def not_causal_lm_reason(model: nn.Module) -> str | None:
    """Why ``model`` is not a decoder-only causal LM, or None when it may be one.

    Only ``transformers`` models are judged (anything else is checked by the dummy forward alone): an
    encoder-decoder config (T5, BART ...) is not one, and neither is a model that cannot generate
    (``can_generate()`` is False: ``BertModel``, ``BertForMaskedLM`` ...) unless its class is registered
    for ``AutoModelForCausalLM``.

    Example:
        >>> from transformers import AutoConfig, BertForMaskedLM
        >>> bert = BertForMaskedLM(AutoConfig.for_model("bert", hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, vocab_size=128))
        >>> not_causal_lm_reason(bert)[:50]
        'BertForMaskedLM cannot generate (can_generate() is'
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model (config.is_encoder_decoder=True)"
    if not type(model).can_generate() and name not in _causal_lm_class_names():
        return (
            f"{name} cannot generate (can_generate() is False) and is not an AutoModelForCausalLM class: "
            "an encoder or a masked/classification model attends both ways"
        )
    return None


def check_causal_lm(model: nn.Module) -> None:
    """Raise :class:`StructureError` early when ``model`` is not a decoder-only causal LM.

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> check_causal_lm(tiny_model("llama"))  # a causal LM: no error
    """
    reason = not_causal_lm_reason(model)
    if reason is not None:
        raise StructureError(
            f"deltaexit works on decoder-only causal LMs, and {reason}. Load the model with "
            "AutoModelForCausalLM (e.g. a GPT-2, Llama or Qwen checkpoint); no structure override makes an "
            "encoder or an encoder-decoder model exit early."
        )


def _vocab_size(model: nn.Module) -> int:
    vocab = config_int(text_config(model), VOCAB_SIZE_ATTRS)
    if vocab is None:
        vocab = getattr(output_embeddings(model), "out_features", None)
    if vocab is None:
        raise StructureError("cannot tell the vocabulary size: the config has no vocab_size.")
    return int(vocab)


@dataclass
class ModelStructure:
    """The residual-stream pieces of one causal LM.

    Attributes:
        model: The model the pieces belong to.
        blocks: The decoder blocks, in order; block ``l`` maps ``h_in[l]`` to ``h_out[l]``.
        final_norm: Norm applied to the last block's output (None if the model has none).
        post_norm: Modules applied after the final norm, before the head (e.g. OPT's ``project_out``).
        lm_head: The output embedding.
        logit_scale: Multiplier on the logits (Cohere's ``logit_scale``), or None.
        logit_divisor: Divisor of the logits (Granite's ``logits_scaling``), or None.
        final_softcap: Soft-cap ``c * tanh(logits / c)`` (Gemma-2), or None.
        logit_transform: Extra user-given callable applied last, or None.
        pre_norm: Modules applied to the last block's output before the final norm (e.g. a hyper-connection
            merge of several residual streams into one).
        hidden_scale: Multiplier on the normalised state just before the head (a width multiplier), or None.
        vocab_limit: The logits are the head's first ``vocab_limit`` outputs (a padded vocabulary), or None.
        prefix_positions: Leading positions the blocks see on a fresh (uncached) forward but the head does not
            (soft-prompt tokens the model prepends); :func:`deltaexit.collect` drops them. 0 if none.
        state_dims: Trailing dims of one position's residual state: 1 (``[hidden]``), 2 for several residual
            streams (``[streams, hidden]``, hyper-connections).
        readout: Where the blocks' output and call hold the residual stream the head reads (sequence-first
            blocks, one stream segment of the sequence axis, two RevNet half-streams concatenated); the identity
            for a plain decoder. :meth:`stream_output` and :meth:`stream_input` apply it.
        skipped: Blocks the model itself skips on a forward on token ids alone (e.g. cross-attention blocks without
            image features): on such a forward they are identity maps of the residual stream, so
            :func:`deltaexit.collect` records them as steps with ``delta == 0``, no exit is taken after them and
            early-exit generation skips them as the model does.
        leading_streams: The blocks pass several residual streams stacked on a leading axis,
            ``[streams, batch, seq, hidden]`` (Gemma-3n's AltUp); deltaexit's states are ``[batch, seq, streams,
            hidden]`` (:meth:`state_of`, :meth:`native_of`), merged by the pre-norm module (see
            :mod:`deltaexit.streams`). Early-exit generation hands each block its own layout
            (:meth:`deltaexit.generation.runner.BlockRunner.run_block`).
    """

    model: nn.Module
    blocks: nn.ModuleList
    final_norm: nn.Module | None
    lm_head: nn.Module
    post_norm: tuple[nn.Module, ...] = ()
    logit_scale: float | None = None
    logit_divisor: float | None = None
    final_softcap: float | None = None
    logit_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    pre_norm: tuple[nn.Module, ...] = ()
    hidden_scale: float | None = None
    vocab_limit: int | None = None
    prefix_positions: int = 0
    state_dims: int = 1
    readout: Readout = field(default_factory=Readout)
    skipped: tuple[int, ...] = ()
    leading_streams: bool = False
    validated: bool = field(default=False, compare=False)

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.blocks)

    @property
    def block_path(self) -> str | None:
        """Dotted path of the block list inside the model (parallel per-layer lists: ``'parent.{list,list}'``)."""
        if isinstance(self.blocks, ParallelBlocks):
            return self.blocks.path
        return _path_of(self.model, self.blocks)

    def describe(self) -> dict[str, object]:
        """A JSON-friendly summary of what was found (paths and logit steps)."""
        return {
            "blocks": self.block_path,
            "num_layers": self.num_layers,
            "final_norm": _path_of(self.model, self.final_norm),
            "post_norm": [_path_of(self.model, m) for m in self.post_norm],
            "lm_head": _path_of(self.model, self.lm_head),
            "logit_scale": self.logit_scale,
            "logit_divisor": self.logit_divisor,
            "final_softcap": self.final_softcap,
            "logit_transform": None if self.logit_transform is None else repr(self.logit_transform),
            "pre_norm": [_path_of(self.model, m) or repr(m) for m in self.pre_norm],
            "hidden_scale": self.hidden_scale,
            "vocab_limit": self.vocab_limit,
            "prefix_positions": self.prefix_positions,
            "state_dims": self.state_dims,
            "readout": self.readout.describe(),
            "skipped": list(self.skipped),
            "leading_streams": self.leading_streams,
        }

    # -- architecture facts: everything else asks the structure ---------------------------------------
    @property
    def text_config(self) -> Any:
        """The text decoder's config (``config.get_text_config()``), or None."""
        return text_config(self.model)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream (the readout's joined streams, else the config's, else the head's input)."""
        if self.readout.width is not None:
            return self.readout.width
        value = config_int(self.text_config, HIDDEN_SIZE_ATTRS)
        if value is None:
            value = getattr(self.lm_head, "in_features", None)
        if value is None:
            raise StructureError("cannot tell the hidden size: the config has no hidden_size.")
        return int(value)

    @property
    def vocab_size(self) -> int:
        """Number of logits the lens produces (the head's output width, else the config's vocab)."""
        if self.vocab_limit is not None:
            return self.vocab_limit
        out = getattr(self.lm_head, "out_features", None)
        weight = getattr(self.lm_head, "weight", None)
        if out is None and isinstance(weight, torch.Tensor):
            out = weight.shape[0]
        return int(out) if out is not None else _vocab_size(self.model)

    @property
    def num_attention_heads(self) -> int:
        """Query heads per attention block (0 if the config does not say)."""
        return self.attention_heads()

    @property
    def num_key_value_heads(self) -> int:
        """Key/value heads per attention block (the query heads without grouped-query attention)."""
        return config_int(self.text_config, KV_HEADS_ATTRS) or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head (``head_dim``, else ``hidden_size // heads``; 0 if unknown)."""
        return self.attention_head_dim()

    def attention_heads(self, layer: int | None = None) -> int:
        """Query heads of block ``layer`` (any block if None; the largest where they differ; 0 if unknown)."""
        return config_int(self.text_config, NUM_HEADS_ATTRS, layer) or 0

    def attention_head_dim(self, layer: int | None = None) -> int:
        """Head width of block ``layer`` (any block if None; the largest where they differ; 0 if unknown)."""
        value = config_int(self.text_config, HEAD_DIM_ATTRS, layer)
        if value is not None:
            return value
        heads = self.attention_heads(layer)
        return self.hidden_size // heads if heads else 0

    def context_length(self, default: int = 512) -> int:
        """The longest context the model was built for (``max_position_embeddings`` ...), else ``default``."""
        return config_int(self.text_config, CONTEXT_LENGTH_ATTRS) or default

    @property
    def input_device(self) -> torch.device:
        """Device the input ids must be on (offload-aware; see :func:`input_device`)."""
        return input_device(self.model)

    @property
    def pad_token_id(self) -> int:
        """The pad id to pad prompts with: the generation config's, else the config's, else the first EOS, else 0."""
        configs = [getattr(self.model, "generation_config", None), self.text_config]
        for attr in ("pad_token_id", "eos_token_id"):
            for cfg in configs:
                value = getattr(cfg, attr, None)
                if isinstance(value, (list, tuple)):
                    value = value[0] if value else None
                if isinstance(value, int):
                    return value
        return 0

    block_input = staticmethod(block_input)
    block_output = staticmethod(block_output)
    with_block_input = staticmethod(with_block_input)

    def stream_output(self, output: object) -> torch.Tensor:
        """The residual state ``[batch, seq, *state]`` a block's output holds, through the :attr:`readout`.

        The identity readout is :func:`block_output`.

        Example:
            >>> from deltaexit.testing import tiny_model
            >>> s = find_structure(tiny_model("llama"))
            >>> h = torch.zeros(1, 2, s.hidden_size)
            >>> s.stream_output((h, None)) is h
            True
        """
        if self.readout.identity:
            return self.state_of(block_output(output))
        state = self.readout.output(output)
        if state is None:
            raise StructureError(
                f"a decoder block returned {type(output).__name__}, which does not hold the residual stream where the "
                f"structure's readout {self.readout.describe()} takes it (output items {list(self.readout.outputs)})."
            )
        return state

    def stream_input(self, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        """The residual state ``[batch, seq, *state]`` a block was called with, through the :attr:`readout`.

        The identity readout is :func:`block_input`.
        """
        if self.readout.identity:
            return self.state_of(block_input(args, kwargs))
        state = self.readout.input(args, kwargs)
        if state is None:
            raise StructureError(
                f"a decoder block was called without the residual stream where the structure's readout "
                f"{self.readout.describe()} takes it (arguments {list(self.readout.inputs)}; the call had "
                f"{len(args)} positional arguments and keywords {sorted(kwargs)})."
            )
        return state

    def state_of(self, h: torch.Tensor) -> torch.Tensor:
        """A block's hidden states in deltaexit's layout (``[batch, seq, *state]``; see :attr:`leading_streams`)."""
        return to_state(h) if self.leading_streams else h

    def native_of(self, h: torch.Tensor) -> torch.Tensor:
        """deltaexit's ``[batch, seq, *state]`` back in the blocks' own layout (the inverse of :meth:`state_of`)."""
        return from_state(h) if self.leading_streams else h

    # -- the unembedding: final norm -> post-norm modules -> head -> logit steps ------------------------
    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the pre-norm modules, final norm, post-norm modules and hidden scale (the state the head reads)."""
        if self.pre_norm:
            # Pre-norm modules (a merge of residual streams) take [batch, seq, *state]: any leading dims become seq.
            lead, k = h.shape[: h.dim() - self.state_dims], self.state_dims
            h = h.reshape(1, -1, *h.shape[h.dim() - k :])
            for module in self.pre_norm:
                h = module(h)
            h = h.reshape(*lead, *h.shape[2:])
        if self.final_norm is not None:
            h = self.final_norm(h)
        for module in self.post_norm:
            h = module(h)
        if self.hidden_scale is not None:
            h = h * self.hidden_scale
        return h

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Head and logit steps applied to an already normalised state."""
        logits = self.lm_head(h)
        if self.vocab_limit is not None:
            logits = logits[..., : self.vocab_limit]
        logits = self._logit_steps(logits)
        if self.logit_transform is not None:
            logits = self.logit_transform(logits)
        return logits

    def _logit_steps(self, logits: torch.Tensor) -> torch.Tensor:
        """The elementwise logit steps: scale, divisor, soft-cap (what acts on each logit alone)."""
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _head_input(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` moved to the device and dtype of the final norm (else the head), unless those are on ``meta``."""
        first = self.pre_norm[0] if self.pre_norm else self.final_norm if self.final_norm is not None else self.lm_head
        param = next(first.parameters(), None)
        if param is None:
            param = next(self.lm_head.parameters(), None)
        if param is not None and param.device.type != "meta" and (h.device != param.device or h.dtype != param.dtype):
            h = h.to(device=param.device, dtype=param.dtype)
        return h

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of block outputs ``h`` (``[..., hidden]``), moved to the head's device and dtype first."""
        return self.head_logits(self.normalize(self._head_input(h)))

    def candidate_logits(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The logits of only the tokens ``ids`` for block outputs ``h``: ``unembed(h).gather(-1, ids)``.

        Computes ``normalize(h) @ W[ids].T`` (plus the head's bias rows) and the elementwise logit steps
        (scaling, soft-capping), so it costs ``K * hidden`` multiply-adds per token instead of
        ``vocab * hidden``. A head that is not a plain floating-point ``nn.Linear`` (quantised, offloaded
        to ``meta``) or a user ``logit_transform`` (which may mix logits) falls back to the full head and a
        gather: the same values, at the full cost.

        Args:
            h: ``[..., hidden]`` block outputs.
            ids: ``[..., K]`` token ids (long), the same leading dims as ``h``.

        Returns:
            ``[..., K]`` logits, in the head's dtype.

        Example:
            >>> from deltaexit.testing import tiny_model
            >>> s = find_structure(tiny_model("llama"))
            >>> h, ids = torch.randn(3, s.hidden_size), torch.tensor([[0, 5], [7, 1], [2, 2]])
            >>> torch.allclose(s.candidate_logits(h, ids), s.unembed(h).gather(-1, ids), atol=1e-5)
            True
        """
        lead = h.shape[: h.dim() - self.state_dims]
        if ids.dim() != len(lead) + 1 or ids.shape[:-1] != lead:
            raise ValueError(
                f"candidate ids {tuple(ids.shape)} must have the leading dims of the states {tuple(h.shape)}, "
                "plus one dim of K candidates"
            )
        weight = getattr(self.lm_head, "weight", None)
        plain = (
            isinstance(self.lm_head, nn.Linear)
            and isinstance(weight, torch.Tensor)
            and weight.is_floating_point()
            and weight.device.type != "meta"
        )
        if not plain or self.logit_transform is not None:
            full = self.unembed(h)
            return full.gather(-1, ids.to(full.device))
        assert isinstance(weight, torch.Tensor)
        x = self.normalize(self._head_input(h))
        bias = getattr(self.lm_head, "bias", None)
        k = ids.shape[-1]
        flat_x = x.reshape(-1, 1, x.shape[-1]).to(weight.dtype)
        flat_ids = ids.reshape(-1, k).to(weight.device)
        step = max(1, CANDIDATE_CHUNK // max(1, k * x.shape[-1]))  # tokens per gather of [tokens, K, hidden] rows
        parts = []
        for start in range(0, flat_ids.shape[0], step):
            rows = flat_ids[start : start + step]
            part = torch.matmul(flat_x[start : start + step], weight[rows].transpose(1, 2))[:, 0]
            parts.append(part if bias is None else part + bias[rows])
        logits = torch.cat(parts) if parts else flat_x.new_zeros(0, k)
        return self._logit_steps(logits.reshape(*ids.shape))

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` as a non-negative block index, or raise a clear IndexError."""
        n = self.num_layers
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer index must be an int, got {type(layer).__name__}")
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} is out of range: this model has {n} blocks (0..{n - 1}).")
        return layer % n

    def validate(self, *, atol: float = 1e-4, rtol: float = 1e-4, repair: bool = False) -> ModelStructure:
        """Check with a dummy forward that the lens on the last block reproduces the logits.

        On a mismatch each :class:`~deltaexit.readout.Readout` the last block's output allows is tried in turn
        (the identity first): the lens on its state with the pieces found, then, with ``repair``, a repaired path.

        Args:
            atol: Absolute tolerance on the logits.
            rtol: Relative tolerance on the logits.
            repair: On a mismatch, read the path from the last block to the logits off a traced forward
                (:func:`deltaexit.headpath.trace_head_path`: modules between the last block and the head,
                a scale on the state, dropped prompt positions, a vocabulary slice), adopt it and check again.
                :func:`find_structure` repairs when no override is given.

        Returns ``self``; raises :class:`StructureError` naming the mismatch otherwise.
        """
        ids = (torch.arange(6, device=input_device(self.model)) * 7 + 1).remainder(_vocab_size(self.model))
        ids = ids.unsqueeze(0)
        logits, tap = self._dummy_forward(ids)
        state = self.readout.output(tap.output)
        state = None if state is None else self.state_of(state)
        diff = self._mismatch(state, logits, atol, rtol) if state is not None else "n/a: no state at the readout"
        if diff is None and tap.norm_before_only:
            diff = "n/a: the final norm ran before the blocks only (an embedding norm)"
        if diff is not None and state is not None and repair and leading_streams(state, logits):
            if self._repair_streams(ids, atol, rtol):
                diff = None
        elif diff is not None and self._find_readout(tap, ids, logits, atol, rtol, repair):
            diff = None
        if diff is not None and repair:
            _refuse_stacked_readout(self, ids, diff)
        if diff is not None:
            raise StructureError(
                "the lens (final norm -> head -> logit steps) on the last block's output does not "
                f"reproduce the model's logits (max abs diff {diff}); found {self.describe()}. "
                f"{_OVERRIDE_HINT} Use logit_transform=... for a model-specific logit step."
            )
        self.validated = True
        return self

    def _find_readout(
        self, tap: _LastBlocks, ids: torch.Tensor, logits: torch.Tensor, atol: float, rtol: float, repair: bool
    ) -> bool:
        """Adopt the first readout whose lens reproduces ``logits``: with the pieces found, else (``repair``) with
        the path a traced forward shows; the readout the check started from is tried by repair alone."""
        kept = self.readout
        candidates = readout_candidates(tap.output, tap.previous, tap.call, int(ids.shape[0]), int(ids.shape[1]))
        for readout in dict.fromkeys([kept, *candidates]):
            self.readout = readout
            state = readout.output(tap.output)
            if state is None:
                continue
            direct = readout != kept and not tap.norm_before_only
            if direct and self._mismatch(state, logits, atol, rtol) is None:
                return True
            if repair and self._repair(ids, atol, rtol):
                return True
        self.readout = kept
        return False

    def _dummy_forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, _LastBlocks]:
        """Logits of a cacheless forward on ``ids`` and what the last two blocks saw; every block must run."""
        model = self.model
        tap = _LastBlocks()
        calls: dict[int, int] = {}

        def grabber(index: int) -> Callable[[nn.Module, object, object], None]:
            def grab(_module: nn.Module, _args: object, output: object) -> None:
                tap.outputs[index] = output
                tap.order.append(index)
                calls[index] = calls.get(index, 0) + 1

            return grab

        def caller(index: int) -> Callable[[nn.Module, tuple, dict], None]:
            def called(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                tap.calls[index] = (args, kwargs)

            return called

        def normed(_module: nn.Module, _args: object, _output: object) -> None:
            tap.norm_at.append(len(tap.order))

        handles = [block.register_forward_hook(grabber(i)) for i, block in enumerate(self.blocks)]
        handles += [block.register_forward_pre_hook(caller(i), with_kwargs=True) for i, block in enumerate(self.blocks)]
        if self.final_norm is not None and not any(self.final_norm is m for b in self.blocks for m in b.modules()):
            handles.append(self.final_norm.register_forward_hook(normed))
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits
        except Exception as exc:
            raise StructureError(
                f"the dummy forward for the structure check (input_ids only, {tuple(ids.shape)}) failed: "
                f"{type(exc).__name__}: {exc}. deltaexit runs the text decoder on token ids: give it a causal "
                "LM whose forward takes input_ids alone (for a multimodal model, the text model it wraps, e.g. "
                "AutoModelForCausalLM.from_config(config.get_text_config())), or pass validate=False and give "
                "every forward the other inputs it needs."
            ) from exc
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if torch.isnan(logits.float()).any():
            raise StructureError(
                "the model produced NaN logits on a dummy forward (NaN or inf weights?); check the checkpoint "
                "and its dtype: no structure override can fix this."
            )
        self.skipped = _check_each_ran_once(self, calls)
        tap.settle(self.skipped, len(self.blocks))
        block_output(tap.output)  # a block output with no hidden-state tensor is refused here, as before
        return logits, tap

    def _mismatch(self, h: torch.Tensor, logits: torch.Tensor, atol: float, rtol: float) -> str | None:
        """None when the lens on ``h`` (prompt positions dropped) gives ``logits``, else the max diff or shapes."""
        if self.prefix_positions and h.dim() >= 2:
            h = h[:, self.prefix_positions :]
        try:
            with torch.no_grad():
                lens_logits = self.unembed(h)
        except Exception as exc:
            return f"n/a: the lens failed on the last block's output ({type(exc).__name__}: {exc})"
        if lens_logits.shape != logits.shape:
            return f"n/a: shape {tuple(lens_logits.shape)} vs {tuple(logits.shape)}"
        if torch.allclose(lens_logits.float(), logits.float(), atol=atol, rtol=rtol):
            return None
        return str((lens_logits.float() - logits.float()).abs().max().item())

    def _repair(self, ids: torch.Tensor, atol: float, rtol: float) -> bool:
        """Adopt the path a traced forward shows between the last block and the logits, if it reproduces them."""
        plain = self.readout.identity
        try:
            path = trace_head_path(
                self.model,
                self.blocks,
                self.lm_head,
                ids,
                self._logit_steps,
                atol=atol,
                rtol=rtol,
                state_of=None if plain else self.readout.output,
                view=None if plain else self.readout.view,
            )
        except Exception:  # the plain forward ran; a trace failing leaves the first mismatch to report
            return False
        if path is None:
            return False
        before = {name: getattr(self, name) for name in _REPAIRED}
        if path.head is not None:
            self.lm_head = path.head
        norms = [i for i, m in enumerate(path.modules) if m is self.final_norm]
        if not norms:
            norms = [i for i, m in enumerate(path.modules) if "norm" in type(m).__name__.lower()]
        cut = norms[0] if norms else None
        self.pre_norm = path.modules[:cut] if cut is not None else ()
        self.final_norm = path.modules[cut] if cut is not None else None
        self.post_norm = path.modules[cut + 1 :] if cut is not None else path.modules
        self.hidden_scale, self.vocab_limit = path.hidden_scale, path.vocab_limit
        self.prefix_positions, self.state_dims = path.prefix_positions, max(1, path.block_out.dim() - 2)
        if path.logit_scale is not None:
            self.logit_scale = path.logit_scale * (self.logit_scale or 1.0)
        if path.final_softcap is not None and self.final_softcap is None:
            self.final_softcap = path.final_softcap
        if self._mismatch(path.block_out, path.logits, atol, rtol) is None:
            return True
        for name, value in before.items():
            setattr(self, name, value)
        return False

    def _repair_streams(self, ids: torch.Tensor, atol: float, rtol: float) -> bool:
        """Adopt a merge of leading-axis streams before the final norm (:func:`deltaexit.streams.trace_stream_merge`)
        if a traced forward shows one that reproduces the logits."""
        try:
            found = trace_stream_merge(self.model, self.blocks, ids, atol=atol, rtol=rtol)
        except Exception:  # the plain forward ran; a trace failing leaves the first mismatch to report
            return False
        if found is None:
            return False
        merge, state, logits = found
        before = (self.pre_norm, self.state_dims, self.leading_streams)
        self.pre_norm, self.state_dims, self.leading_streams = (merge,), 2, True
        if self._mismatch(state, logits, atol, rtol) is None:
            return True
        self.pre_norm, self.state_dims, self.leading_streams = before
        return False


@dataclass
class _LastBlocks:
    """What the structure check's dummy forward showed of the last two blocks that ran: the last one's output and
    call ``(args, kwargs)``, and the output of the one before it (None with one block). :meth:`settle` picks them
    from every block's output and call, once the blocks the model skips are known."""

    output: object = None
    previous: object = None
    call: tuple[tuple, dict] = ((), {})
    norm_runs: list[bool] = field(default_factory=list)  # per final-norm call: after the last block's output?
    outputs: dict[int, object] = field(default_factory=dict)
    calls: dict[int, tuple[tuple, dict]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)  # block indices in the order their outputs came
    norm_at: list[int] = field(default_factory=list)  # per final-norm call: block outputs seen before it

    def settle(self, skipped: tuple[int, ...], num_blocks: int) -> None:
        """Take the last two blocks that ran (not ``skipped``) as the last and previous ones."""
        ran = [i for i in range(num_blocks) if i not in skipped and i in self.outputs]
        if not ran:
            return
        last = ran[-1]
        self.output = self.outputs[last]
        self.previous = self.outputs[ran[-2]] if len(ran) > 1 else None
        self.call = self.calls.get(last, ((), {}))
        done = max(n for n, index in enumerate(self.order, start=1) if index == last)
        self.norm_runs = [seen >= done for seen in self.norm_at]

    @property
    def norm_before_only(self) -> bool:
        """The final norm ran in the forward, but never after the last block: it is an embedding norm."""
        return bool(self.norm_runs) and not any(self.norm_runs)


#: The :class:`ModelStructure` fields :meth:`ModelStructure._repair` may change (put back if the repair fails).
_REPAIRED = (
    "pre_norm",
    "final_norm",
    "post_norm",
    "hidden_scale",
    "vocab_limit",
    "logit_scale",
    "prefix_positions",
    "lm_head",
    "state_dims",
    "final_softcap",
)


def _check_each_ran_once(structure: ModelStructure, calls: dict[int, int]) -> tuple[int, ...]:
    """The blocks that did not run in the text-only dummy forward (e.g. cross-attention without images); raise
    when a block ran more than once (a looped model) or none ran."""
    again = {i: n for i, n in calls.items() if n > 1}
    if again:
        raise StructureError(
            f"blocks {sorted(again)} of {structure.block_path!r} ran {max(again.values())} times in one forward: the "
            "model loops over part of its block list (recurrent depth), so its residual stream is not one pass "
            "through the blocks and deltaexit cannot collect it or exit early in it (no override changes that)."
        )
    missing = [i for i in range(structure.num_layers) if i not in calls]
    if missing and len(missing) == structure.num_layers:
        raise StructureError(f"the block list {structure.block_path!r} did not run in a forward pass. {_OVERRIDE_HINT}")
    # The model skips these blocks on token ids alone (cross-attention blocks without image features): on such a
    # forward each is an identity map of the residual stream, which is what deltaexit records and runs.
    return tuple(missing)


def _module_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every non-empty ``nn.ModuleList`` under ``root``, with its dotted path."""
    return [(name, m) for name, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def _describe_list(name: str, blocks: nn.ModuleList) -> str:
    """``'model.layers' (4: 2 x MambaLayer, 2 x AttentionLayer)`` for an error message."""
    counts: dict[str, int] = {}
    for block in blocks:
        counts[type(block).__name__] = counts.get(type(block).__name__, 0) + 1
    kinds = ", ".join(f"{n} x {cls}" for cls, n in counts.items())
    return f"{name!r} ({len(blocks)}: {kinds})"


def _embedding_scope(model: nn.Module, candidates: list[tuple[str, nn.ModuleList]]) -> list[tuple[str, nn.ModuleList]]:
    """The candidates under the smallest ancestor of the input embedding that holds any (the text decoder).

    In a multimodal wrapper the token embedding sits in the text decoder, so this keeps a vision tower's
    layer list out; without an input embedding every candidate stays.
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get_embeddings() if callable(get_embeddings) else None
    except Exception:  # some wrappers raise instead of returning None
        embeddings = None
    path = _path_of(model, embeddings) if isinstance(embeddings, nn.Module) else None
    if path is None:
        return candidates
    parts = path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        scoped = [(n, m) for n, m in candidates if not prefix or n.startswith(prefix + ".")]
        if scoped:
            return scoped
    return candidates


def _outermost(lists: list[tuple[str, nn.ModuleList]]) -> list[tuple[str, nn.ModuleList]]:
    """Drop lists inside another one's blocks (the experts of an MoE layer are part of a block, not the blocks)."""
    return [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists)]


def _shallowest(lists: list[tuple[str, nn.ModuleList]]) -> list[tuple[str, nn.ModuleList]]:
    depth = min(n.count(".") for n, _ in lists)
    return [(n, m) for n, m in lists if n.count(".") == depth]


def _find_blocks(model: nn.Module, root: nn.Module) -> nn.ModuleList:
    """The decoder's block list, found by structure.

    Candidates are the non-empty ``nn.ModuleList``s under ``root`` (the whole model when ``root`` holds none)
    inside the text decoder (see :func:`_embedding_scope`), of the config's ``num_hidden_layers`` length when
    it says (lists inside another candidate are part of a block). One list whose blocks share a class wins at
    the shallowest depth; else one list of mixed block classes (hybrid models interleave e.g. Mamba and
    attention blocks in one list); else, when no list has the config's length, the one list of one block
    class. Several lists at that depth that hold one layer's parts each, called layer by layer (XLM's parallel
    ``attentions``/``ffns``/norm lists), give one virtual block per layer (:mod:`deltaexit.parallel`). Anything
    else is a :class:`StructureError` naming the lists found and the override to pass.
    """
    n_layers = config_int(text_config(model), NUM_LAYERS_ATTRS)
    everything = _module_lists(model)
    under_root = _module_lists(root) if root is not model else []
    prefix = _path_of(model, root) if under_root else None
    candidates = [(f"{prefix}.{n}" if prefix else n, m) for n, m in under_root] or everything
    candidates = _embedding_scope(model, candidates)
    matching = [(n, m) for n, m in candidates if n_layers is None or len(m) == n_layers]
    matching = _outermost(matching)
    homogeneous = [(n, m) for n, m in matching if len({type(b) for b in m}) == 1]
    # The config's count may be another stack's (BART's num_hidden_layers is its encoder's): then the one
    # list of one block class in the decoder is the blocks.
    other_count = [(n, m) for n, m in _outermost(candidates) if len({type(b) for b in m}) == 1]
    other_count = other_count if not matching else []
    for group in (homogeneous, matching, other_count):
        if not group:
            continue
        shallowest = _shallowest(group)
        if len(shallowest) == 1:
            return shallowest[0][1]
        parallel = _parallel_blocks(model, shallowest)
        if parallel is not None:
            return parallel
        raise StructureError(
            f"found several candidate block lists {', '.join(_describe_list(n, m) for n, m in shallowest)}"
            + (f" (the config says num_hidden_layers={n_layers})" if n_layers is not None else "")
            + "; cannot tell which is the decoder's. Pass the block list explicitly, e.g. dx.find_structure(model, "
            f"blocks={shallowest[0][0]!r}); the same keyword works for dx.collect(...) and dx.Lens.from_model(...)."
        )
    found = ", ".join(_describe_list(n, m) for n, m in everything) or "none"
    example = everything[0][0] if everything else "model.layers"
    raise StructureError(
        "found no nn.ModuleList of decoder blocks"
        + (f" with num_hidden_layers={n_layers} entries" if n_layers is not None else "")
        + f" in {type(model).__name__}; the module lists it holds: {found}. Pass the block list explicitly: "
        f"dx.find_structure(model, blocks={example!r}) (a dotted path, an nn.ModuleList, or a sequence of the "
        f"block modules in order); the same keyword works for dx.collect(...) and dx.Lens.from_model(...)."
    )


def _refuse_stacked_readout(structure: ModelStructure, ids: torch.Tensor, diff: str) -> None:
    """Raise, naming the module, when the logits are read from the last block's output together with a stack of
    earlier states (:func:`deltaexit.stacked.stacked_state_readout`): no lens on one block's output can match."""
    try:
        readout = stacked_state_readout(structure.model, structure.blocks, ids)
    except Exception:  # the check's forward ran once already; leave the plain mismatch to report
        return
    if readout is None:
        return
    raise StructureError(
        f"the lens on the last block's output cannot reproduce {type(structure.model).__name__}'s logits (max abs "
        f"diff {diff}): {readout} (e.g. attention residuals over earlier block states), so its residual state is "
        "more than one block's output; deltaexit collects, reads and exits from one [batch, seq, hidden] state per "
        "block, and no override changes that."
    )


def _parallel_blocks(model: nn.Module, lists: list[tuple[str, nn.ModuleList]]) -> ParallelBlocks | None:
    """The virtual blocks (:class:`deltaexit.parallel.ParallelBlocks`) when ``lists`` are the parts of one layer each,
    kept in parallel lists of one module (XLM's ``attentions``/``layer_norm1``/``ffns``/``layer_norm2``): the same
    length, one class each, not all one class, and a forward calls them layer by layer; None when they are not.

    Raises :class:`StructureError` when they are one layer's parts but no block can stand for a layer (see
    :func:`deltaexit.parallel.parallel_blocks`): then no module maps the residual stream from one layer to the next.
    """
    parents = {n.rpartition(".")[0] for n, _ in lists}
    lengths = {len(m) for _, m in lists}
    kinds = [type(m[0]) for _, m in lists]
    if len(lists) < 2 or len(parents) != 1 or len(lengths) != 1 or len(set(kinds)) < 2:
        return None
    ids = (torch.arange(6, device=input_device(model)) * 7 + 1).remainder(_vocab_size(model)).unsqueeze(0)
    found = parallel_blocks(model, lists, ids)
    if not isinstance(found, str):
        return found
    names = ", ".join(repr(n) for n, _ in lists)
    parent = parents.pop() or type(model).__name__
    raise StructureError(
        f"the layers of {type(model).__name__} are not block modules: {parent!r} keeps each layer's parts in "
        f"parallel lists {names} ({lengths.pop()} entries each: {', '.join(k.__name__ for k in kinds)}) and its "
        f"forward wires them together itself, and no virtual block over them carries the residual stream: {found}. "
        "deltaexit hooks a block's input and output: it cannot collect this model or exit early in it, and no "
        "blocks=... override can name its layers (an override needs one module per layer, an nn.ModuleList or a "
        "sequence of modules, whose input and output are the hidden states)."
    )


def _blocks_parent(model: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The module that holds ``blocks`` as a direct child, or None (a list built from an override)."""
    for module in model.modules():
        if any(child is blocks for child in module.children()):
            return module
    return None


def _find_final_norm(model: nn.Module, root: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The final norm: a common name on the decoder root or on the blocks' parent, else a norm class after them."""
    parent = _blocks_parent(model, blocks)
    for holder in dict.fromkeys(h for h in (root, parent) if h is not None):
        for name in FINAL_NORM_NAMES:
            module = getattr(holder, name, None)
            if isinstance(module, nn.Module) and module is not blocks:
                return module
    # Fall back to a direct child of the blocks' parent whose class name says it is a norm, registered after them.
    seen_blocks = False
    for _name, child in (parent or root).named_children():
        if child is blocks:
            seen_blocks = True
            continue
        if seen_blocks and "norm" in type(child).__name__.lower():
            return child
    return None


def _find_post_norm(root: nn.Module) -> tuple[nn.Module, ...]:
    found = []
    for name in POST_NORM_NAMES:
        module = getattr(root, name, None)
        if isinstance(module, nn.Module):
            found.append(module)
    return tuple(found)


def _logit_steps(model: nn.Module) -> dict[str, float | None]:
    cfg = text_config(model)
    steps: dict[str, float | None] = {}
    for attr, key in LOGIT_CONFIG_ATTRS:
        value = getattr(cfg, attr, None)
        steps[key] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    # A scaling of exactly 1 is a no-op; keep it out of the description.
    for key in ("logit_scale", "logit_divisor"):
        if steps[key] == 1.0:
            steps[key] = None
    return steps


# Discovered structures, per model, with the fingerprint of the modules they were found from: swapping the head,
# the decoder or one of the decoder's direct children (e.g. the final norm) changes it and discovery runs again.
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], ModelStructure]] = weakref.WeakKeyDictionary()


def _decoder_root(model: nn.Module) -> nn.Module:
    """``model.get_decoder()`` when it returns a module, else the model itself."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except Exception:  # some wrappers raise instead of returning None
            decoder = None
        # A decoder is a module holding the blocks (ModernBERT-decoder's get_decoder() returns its head).
        if isinstance(decoder, nn.Module) and any(isinstance(m, nn.ModuleList) for m in decoder.modules()):
            return decoder
    return model


def _fingerprint(model: nn.Module) -> tuple[int, ...]:
    head = output_embeddings(model)
    root = _decoder_root(model)
    return (id(head), id(root), *(id(child) for child in root.children()))


def _resolve_optional(model: nn.Module, path: object) -> nn.Module | None:
    """An optional override (a dotted path, a module, or None for "the model has none")."""
    if path is not None and not isinstance(path, (str, nn.Module)):
        raise TypeError(f"expected a dotted path, an nn.Module or None, got {type(path).__name__}")
    return resolve_module(model, path)


def _resolve_required(model: nn.Module, path: str | nn.Module) -> nn.Module:
    """A required override (a dotted path or a module)."""
    module = _resolve_optional(model, path)
    if module is None:
        raise StructureError(f"an override resolved to None; pass a dotted path or a module. {_OVERRIDE_HINT}")
    return module


def _resolve_blocks(
    model: nn.Module, root: nn.Module, blocks: str | nn.ModuleList | Sequence[nn.Module] | None
) -> nn.ModuleList:
    """The block list: discovered under ``root``, or the override (dotted path, ModuleList or modules)."""
    if blocks is None:
        block_list = _find_blocks(model, root)
    elif isinstance(blocks, str):
        resolved = resolve_module(model, blocks)
        if not isinstance(resolved, nn.ModuleList):
            raise StructureError(f"blocks={blocks!r} is a {type(resolved).__name__}, not an nn.ModuleList.")
        block_list = resolved
    elif isinstance(blocks, nn.ModuleList):
        block_list = blocks
    else:
        block_list = nn.ModuleList(list(blocks))
    if len(block_list) == 0:
        raise StructureError(f"the block list is empty. {_OVERRIDE_HINT}")
    return block_list


_UNSET = object()


def find_structure(
    model: nn.Module,
    *,
    blocks: str | nn.ModuleList | Sequence[nn.Module] | None = None,
    final_norm: str | nn.Module | object | None = _UNSET,
    post_norm: Sequence[str | nn.Module] | None = None,
    lm_head: str | nn.Module | None = None,
    logit_scale: float | object | None = _UNSET,
    logit_divisor: float | object | None = _UNSET,
    final_softcap: float | object | None = _UNSET,
    logit_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    validate: bool = True,
) -> ModelStructure:
    """Locate blocks, final norm, head and logit steps of a causal LM.

    Discovery starts from ``model.get_decoder()``: the block list is the one
    homogeneous ``nn.ModuleList`` whose length is the text config's
    ``num_hidden_layers``; the final norm is found by common names
    (:data:`FINAL_NORM_NAMES`); the head is ``model.get_output_embeddings()``;
    logit steps come from the config. The result is checked once with a dummy
    forward (``validate=True``) and cached per model when no override is given.

    Args:
        model: A ``transformers`` causal LM (anything with ``.logits`` in its output).
        blocks: Override for the block list (dotted path, ModuleList or sequence of modules).
        final_norm: Override for the final norm; ``None`` means the model has none.
        post_norm: Override for modules applied after the final norm.
        lm_head: Override for the head.
        logit_scale: Override for a multiplier on the logits.
        logit_divisor: Override for a divisor of the logits.
        final_softcap: Override for final soft-capping.
        logit_transform: Extra callable applied to the logits last.
        validate: Run the dummy-forward check.

    Returns:
        The :class:`ModelStructure`.

    Raises:
        StructureError: A piece was not found, or the check failed; the message says how to override.

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> s = find_structure(model, blocks="transformer.h", final_norm="transformer.ln_f")
        >>> s.num_layers, s.validated
        (3, True)
    """
    overrides = (
        blocks is not None
        or final_norm is not _UNSET
        or post_norm is not None
        or lm_head is not None
        or logit_scale is not _UNSET
        or logit_divisor is not _UNSET
        or final_softcap is not _UNSET
        or logit_transform is not None
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch nn.Module causal LM, got {type(model).__name__}")
    check_causal_lm(model)
    fingerprint = _fingerprint(model)
    if not overrides and model in _CACHE:
        key, cached = _CACHE[model]
        if key == fingerprint and (cached.validated or not validate):
            return cached

    root = _decoder_root(model)
    block_list = _resolve_blocks(model, root, blocks)
    norm = _find_final_norm(model, root, block_list) if final_norm is _UNSET else _resolve_optional(model, final_norm)
    posts = _find_post_norm(root) if post_norm is None else tuple(_resolve_required(model, p) for p in post_norm)
    if lm_head is None:
        head = output_embeddings(model)
        if head is None:
            raise StructureError(f"model.get_output_embeddings() returned None. {_OVERRIDE_HINT}")
    else:
        head = _resolve_required(model, lm_head)

    steps = _logit_steps(model)
    structure = ModelStructure(
        model=model,
        blocks=block_list,
        final_norm=norm,
        post_norm=posts,
        lm_head=head,
        logit_scale=steps["logit_scale"] if logit_scale is _UNSET else logit_scale,  # type: ignore[arg-type]
        logit_divisor=steps["logit_divisor"] if logit_divisor is _UNSET else logit_divisor,  # type: ignore[arg-type]
        final_softcap=steps["final_softcap"] if final_softcap is _UNSET else final_softcap,  # type: ignore[arg-type]
        logit_transform=logit_transform,
    )
    if validate:
        structure.validate(repair=not overrides)
    if not overrides:
        _CACHE[model] = (fingerprint, structure)
    return structure
