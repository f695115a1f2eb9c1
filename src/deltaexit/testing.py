"""Tiny random models for tests, docs and benchmarks (built offline from configs).

Example:
    >>> model = tiny_model("llama", num_layers=3, hidden=32)
    >>> sum(p.numel() for p in model.parameters()) < 200_000
    True
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from deltaexit.measures.base import ConfidenceMeasure

__all__ = [
    "ARCHITECTURES",
    "ConstantScore",
    "cached_tiny_model",
    "hook_counts",
    "random_batch",
    "tiny_config",
    "tiny_model",
]

#: Architectures the test-suite and the support matrix cover.
ARCHITECTURES: tuple[str, ...] = (
    "gpt2",
    "gpt_neo",
    "gptj",
    "gpt_neox",
    "opt",
    "bloom",
    "falcon",
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi",
    "phi3",
    "stablelm",
    "olmo",
    "granite",
)


def tiny_config(
    model_type: str,
    *,
    num_layers: int = 3,
    hidden: int = 32,
    heads: int = 4,
    vocab: int = 128,
    **extra: Any,
):
    """A small random config of ``model_type`` with a uniform set of size knobs.

    Args:
        model_type: A ``transformers`` model type (e.g. ``"llama"``).
        num_layers: Decoder blocks.
        hidden: Hidden size (must be divisible by ``heads``).
        heads: Attention heads.
        vocab: Vocabulary size.
        **extra: Further config fields.
    """
    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
    head_dim = hidden // heads
    common: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    per_type: dict[str, dict[str, Any]] = {
        "gpt2": {
            "n_embd": hidden,
            "n_layer": num_layers,
            "n_head": heads,
            "n_positions": 256,
            "n_inner": 2 * hidden,
        },
        "gpt_neo": {
            "num_layers": num_layers,
            "attention_types": [[["global", "local"], num_layers // 2]] + [[["global"], num_layers % 2]],
            "window_size": 8,
            "max_position_embeddings": 256,
        },
        "gptj": {
            "n_embd": hidden,
            "n_layer": num_layers,
            "n_head": heads,
            "n_positions": 256,
            "rotary_dim": head_dim,
            "n_inner": 2 * hidden,
        },
        "gpt_neox": {"rotary_pct": 1.0},
        "opt": {"ffn_dim": 2 * hidden, "word_embed_proj_dim": hidden, "do_layer_norm_before": True},
        "bloom": {"n_layer": num_layers, "n_head": heads},
        "falcon": {"new_decoder_architecture": False, "multi_query": True, "alibi": False},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": heads},
        "llama": {"num_key_value_heads": max(1, heads // 2)},
        "mistral": {"num_key_value_heads": max(1, heads // 2), "sliding_window": 16},
        "qwen2": {"num_key_value_heads": max(1, heads // 2)},
        "qwen3": {"num_key_value_heads": max(1, heads // 2), "head_dim": head_dim},
        "gemma": {"num_key_value_heads": 1, "head_dim": head_dim},
        "gemma2": {
            "num_key_value_heads": max(1, heads // 2),
            "head_dim": head_dim,
            "sliding_window": 16,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
        },
        "phi": {"partial_rotary_factor": 0.5},
        "phi3": {"num_key_value_heads": heads},
        "stablelm": {"partial_rotary_factor": 0.25},
        "olmo": {},
        "granite": {
            "num_key_value_heads": max(1, heads // 2),
            "logits_scaling": 4.0,
            "residual_multiplier": 0.5,
            "embedding_multiplier": 2.0,
            "attention_multiplier": 1.0 / head_dim,
        },
    }
    fields = {**common, **per_type.get(model_type, {}), **extra}
    config = AutoConfig.for_model(model_type, **fields)
    return config


def tiny_model(model_type: str, *, seed: int = 0, **kwargs: Any) -> PreTrainedModel:
    """A tiny random causal LM of ``model_type`` in eval mode (see :func:`tiny_config`)."""
    config = tiny_config(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


@functools.lru_cache(maxsize=64)
def cached_tiny_model(model_type: str, num_layers: int = 3, hidden: int = 32, heads: int = 4, vocab: int = 128):
    """A tiny eval-mode model; cached, so tests must not modify it."""
    return tiny_model(model_type, num_layers=num_layers, hidden=hidden, heads=heads, vocab=vocab)


def hook_counts(model: torch.nn.Module) -> int:
    """Total number of hooks registered on every module of ``model``."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(getattr(module, "_forward_hooks_with_kwargs", {}))
    return total


def random_batch(vocab: int, batch: int, seq: int, *, seed: int = 0, pad: str | None = None):
    """Random ids (>= 3, so no special ids) and an attention mask with optional left/right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and seq > 1:
        for row in range(1, batch):
            n = int(torch.randint(0, seq - 1, (1,), generator=g))
            if pad == "left":
                mask[row, :n] = 0
                ids[row, :n] = 0
            else:
                mask[row, seq - n :] = 0
                ids[row, seq - n :] = 0
    return ids, mask


class ConstantScore(ConfidenceMeasure):
    """Scores ``value`` at every state: with a threshold at or below it and ``min_exit_layer=E``, every token
    exits after block E (a controlled exit depth for tests and benchmarks); above it, no token ever exits.

    Example:
        >>> from deltaexit.generation import EarlyExit
        >>> ee = EarlyExit(tiny_model("llama", num_layers=4), ConstantScore(), 0.5, "propagate", min_exit_layer=2)
    """

    name = "constant"

    def __init__(self, value: float = 1.0) -> None:
        self.value = float(value)

    def score(self, state: Any) -> torch.Tensor:
        structure = getattr(state.lens, "structure", None)  # a state of several streams ends in [streams, hidden]
        k = getattr(structure, "state_dims", 1)
        return torch.full(state.h_out.shape[: state.h_out.dim() - k], self.value, device=state.h_out.device)
