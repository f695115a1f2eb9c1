"""Shared by every peer worker: the tiny models, the reference outputs, the timing loop, the output format.

Imports only ``torch`` and ``transformers`` (every peer environment has them); no deltaexit.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

#: Size knobs shared by every family (tiny, so the whole sweep takes seconds per peer).
SIZES = {"layers": 4, "hidden": 64, "heads": 4, "vocab": 256}

#: Extra config fields per family; the logit-transform families carry a non-trivial transform.
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": 2},
    "gpt2": {},
    "gemma2": {"num_key_value_heads": 2, "head_dim": 16, "final_logit_softcapping": 0.5, "sliding_window": 16},
    "granite": {"num_key_value_heads": 2, "logits_scaling": 4.0, "residual_multiplier": 0.5},
    "cohere": {"num_key_value_heads": 2, "logit_scale": 0.25},
    "opt": {"word_embed_proj_dim": 32, "ffn_dim": 128, "do_layer_norm_before": True},
    "qwen2": {"num_key_value_heads": 2},
    "mistral": {"num_key_value_heads": 2, "sliding_window": 16},
    "phi3": {"num_key_value_heads": 4},
    "gpt_neox": {"rotary_pct": 1.0},
}

#: What makes the last layer's lens differ from ``lm_head(norm(h))`` in each family.
LOGIT_TRANSFORM = {
    "gemma2": "final_logit_softcapping=0.5 (about the tiny model's logit scale)",
    "granite": "logits_scaling=4.0",
    "cohere": "logit_scale=0.25",
    "opt": "project_out (word_embed_proj_dim=32 != hidden 64)",
}

FAMILIES: tuple[str, ...] = tuple(FAMILY_FIELDS)
TIMING_FAMILY = "llama"


def config_fields(model_type: str, sizes: dict[str, int]) -> dict[str, Any]:
    """Config keyword arguments of a tiny ``model_type`` model."""
    layers, hidden, heads, vocab = sizes["layers"], sizes["hidden"], sizes["heads"], sizes["vocab"]
    fields: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    if model_type == "gpt2":
        fields.update(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, n_inner=2 * hidden)
        fields["tie_word_embeddings"] = True
    fields.update(FAMILY_FIELDS.get(model_type, {}))
    return fields


def build(model_type: str, *, seed: int = 0, sizes: dict[str, int] | None = None) -> Any:
    """A tiny random causal LM of ``model_type`` in eval mode, float32, eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **config_fields(model_type, sizes or SIZES))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.config.architectures = [type(model).__name__]  # as a saved checkpoint's config has
    return model.eval()


def tiny_tokenizer(vocab: int):
    """An offline word-level tokenizer over ``t0 .. t{vocab-1}`` for peers that insist on one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3"
    )


def input_ids(vocab: int, *, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """A fixed random batch of token ids that avoids the special ids 0..3."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=gen)


