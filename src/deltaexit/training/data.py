"""Read a text file (one paragraph a line), tokenize it into one token stream, sample training windows.

Example:
    >>> from importlib.resources import files
    >>> text = files("deltaexit") / "assets/sample/wikitext-2-test-tail.txt"
    >>> from deltaexit.training.tokenizer import fit_tokenizer
    >>> paragraphs = read_paragraphs(text)
    >>> tokenizer = fit_tokenizer(paragraphs, vocab_size=300)
    >>> stream = encode_stream(tokenizer, paragraphs)
    >>> batches = WindowSampler(stream, context=64, batch_size=4, seed=0)
    >>> tuple(batches.next().shape)
    (4, 64)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["WindowSampler", "encode_stream", "read_paragraphs"]


def read_paragraphs(path: str | os.PathLike[str]) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped (WikiText keeps one paragraph a line).

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        ValueError: the file holds no non-blank line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {str(path)!r} does not exist (give a UTF-8 text file, one paragraph a line)"
        )
    with path.open(encoding="utf-8") as handle:
        paragraphs = [line.strip() for line in handle]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise ValueError(f"data file {str(path)!r} is empty: it needs at least one non-blank line of text")
    return paragraphs


def encode_stream(tokenizer, paragraphs: Sequence[str], max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize paragraphs into one 1-D ``int64`` stream, each paragraph followed by ``eos``.

    Args:
        tokenizer: A ``transformers`` tokenizer with ``eos_token_id`` set.
        paragraphs: Text pieces in order.
        max_tokens: Truncate the stream to this many tokens (``None``: all).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: set tokenizer.eos_token before encoding")
    eos = int(tokenizer.eos_token_id)
    ids: list[int] = []
    encoded = tokenizer(list(paragraphs), add_special_tokens=False)["input_ids"]
    for piece in encoded:
        ids.extend(piece)
        ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


class WindowSampler:
    """Draws batches of random contiguous windows from a token stream with its own seeded generator.

    Args:
        stream: 1-D token ids.
        context: Window length (tokens per row).
        batch_size: Rows per batch.
        seed: Seed of the sampler's private ``torch.Generator`` (the global RNG is not touched).
    """

    def __init__(self, stream: torch.Tensor, context: int, batch_size: int, seed: int = 0) -> None:
        if stream.ndim != 1:
            raise ValueError(f"stream must be 1-D token ids, got shape {tuple(stream.shape)}")
        if context < 2 or batch_size < 1:
            raise ValueError(f"need context >= 2 and batch_size >= 1, got context={context}, batch_size={batch_size}")
        if stream.numel() < context + 1:
            raise ValueError(
                f"the data has {stream.numel()} tokens, fewer than one window of context={context}: "
                "give more text or a smaller --context"
            )
        self.stream = stream
        self.context = context
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(context)

    def next(self) -> torch.Tensor:
        """One ``[batch_size, context]`` batch of input ids (labels are the same ids; the model shifts)."""
        high = self.stream.numel() - self.context + 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        return self.stream[starts[:, None] + self._offsets]
