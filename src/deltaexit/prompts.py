"""Prompt batches and the full model's greedy continuations, shared by calibration and its simulator.

* :func:`as_prompts`: a list of 1-D token-id tensors (strings with a tokenizer).
* :func:`pad_left`: left-padded ``(input_ids, attention_mask)`` of a list of prompts.
* :func:`pad_token_id`, :func:`eos_token_id`: the ids generation pads and stops with.
* :func:`prompt_batches`: left-padded batches on the model's input device.
* :func:`new_tokens`: a batch's generated tokens, right-padded to a fixed width.
* :func:`full_continuations`, :func:`greedy_continuations`: ``model.generate`` greedy output.
* :func:`continuation_mask`: positions up to and including the first EOS.

Example:
    >>> import torch
    >>> ids, mask = pad_left([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from deltaexit.structure import find_structure

__all__ = [
    "as_prompts",
    "continuation_mask",
    "eos_token_id",
    "full_continuations",
    "greedy_continuations",
    "new_tokens",
    "pad_left",
    "pad_token_id",
    "prompt_batches",
]


def as_prompts(prompts: Any, tokenizer: Any = None) -> list[torch.Tensor]:
    """One 1-D LongTensor per prompt, from token-id tensors/lists or (with ``tokenizer``) strings.

    Example:
        >>> [p.tolist() for p in as_prompts([[1, 2], torch.tensor([[3]])])]
        [[1, 2], [3]]
    """
    if prompts is None:
        raise ValueError("pass prompts (a list of token-id tensors, or strings with tokenizer=)")
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError("a tensor of prompts must be [examples, tokens] (unpadded); pass a list otherwise")
        prompts = list(prompts)
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("prompts are strings: pass tokenizer= to turn them into token ids")
            p = tokenizer(p, return_tensors="pt")["input_ids"][0]
        p = torch.as_tensor(p, dtype=torch.long).reshape(-1)
        if p.numel() == 0:
            raise ValueError("a prompt is empty; every prompt needs at least one token")
        out.append(p)
    if not out:
        raise ValueError("no prompts given; pass at least one")
    return out


def pad_left(prompts: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, width]`` left-padded ids and attention mask (1 = real token) of 1-D prompts."""
    width = max(int(p.numel()) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p.numel():
            ids[i, width - p.numel() :] = p.reshape(-1)
            mask[i, width - p.numel() :] = 1
    return ids, mask


def pad_token_id(model: nn.Module) -> int:
    """The id prompts and finished rows are padded with (see ``ModelStructure.pad_token_id``).

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> pad_token_id(tiny_model("llama"))
        0
    """
    return find_structure(model, validate=False).pad_token_id


def eos_token_id(model: nn.Module) -> int | list[int] | None:
    """The generation config's EOS id(s), or None."""
    return getattr(getattr(model, "generation_config", None), "eos_token_id", None)


def prompt_batches(
    model: nn.Module, prompts: Sequence[torch.Tensor], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Left-padded ``(input_ids, attention_mask)`` batches on the model's input device."""
    device = find_structure(model, validate=False).input_device
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_left(prompts[start : start + batch_size], pad_id)
        yield ids.to(device), mask.to(device)


def new_tokens(sequences: torch.Tensor, prompt_width: int, max_new_tokens: int, pad_id: int) -> torch.Tensor:
    """``[b, max_new_tokens]`` tokens after the prompt, on CPU, right-padded with ``pad_id`` when every
    row stopped early."""
    new = sequences[:, prompt_width:].cpu()
    if new.shape[1] < max_new_tokens:
        new = torch.cat([new, torch.full((new.shape[0], max_new_tokens - new.shape[1]), pad_id)], dim=1)
    return new


def continuation_mask(new: torch.Tensor, eos: int | Sequence[int] | None) -> torch.Tensor:
    """``[n, T]`` True up to and including the first EOS of each row (all True without EOS).

    Example:
        >>> continuation_mask(torch.tensor([[4, 2, 5, 2]]), eos=2).tolist()
        [[True, True, False, False]]
    """
    if eos is None:
        return torch.ones_like(new, dtype=torch.bool)
    ids = torch.as_tensor([eos] if isinstance(eos, int) else list(eos))
    is_eos = torch.isin(new, ids.to(new.device))
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return ~after


@torch.no_grad()
def full_continuations(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    pad_id: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``[n, max_new_tokens]`` the full model's greedy continuations (``model.generate``), right-padded.

    Args:
        model: A ``transformers`` causal LM.
        prompts: One 1-D LongTensor per prompt (left-padded per batch).
        max_new_tokens: Tokens generated per prompt.
        batch_size: Prompts per ``generate`` call.
        pad_id: Padding id (default: :func:`pad_token_id`).
        progress: Show a tqdm bar.
    """
    pad = pad_token_id(model) if pad_id is None else int(pad_id)
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = prompt_batches(model, prompts, batch_size, pad)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="full-model continuations", unit="batch", total=-(-len(prompts) // batch_size))
    outs = []
    for ids, mask in batches:
        seq = cast(Any, model).generate(  # any causal LM with transformers' generate
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        outs.append(new_tokens(seq, ids.shape[1], max_new_tokens, pad))
    return torch.cat(outs)


def greedy_continuations(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """:func:`full_continuations` with the positions after a row's first EOS set to ``-1`` (padding).

    Example:
        >>> from deltaexit.testing import tiny_model
        >>> greedy_continuations(tiny_model("llama"), [torch.tensor([1, 2]), torch.tensor([3])], 4).shape
        torch.Size([2, 4])
    """
    out = full_continuations(model, prompts, max_new_tokens, batch_size=batch_size, progress=progress)
    keep = continuation_mask(out, eos_token_id(model))
    return torch.where(keep, out, torch.full_like(out, -1))