@torch.no_grad()
def reference(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The model's own logits, every block's input and every block's output (plain forward hooks).

    HF's ``output_hidden_states`` is not enough: its last entry is the *normalised* last state, so
    the last block's raw output is read with a hook on the block.
    """
    layers = attr_path(model, MODULE_PATHS[family_of(model)][0])
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(_keep_io(ins, outs), with_kwargs=True) for layer in layers]
    try:
        out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    hidden = [h.float() for h in out.hidden_states]
    if any(float((a - b).abs().max()) > 0 for a, b in zip(ins, hidden[: len(ins)])):
        raise RuntimeError("block inputs seen by the hooks differ from output_hidden_states")
    return out.logits.float(), ins, outs


def _keep_io(ins: list[torch.Tensor], outs: list[torch.Tensor]) -> Callable[..., None]:
    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ins.append(hidden_of(args[0] if args else kwargs["hidden_states"]).float())
        outs.append(hidden_of(output).float())

    return hook


def capture_check(
    blocks_out: list[torch.Tensor],
    blocks_in: list[torch.Tensor] | None,
    ref_in: list[torch.Tensor],
    ref_out: list[torch.Tensor],
) -> dict[str, Any]:
    """Check captured block outputs (and inputs) against the reference hooks' (exact up to 1e-5).

    A captured tensor of the wrong shape counts as wrong (its error is recorded as ``None``).
    """
    layers = len(ref_out)
    result: dict[str, Any] = {"blocks": len(blocks_out), "expected": layers}
    if len(blocks_out) != layers or (blocks_in is not None and len(blocks_in) != layers):
        result["ok"] = False
        return result
    errs = [_max_err(blocks_out[i], ref_out[i]) for i in range(layers)]
    wrong = [i for i, e in enumerate(errs) if e is None or e >= 1e-5]
    known = [e for e in errs if e is not None]
    result["max_err_out"] = max(known) if known else None
    ok = not wrong
    if wrong:
        result["wrong_blocks"] = wrong
    if blocks_in is not None:
        errs_in = [_max_err(blocks_in[i], ref_in[i]) for i in range(layers)]
        known_in = [e for e in errs_in if e is not None]
        result["max_err_in"] = max(known_in) if known_in else None
        ok = ok and all(e is not None and e < 1e-5 for e in errs_in)
    result["ok"] = ok
    return result


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if tuple(a.shape) != tuple(b.shape):
        return None
    return float((a.detach().float() - b).abs().max())


def lens_error(lens_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Max abs difference between the lens on the last block's output and the model's logits.

    ``relative`` divides by the largest logit, so families with small random logits compare fairly.
    """
    err = float((lens_logits.detach().float() - logits).abs().max())
    return {"max_abs": err, "relative": err / max(float(logits.abs().max()), 1e-12)}


def paired_ratio(plain: Callable[[], Any], traced: Callable[[], Any], repeats: int, warmup: int = 2) -> dict[str, Any]:
    """Median of ``traced / plain`` time over alternated repeats (same process), with its spread."""
    for _ in range(warmup):
        plain()
        traced()
    ratios, plain_s, traced_s = [], [], []
    for i in range(repeats):
        order = (plain, traced) if i % 2 == 0 else (traced, plain)
        times = {}
        for fn in order:
            start = time.perf_counter()
            fn()
            times[fn] = time.perf_counter() - start
        plain_s.append(times[plain])
        traced_s.append(times[traced])
        ratios.append(times[traced] / times[plain])
    ratios.sort()
    q = len(ratios) // 4
    return {
        "ratio": round(statistics.median(ratios), 3),
        "ratio_iqr": [round(ratios[q], 3), round(ratios[-1 - q], 3)],
        "plain_ms": round(1e3 * statistics.median(plain_s), 2),
        "traced_ms": round(1e3 * statistics.median(traced_s), 2),
        "repeats": repeats,
    }


def snippet_lines(snippet: str) -> int:
    r"""Non-blank, non-comment lines of a user-code snippet.

    Example:
        >>> snippet_lines("import x\n\n# a comment\ny = x.f()\n")
        2
    """
    return sum(1 for line in snippet.splitlines() if line.strip() and not line.strip().startswith("#"))


def attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, error text)`` when it raises (the sweep records and goes on)."""
    try:
        return fn(), None
    except Exception as exc:
        return None, short_error(exc)


def short_error(exc: BaseException) -> str:
    r"""One line naming an exception (type and the first line of its message).

    Example:
        >>> short_error(ValueError("bad shape\nmore detail"))
        'ValueError: bad shape'
    """
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if text and text[0].startswith("Traceback"):
        text = text[-1:]  # a wrapped traceback (nnsight): its last line names the real error
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def run_worker(peer: str, version: Callable[[], str], family_fn: Callable, timing_fn: Callable, snippet: str) -> None:
    """Read the JSON spec from argv[1], run ``family_fn`` per family and ``timing_fn`` once, print JSON."""
    import transformers

    spec = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "peer": peer,
        "versions": {"peer": version(), "transformers": transformers.__version__, "torch": torch.__version__},
        "python": sys.version.split()[0],
        "user_code_lines": snippet_lines(snippet),
        "snippet": snippet,
        "families": {},
    }
    sizes = {**SIZES, **spec.get("sizes", {})}
    for family in spec.get("families", FAMILIES):
        try:
            model = build(family, sizes=sizes)
        except Exception as exc:
            result["families"][family] = {"built": False, "error": short_error(exc)}
            continue
        try:
            entry = family_fn(model, sizes)
        except Exception as exc:
            entry = {"error": short_error(exc), "trace": traceback.format_exc(limit=3)[-600:]}
        result["families"][family] = {"built": True, **entry}
    if spec.get("timing", True):
        try:
            result["timing"] = timing_fn(spec)
        except Exception as exc:
            result["timing"] = {"error": short_error(exc), "trace": traceback.format_exc(limit=3)[-600:]}
    print(json.dumps(result))


#: Model and inputs of the overhead measurement (one family, a little larger so a forward is not all Python).
TIMING_SIZES = {"layers": 8, "hidden": 256, "heads": 4, "vocab": 2048}
TIMING = {"length": 64, "new_tokens": 16, "forward_repeats": 15, "generate_repeats": 7}


def timing_setup(spec: dict[str, Any]) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """The timing model, its ``[1, length]`` prompt and the timing settings (spec overrides the defaults)."""
    settings = {**TIMING, **spec.get("timing_settings", {})}
    sizes = {**TIMING_SIZES, **spec.get("timing_sizes", {})}
    model = build(spec.get("timing_family", TIMING_FAMILY), sizes=sizes)
    ids = input_ids(sizes["vocab"], batch=1, length=settings["length"], seed=2)
    settings["family"] = spec.get("timing_family", TIMING_FAMILY)
    settings["sizes"] = sizes
    return model, ids, settings


def generate_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding of a fixed number of tokens (no early stop at EOS)."""
    n = settings["new_tokens"]
    return {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}


