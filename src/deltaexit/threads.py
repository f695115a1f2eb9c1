"""The one place the library changes torch's intra-op thread count: a context manager callers opt into.

Library functions never change process-wide settings on their own; the CLI's ``--threads``, the benchmarks
and user code wrap their work in :func:`torch_threads` instead.

Example:
    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` and restore the previous count after.

    Args:
        threads: Intra-op threads (>= 1), or None to leave the count as it is.

    Raises:
        ValueError: ``threads`` is below 1.
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1 (or None to keep the current count), got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
