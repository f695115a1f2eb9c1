"""Per-example losses in [0, 1] between early-exit and full-model outputs, and the generation adapter.

* :func:`token_disagreement` (textual consistency): share of generated positions where the
  early-exit continuation differs from the full model's greedy continuation.
* :func:`sequence_disagreement`: 1 if the continuations differ anywhere.
* :func:`risk_consistency` (CALM): ``max(0, err(early) - err(full))``, ``err`` the share of
  positions that miss the reference continuation.

:class:`GenerationLosses` is the concrete ``losses(threshold) -> Tensor[n]`` for
:func:`~deltaexit.calibration.ltt.learn_then_test` that runs real early-exit generation
(:class:`deltaexit.EarlyExit`) against ``model.generate`` greedy output on the same prompts.

Example:
    >>> import torch
    >>> early = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    >>> full = torch.tensor([[1, 2, 0, 4], [5, 6, 7, 8]])
    >>> token_disagreement(early, full).tolist()
    [0.25, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "GenerationLosses",
    "continuation_mask",
    "risk_consistency",
    "sequence_disagreement",
    "token_disagreement",
]


def _check_pair(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"continuations must be two [examples, tokens] tensors of the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if mask is None:
        mask = torch.ones(a.shape, dtype=torch.bool, device=a.device)
    mask = mask.bool()
    if mask.shape != a.shape:
        raise ValueError(f"mask must be {tuple(a.shape)}, got {tuple(mask.shape)}")
    empty = ~mask.any(dim=1)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} example(s) have no token to compare (all masked)")
    return mask


def token_disagreement(early: torch.Tensor, full: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` share of (unmasked) positions where ``early`` and ``full`` differ."""
    mask = _check_pair(early, full, mask)
    diff = ((early != full) & mask).sum(dim=1).to(torch.float64)
    return (diff / mask.sum(dim=1).to(torch.float64)).cpu()


