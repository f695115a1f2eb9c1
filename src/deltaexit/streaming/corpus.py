"""Deterministic corpus slicing: documents -> token windows -> batches -> ranks.

Every window has a global index that depends only on the data, the tokenizer, the
context length and the token budget, never on the number of processes or on
where a run was resumed. Batches are ``batch_size`` consecutive windows; with
``world_size`` processes, batch ``b`` belongs to rank ``b % world_size``. A
batch is therefore computed from exactly the same inputs in a single-process
run, in any rank of a data-parallel run and after a resume, so the features are
identical bit for bit.

Each window is an independent forward (no context carried over from the
previous window of the same document).

Example:
    >>> docs = [[5, 6, 7, 8, 9], [10, 11]]
    >>> [(w.index, w.doc, w.start, w.ids) for w in token_windows(docs, context=3)]
    [(0, 0, 0, (5, 6, 7)), (1, 0, 3, (8, 9)), (2, 1, 0, (10, 11))]
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltaexit.io import file_sha256

__all__ = [
    "Window",
    "batch_windows",
    "data_fingerprint",
    "iter_documents",
    "read_documents",
    "token_windows",
]


@dataclass(frozen=True)
class Window:
    """A slice of one document fed to the model as one row.

    Attributes:
        index: Global window number (0-based, in corpus order).
        doc: Document number (0-based, in corpus order; empty documents are skipped, not numbered).
        start: Offset of the window's first token in its document.
        ids: The token ids.
    """

    index: int
    doc: int
    start: int
    ids: tuple[int, ...]


def read_documents(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield the non-empty lines of a UTF-8 text file (one document per line), lazily."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist (expected a text file, one document a line)")
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = line.strip()
            if text:
                yield text


def _encode(tokenizer: Any, text: str) -> list[int]:
    if tokenizer is None:
        raise ValueError("the data holds text: pass tokenizer=... (or pre-tokenized token id sequences)")
    if hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
        ids = getattr(ids, "ids", ids)  # a `tokenizers.Tokenizer` returns an Encoding
    else:
        ids = tokenizer(text)["input_ids"]
    return [int(i) for i in ids]


def iter_documents(data: Any, tokenizer: Any = None) -> Iterator[list[int]]:
    """Token ids of each document of ``data``, lazily.

    Args:
        data: A path to a text file (one document a line; needs ``tokenizer``), a 1-D
            (one document) or 2-D (one document a row) tensor of token ids, or an iterable
            whose items are strings (need ``tokenizer``) or sequences/tensors of token ids.
        tokenizer: A ``transformers`` tokenizer or a ``tokenizers.Tokenizer``.
    """
    if isinstance(data, (str, os.PathLike)):
        for text in read_documents(data):
            yield _encode(tokenizer, text)
        return
    if isinstance(data, torch.Tensor):
        if data.dim() not in (1, 2) or data.is_floating_point():
            raise ValueError(
                f"token ids must be an integer tensor of 1 or 2 dims, got {data.dtype} {tuple(data.shape)}"
            )
        rows = [data] if data.dim() == 1 else list(data)
        for row in rows:
            yield [int(i) for i in row.tolist()]
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"cannot read documents from {type(data).__name__}; pass a path, a tensor or an iterable")
    for item in data:
        if isinstance(item, str):
            yield _encode(tokenizer, item)
        elif isinstance(item, torch.Tensor):
            yield [int(i) for i in item.reshape(-1).tolist()]
        else:
            yield [int(i) for i in item]


def token_windows(documents: Iterable[Sequence[int]], context: int, max_tokens: int | None = None) -> Iterator[Window]:
    """Cut documents into consecutive, non-overlapping windows of at most ``context`` tokens.

    Empty documents are skipped. With ``max_tokens`` the stream stops after exactly that
    many tokens (the last window is cut short).
    """
    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    index = doc = produced = 0
    for ids in documents:
        if len(ids) == 0:
            continue
        for start in range(0, len(ids), context):
            piece = tuple(int(i) for i in ids[start : start + context])
            if max_tokens is not None:
                piece = piece[: max_tokens - produced]
            yield Window(index, doc, start, piece)
            index += 1
            produced += len(piece)
            if max_tokens is not None and produced >= max_tokens:
                return
        doc += 1


def batch_windows(windows: Iterable[Window], batch_size: int) -> Iterator[list[Window]]:
    """Group consecutive windows into batches of ``batch_size`` (the last one may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Window] = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def data_fingerprint(data: Any) -> str | None:
    """sha256 of the data's bytes (file or tensor/list of ids), or None for a one-shot iterator."""
    digest = hashlib.sha256()
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        return "file:" + file_sha256(path)
    if isinstance(data, torch.Tensor):
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
        return "tensor:" + digest.hexdigest()
    if isinstance(data, (list, tuple)):
        for item in data:
            if isinstance(item, torch.Tensor):
                item = item.tolist()
            digest.update(repr(item).encode())
            digest.update(b"\x00")
        return "list:" + digest.hexdigest()
    return None