def time_both(
    plain_forward: Callable[[], Any],
    traced_forward: Callable[[], Any],
    plain_generate: Callable[[], Any],
    traced_generate: Callable[[], Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Forward and ``generate`` overhead ratios measured in this process, plus the settings used."""
    with torch.no_grad():
        forward = paired_ratio(plain_forward, traced_forward, settings["forward_repeats"])
        generate = paired_ratio(plain_generate, traced_generate, settings["generate_repeats"], warmup=1)
    return {"forward": forward, "generate": generate, "settings": settings}


def hidden_of(x: Any) -> torch.Tensor:
    """The hidden-state tensor of a block's output or input (first element of a tuple or list)."""
    while isinstance(x, (tuple, list)):
        x = x[0]
    return x


#: Where the blocks, the final norm and the head live per family: what a user of a peer
#: without standard names has to look up (``None``: the family has no such module).
MODULE_PATHS: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers", "model.norm", "lm_head"),
    "gpt2": ("transformer.h", "transformer.ln_f", "lm_head"),
    "gemma2": ("model.layers", "model.norm", "lm_head"),
    "granite": ("model.layers", "model.norm", "lm_head"),
    "cohere": ("model.layers", "model.norm", "lm_head"),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm", "lm_head"),
    "qwen2": ("model.layers", "model.norm", "lm_head"),
    "mistral": ("model.layers", "model.norm", "lm_head"),
    "phi3": ("model.layers", "model.norm", "lm_head"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head"),
}


def family_of(model: Any) -> str:
    """The family (``config.model_type``) of a model built by :func:`build`."""
    return str(model.config.model_type)


def attr_path(obj: Any, path: str) -> Any:
    """``obj.a.b.c`` for ``path="a.b.c"``."""
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def dist_version(name: str) -> str:
    """Installed version of the distribution ``name`` (``"not installed"`` if absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def saved_tiny_tokenizer(vocab: int, directory: str):
    """:func:`tiny_tokenizer` saved to ``directory`` and loaded back (so it has a local ``name_or_path``)."""
    from transformers import AutoTokenizer

    tiny_tokenizer(vocab).save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
