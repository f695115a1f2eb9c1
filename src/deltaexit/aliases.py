"""Every name table the library uses to find a piece of a model, in one place.

Structure discovery (:mod:`deltaexit.structure`) reads these tables; nothing else keeps its own list
of attribute or config names. A model that names a piece differently is handled by an override
(``dx.find_structure(model, final_norm="decoder.my_norm", ...)``), not by editing a table.

Example:
    >>> "norm" in FINAL_NORM_NAMES and ("q_proj", "k_proj", "v_proj") in QKV_NAMES
    True
"""

from __future__ import annotations

__all__ = [
    "CONTEXT_LENGTH_ATTRS",
    "FINAL_NORM_NAMES",
    "FUSED_QKV_NAMES",
    "HEAD_DIM_ATTRS",
    "HIDDEN_SIZE_ATTRS",
    "KV_HEADS_ATTRS",
    "LOGIT_CONFIG_ATTRS",
    "NUM_HEADS_ATTRS",
    "NUM_LAYERS_ATTRS",
    "POST_NORM_NAMES",
    "QKV_NAMES",
    "VOCAB_SIZE_ATTRS",
]

#: Attribute names that hold the final norm in common architectures.
FINAL_NORM_NAMES: tuple[str, ...] = (
    "norm",
    "final_layernorm",
    "final_layer_norm",
    "ln_f",
    "norm_f",
    "final_norm",
    "ln_final",
)
#: Attribute names of modules applied after the final norm and before the head.
POST_NORM_NAMES: tuple[str, ...] = ("project_out",)
#: Attribute names of separate query/key/value projections inside an attention module (query first).
QKV_NAMES: tuple[tuple[str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("query_proj", "key_proj", "value_proj"),
    ("q_lin", "k_lin", "v_lin"),
    ("wq", "wk", "wv"),
    ("q", "k", "v"),
)
#: Attribute names of fused query/key/value projections (GPT-2, Phi-3, Falcon, GPT-NeoX, Bloom, MPT...).
FUSED_QKV_NAMES: tuple[str, ...] = ("qkv", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack")
#: Config attributes that scale or cap the logits, in the order models apply them, and the
#: :class:`~deltaexit.structure.ModelStructure` field each one fills.
LOGIT_CONFIG_ATTRS: tuple[tuple[str, str], ...] = (
    ("logit_scale", "logit_scale"),
    ("logits_scaling", "logit_divisor"),
    ("final_logit_softcapping", "final_softcap"),
)
#: Config attributes giving the number of decoder blocks.
NUM_LAYERS_ATTRS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: Config attributes giving the residual-stream width.
HIDDEN_SIZE_ATTRS: tuple[str, ...] = ("hidden_size", "n_embd", "d_model", "dim")
#: Config attributes giving the vocabulary size.
VOCAB_SIZE_ATTRS: tuple[str, ...] = ("vocab_size", "n_vocab", "padded_vocab_size")
#: Config attributes giving the number of query heads.
NUM_HEADS_ATTRS: tuple[str, ...] = ("num_attention_heads", "n_head", "num_heads", "n_heads")
#: Config attributes giving the number of key/value heads (grouped-query attention).
KV_HEADS_ATTRS: tuple[str, ...] = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
#: Config attributes giving the per-head width.
HEAD_DIM_ATTRS: tuple[str, ...] = ("head_dim", "attention_head_size", "kv_channels")
#: Config attributes giving the longest context the model was built for.
CONTEXT_LENGTH_ATTRS: tuple[str, ...] = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