def sequence_disagreement(early: torch.Tensor, full: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` 1.0 where the continuations differ at any (unmasked) position, else 0.0."""
    mask = _check_pair(early, full, mask)
    return ((early != full) & mask).any(dim=1).to(torch.float64).cpu()


def risk_consistency(
    early: torch.Tensor, full: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[n]`` CALM's risk consistency: ``max(0, err(early, ref) - err(full, ref))`` in [0, 1].

    Example:
        >>> ref = torch.tensor([[1, 2, 3, 4]])
        >>> risk_consistency(torch.tensor([[1, 0, 3, 4]]), ref, ref).tolist()
        [0.25]
    """
    mask = _check_pair(early, full, mask)
    _check_pair(early, reference, mask)
    err_early = token_disagreement(early, reference, mask)
    err_full = token_disagreement(full, reference, mask)
    return (err_early - err_full).clamp(0.0, 1.0)


def continuation_mask(new_tokens: torch.Tensor, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    """``[n, T]`` True up to and including the first EOS of each row (all True without EOS)."""
    if eos_token_id is None:
        return torch.ones_like(new_tokens, dtype=torch.bool)
    eos = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    is_eos = torch.isin(new_tokens, eos.to(new_tokens.device))
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return ~after


def _pad_left(prompts: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(int(p.numel()) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p.numel():
            ids[i, width - p.numel() :] = p.reshape(-1)
            mask[i, width - p.numel() :] = 1
    return ids, mask


class GenerationLosses:
    """``losses(threshold) -> Tensor[n]`` from real early-exit generation vs full greedy generation.

    The full model's greedy continuations are generated once (``model.generate``, greedy); every
    call then runs ``dx.EarlyExit(model, measure, threshold, kv).generate`` on the same prompts
    and compares. Continuations are compared up to the full model's first EOS.

    Args:
        model: The causal LM.
        prompts: One 1-D LongTensor of token ids per example.
        measure: Registered measure name or instance.
        kv: KV policy (``"verify"``, ``"propagate"``, ``"recompute"``).
        max_new_tokens: Length of the continuations compared.
        loss: ``"textual"``, ``"sequence"`` or ``"risk"`` (needs ``references``).
        references: One 1-D LongTensor per example: the reference continuation (``"risk"``).
        batch_size: Prompts per generate call.
        pad_token_id: Padding id (default: the model's, else 0).
        min_exit_layer: Passed to :class:`deltaexit.EarlyExit`.
        early_exit_kwargs: Further keyword arguments for :class:`deltaexit.EarlyExit`.

    Attributes:
        full: ``[n, T]`` the full model's greedy continuations.
        records: ``{repr(threshold): {"mean_exit_layer": ..., "blocks_saved": ...}}`` per call.

    Example:
        >>> losses = GenerationLosses(model, prompts, "softmax-max", "propagate")  # doctest: +SKIP
        >>> losses(0.9).mean()                                                     # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[torch.Tensor],
        measure: Any = "softmax-max",
        kv: str = "propagate",
        *,
        max_new_tokens: int = 32,
        loss: str = "textual",
        references: Sequence[torch.Tensor] | None = None,
        batch_size: int = 16,
        pad_token_id: int | None = None,
        min_exit_layer: int = 1,
        early_exit_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if loss not in ("textual", "sequence", "risk"):
            raise ValueError(f"loss must be 'textual', 'sequence' or 'risk', got {loss!r}")
        if loss == "risk" and references is None:
            raise ValueError("loss='risk' needs references (one reference continuation per prompt)")
        prompts = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
        if not prompts or any(p.numel() == 0 for p in prompts):
            raise ValueError("pass at least one prompt, each with at least one token")
        self.model, self.prompts, self.measure, self.kv = model, prompts, measure, kv
        self.max_new_tokens, self.loss, self.batch_size = int(max_new_tokens), loss, int(batch_size)
        self.min_exit_layer = int(min_exit_layer)
        self.early_exit_kwargs = dict(early_exit_kwargs or {})
        cfg = getattr(model, "generation_config", None)
        if pad_token_id is None:
            pad_token_id = getattr(cfg, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(cfg, "eos_token_id", None)
            if isinstance(pad_token_id, list):
                pad_token_id = pad_token_id[0] if pad_token_id else None
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.eos_token_id = getattr(cfg, "eos_token_id", None)
        self.records: dict[str, dict[str, float]] = {}
        self.full = self._run(None)[0]
        self.mask = continuation_mask(self.full, self.eos_token_id)
        self.references = None
        if references is not None:
            if len(references) != len(prompts):
                raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
            ref = torch.full_like(self.full, -1)
            for i, r in enumerate(references):
                r = torch.as_tensor(r, dtype=torch.long).reshape(-1)[: self.full.shape[1]]
                ref[i, : r.numel()] = r
            self.references = ref

    @property
    def n(self) -> int:
        """Number of calibration examples."""
        return len(self.prompts)

    def _gen_kwargs(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.pad_token_id,
        }

    @torch.no_grad()
    def _run(self, threshold: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = next(self.model.parameters()).device
        outs, exits = [], []
        ee = None
        if threshold is not None:
            from deltaexit import EarlyExit

            ee = EarlyExit(
                self.model, measure=self.measure, threshold=threshold, kv=self.kv,
                min_exit_layer=self.min_exit_layer, **self.early_exit_kwargs,
            )  # fmt: skip
        for start in range(0, self.n, self.batch_size):
            ids, mask = _pad_left(self.prompts[start : start + self.batch_size], self.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            if ee is None:
                seq = self.model.generate(input_ids=ids, attention_mask=mask, **self._gen_kwargs())
                layers = None
            else:
                out = ee.generate(ids, attention_mask=mask, return_dict_in_generate=True, **self._gen_kwargs())
                seq, layers = out.sequences, out.exit_layers
            new = seq[:, ids.shape[1] :].cpu()
            if new.shape[1] < self.max_new_tokens:  # every row stopped early
                pad = torch.full((new.shape[0], self.max_new_tokens - new.shape[1]), self.pad_token_id)
                new = torch.cat([new, pad], dim=1)
            outs.append(new)
            if layers is not None:
                layers = layers.cpu()[:, : self.max_new_tokens]
                width = self.max_new_tokens - layers.shape[1]
                exits.append(torch.cat([layers, torch.zeros(layers.shape[0], width, dtype=layers.dtype)], 1))
        return torch.cat(outs), (torch.cat(exits) if exits else None)

    def __call__(self, threshold: Any) -> torch.Tensor:
        early, exit_layers = self._run(threshold)
        if exit_layers is not None:
            layers = exit_layers[(exit_layers > 0) & self.mask]
            num_layers = getattr(getattr(self.model, "config", None), "num_hidden_layers", None)
            mean_layer = float(layers.float().mean()) if layers.numel() else float("nan")
            self.records[repr(threshold)] = {
                "mean_exit_layer": mean_layer,
                "blocks_saved": 1.0 - mean_layer / num_layers if num_layers else float("nan"),
            }
        if self.loss == "textual":
            return token_disagreement(early, self.full, self.mask)
        if self.loss == "sequence":
            return sequence_disagreement(early, self.full, self.mask)
        assert self.references is not None
        mask = self.mask & (self.references >= 0)
        return risk_consistency(early, self.full, self.references, mask)
