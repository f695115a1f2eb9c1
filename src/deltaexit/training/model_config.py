"""Llama (and GPT-NeoX) configurations for the reference models, and the named training presets.

Example:
    >>> config = reference_config(vocab_size=4096)          # the research note's shape
    >>> config.hidden_size, config.num_hidden_layers
    (64, 8)
    >>> reference_config(arch="gpt_neox").model_type
    'gpt_neox'
"""

from __future__ import annotations

from typing import Any

from transformers import GPTNeoXConfig, LlamaConfig, PretrainedConfig

__all__ = ["ARCHS", "PRESETS", "reference_config"]

#: Architectures ``deltaexit train --arch`` builds.
ARCHS = ("llama", "gpt_neox")


def reference_config(
    vocab_size: int = 4096,
    hidden: int = 64,
    heads: int = 4,
    ffn: int = 256,
    layers: int = 8,
    context: int = 256,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
    arch: str = "llama",
) -> PretrainedConfig:
    """A model configuration of the given shape, untied embeddings and RoPE in both architectures.

    ``arch="llama"``: :class:`~transformers.LlamaConfig` (RMSNorm, SwiGLU). ``arch="gpt_neox"``:
    :class:`~transformers.GPTNeoXConfig` (LayerNorm, GELU MLP, parallel residual, rotary on all head dims).

    Raises:
        ValueError: a non-positive size, ``hidden`` not divisible by ``heads``, or an unknown ``arch``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {list(ARCHS)}")
    sizes = {
        "vocab": vocab_size,
        "hidden": hidden,
        "heads": heads,
        "ffn": ffn,
        "layers": layers,
        "context": context,
    }
    bad = {k: v for k, v in sizes.items() if int(v) < 1}
    if bad:
        raise ValueError(f"model sizes must be positive integers, got {bad}")
    if hidden % heads:
        raise ValueError(f"--hidden {hidden} must be divisible by --heads {heads}")
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=context,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
            use_parallel_residual=True,
            layer_norm_eps=1e-5,
            initializer_range=0.02,
            tie_word_embeddings=False,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


_REF64: dict[str, Any] = {"hidden": 64, "heads": 4, "ffn": 256, "layers": 8, "context": 256, "vocab": 4096}
_REF256: dict[str, Any] = {
    "hidden": 256,
    "heads": 8,
    "ffn": 1024,
    "layers": 12,
    "context": 256,
    "vocab": 4096,
}

#: Named settings for ``deltaexit train --preset NAME``; explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    # 1000 steps with 2 threads: about 4 (plain) and 6 (layerskip) minutes on an idle 2-core machine.
    "ref64-plain": {
        **_REF64,
        "recipe": "plain",
        "steps": 1000,
        "warmup": 50,
        "batch_size": 8,
        "lr": 3e-3,
        "threads": 2,
    },
    "ref64-layerskip": {
        **_REF64,
        "recipe": "layerskip",
        "steps": 1000,
        "warmup": 50,
        "batch_size": 8,
        "lr": 3e-3,
        "threads": 2,
    },
    # 600 steps with 2 threads: about 40 minutes each on an idle 2-core machine.
    "ref256-plain": {**_REF256, "recipe": "plain", "steps": 600, "batch_size": 8, "lr": 1.5e-3, "threads": 2},
    # A model that is not exit-trained, of another architecture, for issue 13's "never slower" target
    # (benchmarks/untrained_models.py); not shipped.
    "neox-plain": {
        "arch": "gpt_neox",
        "hidden": 192,
        "heads": 6,
        "ffn": 768,
        "layers": 8,
        "context": 256,
        "vocab": 4096,
        "recipe": "plain",
        "steps": 400,
        "warmup": 30,
        "batch_size": 8,
        "lr": 2e-3,
        "threads": 2,
    },
    # Shipped as reference ``v3`` (12 layers, head about one block): see docs/reference-models.md.
    "ref256-layerskip": {
        **_REF256,
        "recipe": "layerskip",
        "steps": 600,
        "batch_size": 8,
        "lr": 1.5e-3,
        "threads": 2,
        "save_dtype": "bfloat16",  # 29 MB instead of 59 MB; loading upcasts to float32
    },
}
