"""Perplexity of a causal LM on a text, at the final layer and at every layer through the exact lens.

The text is tokenized into one stream (paragraphs joined by ``eos``), cut to ``max_tokens`` tokens and
scored in non-overlapping windows of the model's context length; each window predicts its tokens 2..n
(no context carried across windows), so the figure is comparable between models with the same tokenizer
and context.

Example:
    >>> from importlib.resources import files
    >>> from deltaexit.reference import load_reference
    >>> model, tokenizer = load_reference("v1")
    >>> text = (files("deltaexit") / "assets/sample/wikitext-2-test-tail.txt").read_text()
    >>> final = perplexity(model, tokenizer, text, max_tokens=2048)
    >>> per_layer = layer_perplexities(model, tokenizer, text, max_tokens=2048)
    >>> len(per_layer), abs(per_layer[-1] - final) < 1e-6 * final   # the last block's is the model's own
    (8, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from deltaexit.aliases import CONTEXT_LENGTH_ATTRS
from deltaexit.structure import config_int, input_device, text_config
from deltaexit.training.data import encode_stream

__all__ = ["layer_perplexities", "perplexity", "stream_nll"]


def _as_paragraphs(text: str | Sequence[str]) -> list[str]:
    pieces = text.splitlines() if isinstance(text, str) else list(text)
    pieces = [p.strip() for p in pieces if p and p.strip()]
    if not pieces:
        raise ValueError("cannot compute perplexity on empty text")
    return pieces


def _context_of(model: nn.Module, context: int | None) -> int:
    if context is not None:
        return int(context)
    return config_int(text_config(model), CONTEXT_LENGTH_ATTRS) or 256


@torch.no_grad()
def stream_nll(
    model: nn.Module,
    stream: torch.Tensor,
    context: int | None = None,
    all_layers: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood of a 1-D token stream.

    Args:
        model: A ``transformers`` causal LM.
        stream: 1-D token ids.
        context: Window length (default: the model's ``max_position_embeddings``).
        all_layers: Also score every block's output through the exact lens (:class:`deltaexit.Lens`).
        batch_size: Windows per forward pass.
        progress: Show a tqdm bar.

    Returns:
        ``(nll, n)``: ``nll`` is a float64 tensor ``[layers]`` (all_layers) or ``[1]`` (final layer),
        summed over the ``n`` predicted tokens.
    """
    from deltaexit.collector import collect
    from deltaexit.lens import Lens

    context = _context_of(model, context)
    if stream.ndim != 1 or stream.numel() < 2:
        raise ValueError("perplexity needs a 1-D stream of at least 2 tokens")
    windows = [stream[i : i + context] for i in range(0, stream.numel(), context)]
    windows = [w for w in windows if w.numel() >= 2]
    was_training = model.training
    model.eval()
    device = input_device(model)
    lens = Lens.from_model(model) if all_layers else None
    total: torch.Tensor | None = None
    count = 0
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
            group = windows[start : start + batch_size]
            width = max(w.numel() for w in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, w in enumerate(group):
                ids[row, : w.numel()] = w
                mask[row, : w.numel()] = 1
            ids, mask = ids.to(device), mask.to(device)
            target = ids[:, 1:]
            keep = mask[:, 1:].bool()
            if lens is None:
                logits = model(input_ids=ids, attention_mask=mask).logits
                per_layer = [logits]
            else:
                with collect(model, ("h_out",), positions="all") as trace:
                    model(input_ids=ids, attention_mask=mask)
                per_layer = [lens(trace.h_out[layer].to(device)) for layer in range(trace.h_out.shape[0])]
            sums = []
            for logits in per_layer:
                logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
                nll = -logp.gather(-1, target[..., None]).squeeze(-1)
                sums.append(nll[keep].sum())
            batch_sum = torch.stack(sums).cpu()
            total = batch_sum if total is None else total + batch_sum
            count += int(keep.sum())
    finally:
        model.train(was_training)
    assert total is not None
    return total, count


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str | Sequence[str],
    max_tokens: int | None = 65536,
    context: int | None = None,
    progress: bool = False,
) -> float:
    """Final-layer perplexity of ``model`` on the first ``max_tokens`` tokens of ``text``.

    Args:
        model: A ``transformers`` causal LM.
        tokenizer: Its tokenizer (``eos_token`` set).
        text: A string (one paragraph a line) or a sequence of paragraphs.
        max_tokens: Tokens of the stream to score (``None``: all).
        context: Window length (default: the model's context).
        progress: Show a tqdm bar.

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> from deltaexit.training.tokenizer import fit_tokenizer
        >>> tokenizer = fit_tokenizer(["the cat sat on the mat", "a dog ran"], vocab_size=300)
        >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=len(tokenizer))
        >>> perplexity(model, tokenizer, "The cat sat on the mat .", max_tokens=None) > 1
        True
    """
    stream = encode_stream(tokenizer, _as_paragraphs(text), max_tokens=max_tokens)
    nll, n = stream_nll(model, stream, context=context, progress=progress)
    return math.exp(float(nll[0]) / n)


def layer_perplexities(
    model: nn.Module,
    tokenizer,
    text: str | Sequence[str],
    max_tokens: int | None = 65536,
    context: int | None = None,
    progress: bool = False,
) -> list[float]:
    """Perplexity at every block's output through the exact lens; the last entry is the model's own.

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> from deltaexit.training.tokenizer import fit_tokenizer
        >>> tokenizer = fit_tokenizer(["the cat sat on the mat", "a dog ran"], vocab_size=300)
        >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=len(tokenizer))
        >>> len(layer_perplexities(model, tokenizer, "The cat sat on the mat .", max_tokens=None))
        2
    """
    stream = encode_stream(tokenizer, _as_paragraphs(text), max_tokens=max_tokens)
    nll, n = stream_nll(model, stream, context=context, all_layers=True, progress=progress)
    return [math.exp(float(v) / n) for v in nll]
