"""The generation adapter: per-example losses of real early-exit generation against the full model.

:class:`GenerationLosses` is the concrete ``losses(threshold) -> Tensor[n]`` for
:func:`~deltaexit.calibration.ltt.learn_then_test` that runs real early-exit generation
(:class:`~deltaexit.generation.early_exit.EarlyExit`) against ``model.generate`` greedy output on the
same prompts. The losses themselves live in :mod:`~deltaexit.calibration.losses` (re-exported here).

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> losses = GenerationLosses(tiny_model("llama"), [torch.tensor([1, 2]), torch.tensor([3])], max_new_tokens=4)
    >>> losses(float("inf")).tolist()                    # never exit: identical to the full model
    [0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from deltaexit.calibration.losses import (
    check_loss,
    continuation_losses,
    risk_consistency,
    sequence_disagreement,
    token_disagreement,
)
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.prompts import as_prompts, continuation_mask, eos_token_id, new_tokens, prompt_batches
from deltaexit.prompts import pad_token_id as model_pad_token_id
from deltaexit.structure import find_structure

__all__ = [
    "GenerationLosses",
    "continuation_mask",
    "risk_consistency",
    "sequence_disagreement",
    "token_disagreement",
]


def _pad_columns(layers: torch.Tensor, width: int) -> torch.Tensor:
    """``[b, width]`` exit layers, zero-padded on the right (0 = no token)."""
    layers = layers.cpu()[:, :width]
    fill = torch.zeros(layers.shape[0], width - layers.shape[1], dtype=layers.dtype)
    return torch.cat([layers, fill], 1)


class GenerationLosses:
    """``losses(threshold) -> Tensor[n]`` from real early-exit generation vs full greedy generation.

    The full model's greedy continuations are generated once (``model.generate``, greedy); every
    call then runs ``EarlyExit(model, measure, threshold, kv=kv).generate`` on the same prompts
    and compares. Continuations are compared up to the full model's first EOS.

    Args:
        model: The causal LM.
        prompts: One 1-D LongTensor of token ids per example.
        measure: Registered measure name or instance.
        kv: KV policy, a name (``"verify"``, ``"propagate"``, ``"recompute"``) or a policy object; passed
            to :class:`~deltaexit.generation.early_exit.EarlyExit` as given.
        max_new_tokens: Length of the continuations compared.
        loss: ``"textual"``, ``"sequence"`` or ``"risk"`` (needs ``references``).
        references: One 1-D LongTensor per example: the reference continuation (``"risk"``).
        batch_size: Prompts per generate call.
        pad_token_id: Padding id (default: the model's, see :func:`deltaexit.prompts.pad_token_id`).
        min_exit_layer: Passed to :class:`~deltaexit.generation.early_exit.EarlyExit`.
        early_exit_kwargs: Further keyword arguments for :class:`~deltaexit.generation.early_exit.EarlyExit`.

    Attributes:
        full: ``[n, T]`` the full model's greedy continuations.
        mask: ``[n, T]`` the compared positions (up to the full model's first EOS).
        records: ``{repr(threshold): {"mean_exit_layer": ..., "blocks_saved": ...}}`` per call.
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[torch.Tensor],
        measure: Any = "softmax-max",
        kv: Any = "propagate",
        *,
        max_new_tokens: int = 32,
        loss: str = "textual",
        references: Sequence[torch.Tensor] | None = None,
        batch_size: int = 16,
        pad_token_id: int | None = None,
        min_exit_layer: int = 1,
        early_exit_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_loss(loss, references is not None)
        self.prompts = as_prompts(prompts)
        self.model, self.measure, self.kv = model, measure, kv
        self.max_new_tokens, self.loss, self.batch_size = int(max_new_tokens), loss, int(batch_size)
        self.min_exit_layer = int(min_exit_layer)
        self.early_exit_kwargs = dict(early_exit_kwargs or {})
        self.pad_token_id = model_pad_token_id(model) if pad_token_id is None else int(pad_token_id)
        self.eos_token_id = eos_token_id(model)
        self.records: dict[str, dict[str, float]] = {}
        self.full = self._run(None)[0]
        self.mask = continuation_mask(self.full, self.eos_token_id)
        self.references = None if references is None else self._references(references)

    @property
    def n(self) -> int:
        """Number of calibration examples."""
        return len(self.prompts)

    def _references(self, references: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[n, T]`` the references, cut to the continuation length, ``-1`` where missing."""
        if len(references) != self.n:
            raise ValueError(f"{len(references)} references for {self.n} prompts")
        ref = torch.full_like(self.full, -1)
        for i, r in enumerate(references):
            r = torch.as_tensor(r, dtype=torch.long).reshape(-1)[: self.full.shape[1]]
            ref[i, : r.numel()] = r
        return ref

    def _gen_kwargs(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "pad_token_id": self.pad_token_id}

    @torch.no_grad()
    def _run(self, threshold: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([n, T] new tokens, [n, T] exit layers or None)``; ``threshold=None`` runs the full model."""
        outs, exits = [], []
        ee = None
        if threshold is not None:
            ee = EarlyExit(
                self.model, measure=self.measure, threshold=threshold, kv=self.kv,
                min_exit_layer=self.min_exit_layer, **self.early_exit_kwargs,
            )  # fmt: skip
        for ids, mask in prompt_batches(self.model, self.prompts, self.batch_size, self.pad_token_id):
            if ee is None:
                seq = cast(Any, self.model).generate(input_ids=ids, attention_mask=mask, **self._gen_kwargs())
            else:
                out: Any = ee.generate(ids, attention_mask=mask, return_dict_in_generate=True, **self._gen_kwargs())
                seq = out.sequences
                exits.append(_pad_columns(out.exit_layers, self.max_new_tokens))
            outs.append(new_tokens(seq, ids.shape[1], self.max_new_tokens, self.pad_token_id))
        return torch.cat(outs), (torch.cat(exits) if exits else None)

    def _record(self, threshold: Any, exit_layers: torch.Tensor) -> None:
        layers = exit_layers[(exit_layers > 0) & self.mask]
        num_layers = find_structure(self.model, validate=False).num_layers
        mean_layer = float(layers.float().mean()) if layers.numel() else float("nan")
        self.records[repr(threshold)] = {
            "mean_exit_layer": mean_layer,
            "blocks_saved": 1.0 - mean_layer / num_layers if num_layers else float("nan"),
        }

    def __call__(self, threshold: Any) -> torch.Tensor:
        early, exit_layers = self._run(threshold)
        if exit_layers is not None:
            self._record(threshold, exit_layers)
        if self.loss != "risk":
            return continuation_losses(self.loss, early, self.full, self.mask)
        assert self.references is not None
        mask = self.mask & (self.references >= 0)
        return continuation_losses("risk", early, self.full, mask, self.references)
