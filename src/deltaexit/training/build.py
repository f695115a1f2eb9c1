"""The ``deltaexit train`` pipeline: tokenizer, model, training, evaluation, an HF directory on disk.

Training does not change torch's thread count; for bit-identical seeded runs wrap it in
``deltaexit.threads.torch_threads(train.threads)`` (``deltaexit train`` does).

Example:
    >>> import tempfile
    >>> from importlib.resources import files
    >>> from transformers import AutoModelForCausalLM
    >>> text = files("deltaexit") / "assets/sample/wikitext-2-test-tail.txt"
    >>> out = tempfile.mkdtemp()
    >>> report = train_reference(text, out, train=TrainConfig(steps=2, batch_size=2, warmup=1), vocab=300,
    ...                          hidden=16, heads=2, ffn=32, layers=2, context=32, eval_data=text,
    ...                          eval_tokens=256, progress=False)
    >>> len(report["eval"]["layer_perplexity"])
    2
    >>> AutoModelForCausalLM.from_pretrained(out).config.hidden_size
    16
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltaexit.aliases import CONTEXT_LENGTH_ATTRS
from deltaexit.io import atomic_write_json, file_sha256, normalize_permissions
from deltaexit.structure import config_int, text_config
from deltaexit.training.data import WindowSampler, encode_stream, read_paragraphs
from deltaexit.training.model_config import reference_config
from deltaexit.training.perplexity import layer_perplexities
from deltaexit.training.recipes import PlainRecipe
from deltaexit.training.tokenizer import fit_tokenizer
from deltaexit.training.trainer import TrainConfig, deterministic, train_loop

__all__ = ["SAVE_DTYPES", "TRAINING_FORMAT_VERSION", "round_weights", "save_model_dir", "train_reference"]

#: Version of the ``training.json`` record written beside the weights.
TRAINING_FORMAT_VERSION = 1

#: Storage dtypes ``train_reference(save_dtype=...)`` writes (loading upcasts to float32).
SAVE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def round_weights(model: nn.Module, save_dtype: str) -> nn.Module:
    """Round ``model``'s floating-point weights in place to ``save_dtype`` and back to their own dtype.

    The model then computes exactly what its saved ``save_dtype`` copy computes once loaded in float32, so a
    perplexity measured after rounding is the shipped model's.

    Raises:
        ValueError: ``save_dtype`` is not one of :data:`SAVE_DTYPES`.

    Example:
        >>> layer = torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(1.0 + 2**-12)
        >>> round_weights(layer, "bfloat16").weight.item()
        1.0
    """
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {sorted(SAVE_DTYPES)}, got {save_dtype!r}")
    target = SAVE_DTYPES[save_dtype]
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.to(target).to(p.dtype))
    return model


def save_model_dir(model, tokenizer, out: str | os.PathLike[str], record: dict[str, Any] | None = None) -> Path:
    """Save ``model`` + ``tokenizer`` (+ ``training.json``) as an HF directory, replacing ``out`` atomically.

    Everything is written to a temporary directory beside ``out`` and renamed into place, so an
    interrupted save never leaves a half-written model at ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if record is not None:
            atomic_write_json(tmp / "training.json", record)
        normalize_permissions(tmp)  # mkdtemp and save_pretrained leave 0700 / 0600; use the umask's modes
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _load_init(init: str | os.PathLike[str], context: int) -> tuple[Any, nn.Module, int]:
    """``(tokenizer, model, context)`` of an HF directory to continue from (context capped by its positions)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(init)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--init {str(path)!r} is not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    limit = config_int(text_config(model), CONTEXT_LENGTH_ATTRS)
    return tokenizer, model, min(context, limit) if limit else context


def _new_model(config: Any) -> nn.Module:
    """A freshly initialised causal LM of ``config`` (Llama or GPT-NeoX)."""
    from transformers import GPTNeoXForCausalLM, LlamaForCausalLM

    return GPTNeoXForCausalLM(config) if config.model_type == "gpt_neox" else LlamaForCausalLM(config)


def train_reference(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    vocab: int = 4096,
    hidden: int = 64,
    heads: int = 4,
    ffn: int = 256,
    layers: int = 8,
    context: int = 256,
    train: TrainConfig | None = None,
    recipe=None,
    init: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    eval_tokens: int | None = 65536,
    progress: bool = True,
    save_dtype: str = "float32",
    arch: str = "llama",
) -> dict[str, Any]:
    """Fit a tokenizer and a Llama (or GPT-NeoX) model on ``data`` (or continue ``init``), evaluate, save to ``out``.

    Args:
        data: Training text, one paragraph a line.
        out: Output directory (``None``: do not save; the report then holds the model under ``"model"``).
        vocab, hidden, heads, ffn, layers, context: Tokenizer/model shape (ignored with ``init``,
            except ``context``, capped by the model's positions).
        train: Optimiser settings (:class:`TrainConfig`).
        recipe: :class:`~deltaexit.training.recipes.PlainRecipe` (default) or ``LayerSkipRecipe``.
        init: Existing HF model directory to continue from (any causal LM; its tokenizer is kept).
        eval_data: Text for the perplexity report (e.g. ``test.txt``); ``None`` skips it.
        eval_tokens: Tokens of ``eval_data`` scored.
        progress: tqdm bars.
        save_dtype: Storage dtype of the saved weights (``"bfloat16"`` halves the file); the weights are rounded
            to it before the evaluation, so the reported perplexity is the saved model's.
        arch: ``"llama"`` or ``"gpt_neox"`` (ignored with ``init``).

    Returns:
        The report written to ``out/training.json``.
    """
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {sorted(SAVE_DTYPES)}, got {save_dtype!r}")

    train = train or TrainConfig()
    recipe = recipe or PlainRecipe()
    paragraphs = read_paragraphs(data)
    eval_paragraphs = read_paragraphs(eval_data) if eval_data is not None else None
    if init is not None:
        init = Path(init)
        tokenizer, initial, context = _load_init(init, context)
    else:
        tokenizer = fit_tokenizer(paragraphs, vocab_size=vocab)
        config = reference_config(
            vocab_size=len(tokenizer),
            hidden=hidden,
            heads=heads,
            ffn=ffn,
            layers=layers,
            context=context,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            arch=arch,
        )
    stream = encode_stream(tokenizer, paragraphs)
    sampler = WindowSampler(stream, context=context, batch_size=train.batch_size, seed=train.seed)
    with deterministic(train.seed):
        model: nn.Module = initial if init is not None else _new_model(config)
        history = train_loop(model, sampler, train, recipe, progress=progress)
        report: dict[str, Any] = {
            "format_version": TRAINING_FORMAT_VERSION,
            "data": {"path": str(data), "sha256": file_sha256(data), "tokens": int(stream.numel())},
            "init": str(init) if init is not None else None,
            "recipe": recipe.to_dict(),
            "train": train.to_dict(),
            "context": context,
            "parameters": sum(p.numel() for p in model.parameters()),
            "history": history,
            "save_dtype": save_dtype,
        }
        round_weights(model, save_dtype)
        if eval_paragraphs is not None and eval_data is not None:
            per_layer = layer_perplexities(
                model, tokenizer, eval_paragraphs, max_tokens=eval_tokens, context=context, progress=progress
            )
            report["eval"] = {
                "path": str(eval_data),
                "sha256": file_sha256(eval_data),
                "max_tokens": eval_tokens,
                "perplexity": per_layer[-1],
                "layer_perplexity": per_layer,
            }
    model.eval()
    if out is not None:
        save_model_dir(model.to(SAVE_DTYPES[save_dtype]), tokenizer, out, report)
        model.float()
    else:
        report["model"], report["tokenizer"] = model, tokenizer
    return report
