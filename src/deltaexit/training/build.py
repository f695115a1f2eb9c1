"""The ``deltaexit train`` pipeline: tokenizer, model, training, evaluation, an HF directory on disk.

Example:
    >>> report = train_reference("valid.txt", "out/ref", train=TrainConfig(steps=1200),
    ...                          eval_data="test.txt")                                # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained("out/ref")                       # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from deltaexit.io import atomic_write_json, file_sha256
from deltaexit.training.data import WindowSampler, encode_stream, read_paragraphs
from deltaexit.training.model_config import reference_config
from deltaexit.training.perplexity import layer_perplexities
from deltaexit.training.recipes import PlainRecipe
from deltaexit.training.tokenizer import fit_tokenizer
from deltaexit.training.trainer import TrainConfig, deterministic, train_loop

__all__ = ["TRAINING_FORMAT_VERSION", "save_model_dir", "train_reference"]

#: Version of the ``training.json`` record written beside the weights.
TRAINING_FORMAT_VERSION = 1


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
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if record is not None:
            atomic_write_json(tmp / "training.json", record)
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
) -> dict[str, Any]:
    """Fit a tokenizer and a Llama model on ``data`` (or continue ``init``), evaluate, save to ``out``.

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

    Returns:
        The report written to ``out/training.json``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    train = train or TrainConfig()
    recipe = recipe or PlainRecipe()
    paragraphs = read_paragraphs(data)
    eval_paragraphs = read_paragraphs(eval_data) if eval_data is not None else None
    if init is not None:
        init = Path(init)
        if not (init / "config.json").is_file():
            raise FileNotFoundError(f"--init {str(init)!r} is not a model directory (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(init)
        model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit:
            context = min(context, int(limit))
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
        )
    stream = encode_stream(tokenizer, paragraphs)
    sampler = WindowSampler(stream, context=context, batch_size=train.batch_size, seed=train.seed)
    with deterministic(train.seed, train.threads):
        if init is None:
            model = LlamaForCausalLM(config)
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
        }
        if eval_paragraphs is not None:
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
        save_model_dir(model, tokenizer, out, report)
    else:
        report["model"], report["tokenizer"] = model, tokenizer
    return report
