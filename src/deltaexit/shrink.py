"""Shrink any ``transformers`` config to a tiny one by one general procedure (no table per model type).

The procedure reads the *default* config (``AutoConfig.for_model(model_type)``) and each nested sub-config
(``text_config``, ``vision_config``, ...) and rewrites its fields by **role**, recognised by field name:

1. **Widths scale with the hidden size** (``hidden_size``/``d_model``/``n_embd``/..., FFN and intermediate sizes,
   any other int equal to the hidden size): ``tiny = default * TINY.hidden / main_hidden``, rounded up to a
   multiple of 16 (so 4096 -> 64, 11008 -> 176). One factor for the whole config tree (``main_hidden``: the
   config's own hidden size, else its text config's, else its largest sub-config's), so widths that are equal
   across sub-configs (a vision tower's output and the text hidden size) stay equal.
2. **Heads and head sizes are fixed**: attention/linear-attention/SSM head counts -> ``TINY.heads``; KV-head counts
   keep the default's kind (as many as the heads, one, or a group: -> ``heads``, 1 or 2); head sizes ->
   ``TINY.head_dim`` (MLA's rotary and no-rope parts too; a partial ``rotary_dim`` keeps its share of the head);
   a head count whose product with a head size equals a named width other than the hidden size at default
   (``num_heads * head_dim == expand * hidden_size`` in Mamba2) is re-solved to keep the product.
3. **Counts capped**: experts -> at most 4, experts per token 2, shared experts 1, expert groups 2 (1 chosen);
   low ranks (``*_rank``: MLA q/kv, LoRA-like adapters) -> at most 16; SSM state sizes -> 8; vocabulary ->
   ``TINY.vocab`` (and every other int equal to the default vocabulary); positions -> at most 256; attention windows
   and chunks of text configs -> at most 8 (so a 14-token test crosses them); any other unnamed int above 512 -> 64.
   Special token ids that fall outside the tiny vocabulary are remapped to distinct ids at its top. A ``default_x``
   left ``None`` whose config lists its choices (``xs``: Xmod's ``languages``) gets the first.
4. **Layers**: the layer count -> ``TINY.layers`` (never more than the default's where a per-layer list is there); a
   per-layer list (``layer_types``, ``mlp_layer_types``, ``no_rope_layers``, ...: any list as long as the default
   layer count) is cut to the tiny count *keeping at least one layer of each kind* the default has, two where it has
   two or more (missing kinds replace the last entries; the count grows when there are more kinds than layers); a
   list of layer indices (``moe_layers``, ``full_attn_idxs``, ...) is mapped through the same cut; run-length
   patterns (``[[kinds, repeat]]``) are re-encoded; layer periods/intervals/steps -> 2 (their offsets modulo 2);
   other ints naming layers (``first_k_dense_replace``, ``num_kv_shared_layers``, ...) scale with the layer count (at
   least 1 if non-zero, an end index stays the last layer). The field ``num_hidden_layers`` reads (an
   encoder-decoder config's ``encoder_layers``, which sizes its causal LM's cache) gets the tiny count whatever its
   default. A hybrid config whose default layers are all recurrent (``linear_attention``) although it defines
   attention heads gets its last layer as ``full_attention`` (through ``layer_types`` or a ``None`` attention-layer
   index list such as ``attn_layer_indices``): ``transformers``' ``generate`` needs one attention layer in such a
   cache, and the released checkpoints of these types have them.
5. A heterogeneous config's ``per_layer_config`` (layer index -> overrides) follows the same cut, its values
   shrunk by the same roles; an override that differed from the global value still differs, in the same ratio
   (Gemma 4's global layers keep twice the head size). Head sizes, KV-head counts, expert counts (routed and
   shared) and experts per token a default leaves ``None`` get the tiny value; ``is_decoder`` is set (every type
   here is a causal LM).
6. A ``head_dim`` equal to hidden / heads at default stays so; int lists that sum to the hidden size
   (``axial_pos_embds_dim``) or to half the head size (rope's ``mrope_section``) at default are rescaled to sum to
   the tiny one; a rope ``original_max_position_embeddings`` keeps its ratio (the YaRN/LongRoPE ``factor``) to
   the tiny position count. A width the config derives (a property with its own rounding, xLSTM's ``qk_dim``) that
   equalled hidden x a ``*_factor`` field at default is kept equal by re-solving the factor.

The shrunk config is rebuilt from the default's class with the new fields (sub-configs passed as dicts), so
whatever its ``__init__`` derives (e.g. ``layer_types`` from a pattern) is derived again; when that rebuild is
refused, the fields are set on a copy of the default instead. :func:`tiny_model_for` builds it; when the model
does not build, it tries once more with twice the layers.

Example:
    >>> config = shrink_config("llama")
    >>> config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size
    (64, 4, 4, 256)
    >>> shrink_config("gemma3_text").layer_types
    ['sliding_attention', 'sliding_attention', 'full_attention', 'full_attention']
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["TINY", "TinySizes", "shrink_config", "tiny_model_for"]


@dataclass(frozen=True)
class TinySizes:
    """The target sizes of :func:`shrink_config`."""

    hidden: int = 64
    heads: int = 4
    head_dim: int = 16
    layers: int = 4
    vocab: int = 256
    positions: int = 256
    window: int = 8
    experts: int = 4
    experts_per_token: int = 2
    shared_experts: int = 1
    rank: int = 16
    state: int = 8
    #: Head sizes scaled by one factor (the smallest default head size -> ``head_dim``) instead of all set to
    #: ``head_dim``, so sums and ratios between them hold (:func:`shrink_config` retries so when a config's
    #: validator refuses the fixed sizes).
    proportional_heads: bool = False


TINY = TinySizes()

_HIDDEN = {
    "hidden_size",
    "d_model",
    "n_embd",
    "emb_dim",
    "embedding_dim",
    "hidden_size_global",
    "lru_width",
    "attention_hidden_size",
    "word_embed_proj_dim",
    "embedding_size",
    "input_embedding_size",
    "output_embedding_size",
    "out_hidden_size",
    "backbone_hidden_size",
    "mamba_d_ssm",
    "dim_model",
}
_HIDDEN_NAMES = ("hidden_size", "d_model", "n_embd", "emb_dim", "embedding_dim", "dim_model")
_WIDTH_WORDS = ("intermediate", "ffn", "inner", "dim_ff", "d_ff", "dff", "feed_forward", "mlp_dim", "hidden_size")
_HEADS = {
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "attention_heads",
    "decoder_attention_heads",
    "encoder_attention_heads",
    "num_decoder_attention_heads",
    "num_encoder_attention_heads",
    "swa_num_attention_heads",
    "conf_num_attention_heads",
    "index_n_heads",
    "linear_num_heads",
    "linear_num_value_heads",
    "mamba_n_heads",
    "mamba_num_heads",
    "n_mamba_heads",
    "heads_per_ngram",
}
_KV_HEADS = {
    "num_key_value_heads": "num_attention_heads",
    "num_kv_heads": "num_attention_heads",
    "kv_n_heads": "n_heads",
    "swa_num_key_value_heads": "swa_num_attention_heads",
    "num_query_groups": "num_attention_heads",
    "linear_num_key_heads": "linear_num_value_heads",
    "n_groups": "num_heads",
    "mamba_n_groups": "mamba_n_heads",
    "mamba_ngroups": "mamba_n_heads",
}
_HEAD_DIMS = {
    "head_dim",
    "d_head",
    "dim_head",
    "kv_channels",
    "d_kv",
    "swa_head_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_head_dim",
    "attention_head_dim",
    "mamba_d_head",
    "mamba_head_dim",
    "mamba_headdim",
    "index_head_dim",
    "attention_head_size",
    "qk_nope_head_dim",
    "v_head_dim",
}
_LAYERS = {
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "decoder_layers",
    "num_decoder_layers",
    "encoder_layers",
    "num_encoder_layers",
    "conf_num_hidden_layers",
    "num_layers_per_stack",
    "num_blocks",
    "depth",
}
_EXPERTS = {"num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "zero_expert_num"}
_TOP_K = {"num_experts_per_tok", "moe_top_k", "moe_topk", "moe_k", "num_experts_per_token"}
_SHARED = {"n_shared_experts", "num_shared_experts", "moe_num_shared_experts"}
_GROUPS = {"n_group", "num_expert_group"}
_STATE = {"state_size", "mamba_d_state", "ssm_state_size", "d_state", "time_step_rank", "mamba_dt_rank"}
_POSITIONS = {
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "max_seq_len",
    "context_length",
    "max_target_positions",
    "model_max_length",
    "original_max_position_embeddings",
    "max_source_positions",
    "num_position_embeddings",
}
_WINDOWS = {
    "sliding_window",
    "window_size",
    "sliding_window_size",
    "attention_window_size",
    "local_attention",
    "attention_chunk_size",
    "keep_window_size",
    "local_attention_window_len",
}
_PERIOD_SUFFIXES = ("_period", "_interval", "_step", "every_n_layers", "sliding_window_pattern", "layer_group_size")
_MLA_DIMS = ("qk_rope_head_dim", "qk_head_dim")
#: The per-layer kinds of recurrent (SSM, linear-attention) layers.
_RECURRENT_KINDS = {"linear_attention", "mamba", "mamba2"}
_INDEX_ENDS = ("indices", "idxs", "idx", "ids")
#: Size fields a default config may leave ``None`` although its model needs them: given the tiny value.
_NONE_FILLS = {
    "head_dim": "head_dim",
    "num_key_value_heads": "heads",
    "n_routed_experts": "experts",
    "n_shared_experts": "shared_experts",
    "num_experts_per_tok": "experts_per_token",
}
_TEXT_KEYS = {"", "text_config", "decoder", "decoder_config", "global_config", "llm_config", "language_config"}
#: Fields left as they are whatever their value (not sizes, or read only at training time).
_KEEP = {"seed", "chunk_size_feed_forward", "torch_dtype", "initializer_range", "patching_batch_size"}


def _ceil16(x: float) -> int:
    return max(16, math.ceil(x / 16.0) * 16)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_width(name: str) -> bool:
    return name in _HIDDEN or any(w in name for w in _WIDTH_WORDS)


def _first(fields: dict[str, Any], names: Any) -> int | None:
    for n in names:
        v = fields.get(n)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _cut_kinds(seq: list[Any], n: int) -> list[Any]:
    """``seq`` cut to ``n`` entries (more if it has more kinds), keeping of each kind as many entries as the default
    has, up to two (a kind whose layers share weights needs two); missing entries replace the last ones."""
    want: dict[Any, int] = {}
    for item in seq:
        want[item] = min(2, want.get(item, 0) + 1)
    n = max(n, sum(want.values()))
    out = list(seq[:n])
    for kind, count in want.items():
        while out.count(kind) < count:
            spare = [i for i in range(n) if out.count(out[i]) > want[out[i]]]
            if not spare:
                break
            out[spare[-1]] = kind
    return out


def _layer_count_needed(fields: dict[str, Any], layers0: int, tiny: TinySizes) -> int:
    """The tiny layer count: ``tiny.layers``, more when a per-layer list has more kinds, never more than the default
    when a per-layer list (which cannot grow) is there."""
    need, lists = tiny.layers, False
    for v in fields.values():
        if _is_index_list(v, layers0):
            lists = True
        elif isinstance(v, (list, tuple)) and len(v) == layers0:
            lists = True
            counts: dict[str, int] = {}
            for x in v:
                counts[repr(x)] = min(2, counts.get(repr(x), 0) + 1)
            need = max(need, sum(counts.values()))
    return min(need, layers0) if lists else need


def _is_index_list(v: Any, layers0: int) -> bool:
    return (
        isinstance(v, (list, tuple))
        and len(v) > 0
        and all(_is_int(x) and 0 <= x < layers0 for x in v)
        and all(a < b for a, b in itertools.pairwise(v))
    )


def _cut_index_list(v: list[int], layers0: int, n: int) -> list[int]:
    member = [i in set(v) for i in range(layers0)]
    cut = _cut_kinds(member, n)
    return [i for i, m in enumerate(cut) if m]


def _run_length(v: Any, layers0: int) -> bool:
    """``[[kinds, repeat], ...]`` whose expansion has the default layer count (GPT-Neo's ``attention_types``)."""
    try:
        return isinstance(v, list) and sum(len(k) * int(r) for k, r in v) == layers0
    except (TypeError, ValueError):
        return False


def _shrink_layer_field(name: str, v: Any, layers0: int, n: int) -> Any:
    """Per-layer lists, index lists, run-length patterns, periods and layer-count-like ints."""
    if _is_index_list(v, layers0):
        return _cut_index_list(list(v), layers0, n)
    if isinstance(v, (list, tuple)) and len(v) == layers0:
        return _cut_kinds(list(v), n)
    if _run_length(v, layers0):
        kinds = [k for k, _ in v]
        flat = _cut_kinds([x for k, r in v for x in list(k) * int(r)], n)
        unit = list(kinds[0])
        if len(flat) % len(unit) == 0 and flat == unit * (len(flat) // len(unit)):
            return [[unit, len(flat) // len(unit)]]
        return [[[x], 1] for x in flat]
    if not _is_int(v):
        return v
    if name.endswith(_PERIOD_SUFFIXES):
        return min(v, 2)
    if name.endswith("_offset"):
        return v % 2 if v > 1 else v
    if "layer" in name and 0 < v <= layers0:
        if v == layers0:
            return n
        if v == layers0 - 1:
            return n - 1
        return min(n - 1, max(1, round(v * n / layers0)))
    return v


def _remap_token_ids(fields: dict[str, Any], out: dict[str, Any], vocab: int) -> None:
    taken = {v for k, v in fields.items() if k.endswith(("token_id", "token_index")) and _is_int(v) and v < vocab}
    nxt = vocab - 1

    def fresh() -> int:
        nonlocal nxt
        while nxt in taken:
            nxt -= 1
        taken.add(nxt)
        nxt -= 1
        return nxt + 1

    for k, v in fields.items():
        if not k.endswith(("token_id", "token_index", "token_ids")):
            continue
        if _is_int(v) and v >= vocab:
            out[k] = fresh()
        elif isinstance(v, list) and any(_is_int(x) and x >= vocab for x in v):
            out[k] = [fresh() if _is_int(x) and x >= vocab else x for x in v]


def _choices(fields: dict[str, Any], name: str) -> list[Any]:
    """The choices a ``default_x`` field picks from: a non-empty ``xs`` list of strings (``languages``)."""
    v = fields.get(name.removeprefix("default_") + "s")
    return list(v) if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v) else []


def _sums_to(v: Any, total: int | None) -> bool:
    return (
        bool(total) and isinstance(v, (list, tuple)) and len(v) > 1 and all(_is_int(i) for i in v) and sum(v) == total
    )


def _rescale(v: list[int], total: int) -> list[int]:
    """Positive ints in ``v``'s proportions summing to ``total``."""
    scaled = [max(1, i * total // sum(v)) for i in v]
    scaled[-1] += total - sum(scaled)
    return scaled


def _shrink_rope(v: dict[str, Any], head_dim0: int | None, head_dim: int, positions: int) -> dict[str, Any]:
    out = dict(v)
    for k, x in v.items():  # one rope dict per layer kind (Gemma 3/4)
        if isinstance(x, dict):
            out[k] = _shrink_rope(x, head_dim0, head_dim, positions)
    original = v.get("original_max_position_embeddings")
    if isinstance(original, int) and original > positions:  # YaRN/LongRoPE: keep max / original equal to the factor
        factor = v.get("factor")
        out["original_max_position_embeddings"] = max(1, int(positions / factor)) if factor else positions
    for k, x in v.items():
        if head_dim0 and _sums_to(x, head_dim0 // 2):
            out[k] = _rescale(list(x), head_dim // 2)
    return out


def _shrink_int(name: str, v: int, fields: dict[str, Any], ctx: dict[str, Any], tiny: TinySizes) -> int:
    """The tiny value of one int field, by its role (see the module docstring)."""
    hidden0, vocab0 = ctx["hidden0"], ctx["vocab0"]
    if name in _KEEP or name.endswith(("token_id", "token_index")) or v <= 0:
        return v
    if name in _HEADS:
        return tiny.heads
    if name in _KV_HEADS:
        heads0 = _first(fields, (_KV_HEADS[name], "num_attention_heads", "num_heads"))
        if heads0 is not None and v >= heads0:
            return tiny.heads
        return 1 if v == 1 else 2
    if ctx.get("head_scale") and (name in _HEAD_DIMS or name in _MLA_DIMS):
        return max(2, 2 * round(v * ctx["head_scale"] / 2))
    if name in _HEAD_DIMS:
        return tiny.head_dim
    if name == "qk_rope_head_dim":
        return tiny.head_dim
    if name == "qk_head_dim":
        return 2 * tiny.head_dim
    if name in ("rotary_dim", "rotary_emb_base_dim"):
        head0 = fields.get("head_dim") or (hidden0 and hidden0 // (_first(fields, sorted(_HEADS)) or 1))
        return max(2, 2 * round(tiny.head_dim * v / head0 / 2)) if head0 else min(v, tiny.head_dim)
    if name in _HIDDEN or (hidden0 and v == hidden0 and v >= 256) or (_is_width(name) and v >= 64):
        return _ceil16(v * ctx["scale"])
    if name in _EXPERTS:
        return min(v, tiny.experts)
    if name in _TOP_K:
        return min(v, tiny.experts_per_token)
    if name in _SHARED:
        return min(v, tiny.shared_experts)
    if name in _GROUPS:
        return min(v, 2)
    if name == "topk_group":
        return 1
    if name.endswith("_rank"):
        return min(v, tiny.rank)
    if name in _STATE:
        return min(v, tiny.state)
    if name == "vocab_size" or (vocab0 and v == vocab0):
        return tiny.vocab
    if name in _POSITIONS:
        return min(v, tiny.positions)
    if name in _WINDOWS or name.endswith("chunk_size"):
        return min(v, tiny.window) if ctx["text"] else v
    if v > 512:
        return 64
    return v


def _resolve_products(fields: dict[str, Any], out: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Re-solve head counts whose product with a head size equalled a width at default."""
    widths0 = {k: v for k, v in fields.items() if _is_int(v) and v >= 64 and k in _HIDDEN}
    for e in ("expand", "mamba_expand"):
        if _is_int(fields.get(e)) and ctx["hidden0"]:
            widths0[f"{e}*hidden"] = fields[e] * ctx["hidden0"]
    tiny_w = {k: out.get(k, v) for k, v in widths0.items() if "*" not in k}
    for e in ("expand", "mamba_expand"):
        if f"{e}*hidden" in widths0:
            tiny_w[f"{e}*hidden"] = out.get(e, fields[e]) * ctx["hidden"]
    for count in _HEADS:
        for dim in _HEAD_DIMS:
            c0, d0 = fields.get(count), fields.get(dim)
            if not (isinstance(c0, int) and isinstance(d0, int)) or dim not in out:
                continue
            for w, w0 in widths0.items():
                if c0 * d0 == w0 and w0 != ctx["hidden0"] and tiny_w[w] % out[dim] == 0:
                    out[count] = tiny_w[w] // out[dim]


def _keep_head_split(fields: dict[str, Any], out: dict[str, Any], ctx: dict[str, Any]) -> None:
    """A ``head_dim`` that was ``hidden / heads`` at default stays so (in configs narrower than the main one)."""
    heads0, head_dim0, hidden0 = fields.get("num_attention_heads"), fields.get("head_dim"), ctx["hidden0"]
    if not (isinstance(heads0, int) and isinstance(head_dim0, int) and hidden0) or heads0 * head_dim0 != hidden0:
        return
    heads = out.get("num_attention_heads", heads0)
    if ctx["hidden"] % heads == 0:
        out["head_dim"] = ctx["hidden"] // heads


def _shrink_fields(
    fields: dict[str, Any],
    *,
    text: bool,
    tiny: TinySizes,
    derived: dict[str, Any] | None = None,
    scale: float | None = None,
    counted: str | None = None,
) -> dict[str, Any]:
    """The tiny values of one (sub-)config's own fields (sub-configs excluded); ``derived``: per-layer lists the
    config computes (properties), counted for the layer count only; ``counted``: the field ``num_hidden_layers``
    reads (an encoder-decoder config's ``encoder_layers``), which gets the tiny count whatever its default."""
    hidden0 = _first(fields, _HIDDEN_NAMES)
    scale = scale or (tiny.hidden / hidden0 if hidden0 else 1.0)
    hidden = _ceil16(hidden0 * scale) if hidden0 else tiny.hidden
    ctx = {"hidden0": hidden0, "vocab0": fields.get("vocab_size"), "text": text, "hidden": hidden, "scale": scale}
    if tiny.proportional_heads:
        sizes = [v for k, v in fields.items() if (k in _HEAD_DIMS or k in _MLA_DIMS) and _is_int(v) and v > 0]
        ctx["head_scale"] = tiny.head_dim / min(sizes) if sizes else None
    layers0 = _first(fields, sorted(_LAYERS))
    n = _layer_count_needed({**(derived or {}), **fields}, layers0, tiny) if layers0 else tiny.layers
    out: dict[str, Any] = {}
    for name, v in fields.items():
        if name.startswith("_") or name in _KEEP:
            continue
        if _sums_to(v, hidden0):
            out[name] = _rescale(list(v), hidden)
            continue
        if name in _LAYERS and _is_int(v) and v > 0:
            out[name] = n if v == layers0 or name == counted else min(v, n)
        elif layers0 and (
            isinstance(v, (list, tuple))
            or name.endswith(_PERIOD_SUFFIXES + ("_offset",))
            or ("layer" in name and _is_int(v))
        ):
            new = _shrink_layer_field(name, v, layers0, n)
            if isinstance(new, list) and new and all(_is_int(x) for x in new) and not _is_index_list(v, layers0):
                role = name.replace("_per_layer", "")
                new = [_shrink_int(role, x, fields, ctx, tiny) for x in new]
            if new != v:
                out[name] = new
            elif _is_int(v):
                out[name] = _shrink_int(name, v, fields, ctx, tiny)
        elif _is_int(v):
            out[name] = _shrink_int(name, v, fields, ctx, tiny)
        elif v is None and name in _NONE_FILLS:
            out[name] = getattr(tiny, _NONE_FILLS[name])
        elif v is None and name.startswith("default_") and _choices(fields, name):
            out[name] = _choices(fields, name)[0]  # Xmod's default_language: the first of its languages
        elif name == "is_decoder" and v is False:
            out[name] = True  # every type here is a causal LM
        elif isinstance(v, dict) and name.startswith("rope"):
            heads0 = _first(fields, ("num_attention_heads",))
            head_dim0 = fields.get("head_dim") or (hidden0 // heads0 if hidden0 and heads0 else None)
            out[name] = _shrink_rope(v, head_dim0, tiny.head_dim, out.get("max_position_embeddings", tiny.positions))
    _resolve_products(fields, out, ctx)
    _keep_head_split(fields, out, ctx)
    _remap_token_ids(fields, out, out.get("vocab_size", tiny.vocab))
    return {k: v for k, v in out.items() if fields.get(k) != v}


def _sub_configs(config: Any) -> dict[str, Any]:
    from transformers import PretrainedConfig

    return {k: v for k, v in vars(config).items() if isinstance(v, PretrainedConfig)}


def _derived_layer_lists(config: Any, own: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists a config computes rather than stores (Jamba's ``layers_block_type`` from periods)."""
    out = {}
    for name in ("layer_types", "layers_block_type", "block_types", "attention_layers"):
        if name in own:
            continue
        try:
            value = getattr(config, name, None)
        except Exception:  # a heterogeneous config may refuse a global read
            continue
        if isinstance(value, (list, tuple)):
            out["_derived_" + name] = list(value)
    return out


def _main_hidden(config: Any) -> int | None:
    """The hidden size every width scales by: the config's own, its text config's, else its largest sub-config's."""
    own = _first(vars(config), _HIDDEN_NAMES)
    if own:
        return own
    subs = _sub_configs(config)
    text = next((subs[k] for k in _TEXT_KEYS if k in subs), None)
    if text is not None and _main_hidden(text):
        return _main_hidden(text)
    return max((h for h in map(_main_hidden, subs.values()) if h), default=None)


def _plan(config: Any, key: str, tiny: TinySizes, scale: float | None = None) -> tuple[dict[str, Any], Any]:
    if scale is None:
        main = _main_hidden(config)
        scale = tiny.hidden / main if main else 1.0
    own = {k: v for k, v in vars(config).items() if k not in _sub_configs(config)}
    derived = _derived_layer_lists(config, own)
    counted = (getattr(type(config), "attribute_map", None) or {}).get("num_hidden_layers")
    changes = _shrink_fields(own, text=key in _TEXT_KEYS, tiny=tiny, derived=derived, scale=scale, counted=counted)
    subs = {k: _plan(sub, k, tiny, scale) for k, sub in _sub_configs(config).items()}
    return changes, subs  # type: ignore[return-value]


def _per_layer_config(config: Any, d: dict[str, Any], tiny: TinySizes) -> None:
    """Map a heterogeneous config's ``per_layer_config`` (layer index -> overrides) through the layer cut: tiny
    layer ``i`` takes the (shrunk) overrides of default layer ``i``, or of the first default layer of its kind."""
    overrides = {int(k): v for k, v in (d.get("per_layer_config") or {}).items()}
    if not overrides:
        return
    kinds0, kinds = getattr(config, "layer_types", None), d.get("layer_types")
    n = _first(d, sorted(_LAYERS)) or tiny.layers
    own = {k: v for k, v in vars(config).items() if k not in _sub_configs(config)}
    new = {}
    for i in range(n):
        src = i
        if kinds0 is not None and kinds is not None and i < len(kinds) and (i >= len(kinds0) or kinds0[i] != kinds[i]):
            src = next((j for j, kind in enumerate(kinds0) if kind == kinds[i]), i)
        if src in overrides:
            shrunk = _shrink_fields({**own, **overrides[src]}, text=True, tiny=tiny)
            new[i] = {k: _still_different(k, shrunk.get(k, v), v, own, d) for k, v in overrides[src].items()}
    d["per_layer_config"] = new


def _still_different(key: str, tiny_value: Any, value: Any, own: dict[str, Any], d: dict[str, Any]) -> Any:
    """A per-layer override that differed from the global value at default still differs (in the same ratio)."""
    global0, global_tiny = own.get(key), d.get(key)
    if _is_int(value) and _is_int(global0) and _is_int(global_tiny) and value != global0 and tiny_value == global_tiny:
        return max(1, round(global_tiny * value / global0))
    return tiny_value


def _as_dict(config: Any, plan: Any, tiny: TinySizes) -> dict[str, Any]:
    changes, subs = plan
    d = config.to_dict()
    d.update(changes)
    _per_layer_config(config, d, tiny)
    for k, sub_plan in subs.items():
        d[k] = _as_dict(getattr(config, k), sub_plan, tiny)
    return d


def _apply_in_place(config: Any, plan: Any) -> None:
    changes, subs = plan
    for k, v in changes.items():
        setattr(config, k, v)
    for k, sub_plan in subs.items():
        _apply_in_place(getattr(config, k), sub_plan)


def _build(default: Any, plan: Any, tiny: TinySizes) -> Any | None:
    """The config rebuilt from the default's class with the plan's fields (None when its validators refuse)."""
    try:
        fields = _as_dict(default, plan, tiny)
        fields.pop("model_type", None)
        return type(default)(**{k: v for k, v in fields.items() if k != "transformers_version"})
    except Exception:  # a validator, a derived field
        return None


def _shrunk(default: Any, tiny: TinySizes, overrides: dict[str, Any]) -> tuple[Any, Any, TinySizes]:
    """The rebuilt config, its plan and sizes: with fixed head sizes, else proportional ones, else (both refused)
    the fixed plan's fields set on a copy of the default."""
    for sizes in (tiny, replace(tiny, proportional_heads=True)):
        changes, subs = _plan(default, "", sizes)
        plan = ({**changes, **overrides}, subs)
        config = _build(default, plan, sizes)
        if config is not None:
            return config, plan, sizes
    changes, subs = _plan(default, "", tiny)
    plan = ({**changes, **overrides}, subs)
    config = copy.deepcopy(default)
    _apply_in_place(config, plan)
    return config, plan, tiny


def _layer_kinds(config: Any) -> list[Any]:
    for name in ("layer_types", "layers_block_type"):
        try:
            kinds = getattr(config, name, None)
        except Exception:  # a heterogeneous config may refuse a global read
            continue
        if isinstance(kinds, (list, tuple)) and kinds:
            return list(kinds)
    return []


def _attention_layer(config: Any) -> dict[str, Any]:
    """Fields that make the last layer an attention layer, for a hybrid config whose layers are all recurrent
    although it defines attention heads (``transformers``' ``generate`` needs one attention layer in such a cache)."""
    kinds = _layer_kinds(config)
    try:
        heads = getattr(config, "num_attention_heads", None)
    except Exception:  # a heterogeneous config may refuse a global read
        return {}
    if not (isinstance(heads, int) and heads > 0 and kinds and set(kinds) <= _RECURRENT_KINDS):
        return {}
    own = vars(config)
    if isinstance(own.get("layer_types"), list):
        return {"layer_types": [*kinds[:-1], "full_attention"]}
    for name, v in own.items():  # the layers named attention ones by index (Bamba's attn_layer_indices)
        if v is None and "layer" in name and ("attn" in name or "attention" in name) and name.endswith(_INDEX_ENDS):
            return {name: [len(kinds) - 1]}
    return {}


def _own_properties(cls: type) -> list[str]:
    """The properties a config class defines itself (not ``PretrainedConfig``'s, some of which warn when read)."""
    from transformers import PretrainedConfig

    names: list[str] = []
    for klass in cls.__mro__:
        if klass is PretrainedConfig or not issubclass(klass, PretrainedConfig):
            break
        names += [name for name, attr in vars(klass).items() if isinstance(attr, property)]
    return names


def _derived_factors(default: Any, config: Any) -> None:
    """A width the config derives (a property, with its own rounding) that equalled hidden x a ``*_factor`` field
    at default is made so again by re-solving the factor (xLSTM's ``qk_dim``, which its layers compute unrounded)."""
    hidden0, hidden = _first(vars(default), _HIDDEN_NAMES), _first(vars(config), _HIDDEN_NAMES)
    props = _own_properties(type(default))
    for name, f0 in vars(default).items():
        if not (hidden0 and hidden and name.endswith("_factor") and isinstance(f0, float) and f0 > 0):
            continue
        for prop in props:
            try:
                w0, w = getattr(default, prop), getattr(config, prop)
            except Exception:  # a property that needs something the config lacks
                continue
            if _is_int(w0) and _is_int(w) and w0 == hidden0 * f0 and w != hidden * getattr(config, name):
                setattr(config, name, w / hidden)
    for key, sub in _sub_configs(default).items():
        _derived_factors(sub, getattr(config, key))


def shrink_config(model_type: str, tiny: TinySizes = TINY, **overrides: Any) -> Any:
    """The default config of ``model_type`` shrunk to ``tiny`` sizes (see the module docstring).

    Args:
        model_type: A ``transformers`` model type (a key of ``CONFIG_MAPPING``).
        tiny: The target sizes.
        **overrides: Top-level fields set after shrinking.

    Raises:
        ValueError: From ``AutoConfig.for_model`` for a name that is no model type (its default config's own
            errors pass through too).
    """
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    config, (top, subs), sizes = _shrunk(default, tiny, overrides)
    extra = {k: v for k, v in _attention_layer(config).items() if k not in overrides}
    if extra:
        config = _build(default, ({**top, **extra}, subs), sizes) or config
    _derived_factors(default, config)
    return config


def tiny_model_for(model_type: str, *, seed: int = 0, tiny: TinySizes = TINY, **overrides: Any) -> Any:
    """A tiny random eval-mode causal LM of ``model_type`` from :func:`shrink_config`.

    Example:
        >>> model = tiny_model_for("gpt2")
        >>> sum(p.numel() for p in model.parameters()) < 500_000
        True
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        config = shrink_config(model_type, tiny, **overrides)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()
    except Exception:  # e.g. layers sharing weights that need more of their kind: once more, twice the layers
        config = shrink_config(model_type, replace(tiny, layers=2 * tiny.layers), **overrides)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()
