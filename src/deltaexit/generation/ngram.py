"""N-gram drafts for ``verify``: continuations of the latest earlier occurrence of the last tokens (no compute).

As prompt-lookup decoding does, the last ``n`` tokens of a row (prompt and output so far) are looked up among its
earlier tokens, longest ``n`` first; the tokens that followed the match are the drafts. Where they run into the
row's end, the drafts continue the repeat: the match recurs every ``p`` tokens (``p`` = the distance between the two
occurrences), so draft ``i`` is the token ``p`` before it (a loop drafts as far as asked, where prompt-lookup
decoding takes the earliest occurrence instead, so as to have tokens after it). :class:`NgramIndex` keeps
a per-row dictionary from every n-gram to the end of its latest occurrence, updated with the new tokens after
each round, so a lookup is a few dictionary reads instead of a scan of the whole sequence.

Example:
    >>> import torch
    >>> index = NgramIndex(max_n=2)
    >>> index.update(torch.tensor([[1, 2, 3, 4, 1, 2]]))
    [True]
    >>> index.lookup(0, 3)  # "1 2" occurred before, followed by 3 4 1
    [3, 4, 1]
    >>> index.lookup(0, 6)  # past the row's end: the repeat of period 4 goes on
    [3, 4, 1, 2, 3, 4]
    >>> index.update(torch.tensor([[1, 2, 3, 4, 1, 2, 9]]))
    [True]
    >>> index.lookup(0, 3)  # "2 9" and "9" never occurred before
    []
"""

from __future__ import annotations

import torch

__all__ = ["NgramIndex"]


class NgramIndex:
    """Per-row index of n-grams (sizes ``min_n..max_n``) to the end position of their latest occurrence.

    Args:
        max_n: Longest n-gram matched.
        min_n: Shortest n-gram matched.
    """

    def __init__(self, max_n: int, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n = max_n
        self.min_n = min_n
        self.rows: list[list[int]] = []
        self.ends: list[dict[tuple[int, ...], int]] = []
        self.indexed = 0  # n-grams ending at positions < indexed are in ``ends`` (the last token's are not)

    @property
    def length(self) -> int:
        """Tokens seen per row."""
        return len(self.rows[0]) if self.rows else 0

    def update(self, ids: torch.Tensor, active: torch.Tensor | None = None) -> list[bool]:
        """Add the tokens of ``ids`` ``[B, T]`` not seen yet and index the n-grams they complete; return ``active``
        (``[B]``, nonzero = row unfinished; default all) on the host, read in the same transfer as the tokens."""
        fresh = ids[:, self.length :]
        flags = active if active is not None else torch.ones_like(ids[:, 0])
        read = torch.cat([fresh, flags[:, None].to(fresh.dtype)], dim=1).tolist()
        new = [r[:-1] for r in read]
        if not self.rows:
            self.rows = [[] for _ in new]
            self.ends = [{} for _ in new]
        for row, tokens, ends in zip(self.rows, new, self.ends):
            row.extend(tokens)
            # index the n-grams ending before the last token: the last token's would only match themselves
            for end in range(self.indexed, len(row) - 1):
                for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                    ends[tuple(row[end - n + 1 : end + 1])] = end
        self.indexed = max(self.length - 1, 0)
        return [bool(r[-1]) for r in read]

    def lookup(self, row: int, k: int) -> list[int]:
        """``k`` tokens that followed the latest earlier occurrence of row ``row``'s longest matching suffix,
        continued past the row's end as a repeat (empty if no suffix of ``min_n`` or more tokens occurred before)."""
        tokens, ends = self.rows[row], self.ends[row]
        size = len(tokens)
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            end = ends.get(tuple(tokens[size - n :]))
            if end is not None:
                drafts = tokens[end + 1 : end + 1 + k]
                while len(drafts) < k:  # past the end of the row: the match repeats, so copy the drafts themselves
                    drafts.append(drafts[len(drafts) - (size - 1 - end)])
                return drafts
        return []

    def drafts(self, active: list[bool], k: int) -> list[list[int]] | None:
        """``k`` drafts for every active row (finished rows get an empty list: the caller pads); None if an
        active row has no match."""
        found = [self.lookup(i, k) if on else [] for i, on in enumerate(active)]
        if not any(active) or any(on and not f for f, on in zip(found, active)):
            return None
        return found
