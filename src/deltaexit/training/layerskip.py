"""LayerSkip-style pieces for any HF causal LM: the layer-dropout schedule, early-exit loss weights,
and :class:`BlockTaps`, which captures every block's output (keeping gradients) and drops blocks per
sample while keeping the residual path (a dropped block passes its input through unchanged).

Blocks and the shared exit head come from :func:`deltaexit.find_structure` / :class:`deltaexit.Lens`,
so nothing here is Llama-specific.

Example:
    >>> [round(p, 6) for p in layer_dropout_schedule(4, p_max=0.2)]
    [0.0, 0.051984, 0.11748, 0.2]
    >>> exit_loss_weights(4, step=0, kind="calm")
    [0.1, 0.2, 0.3, 0.4]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from deltaexit.lens import Lens
from deltaexit.parallel import ParallelBlocks
from deltaexit.structure import StructureError, block_input, block_output, find_structure

__all__ = [
    "CURRICULA",
    "EXIT_LOSSES",
    "BlockTaps",
    "early_exit_loss",
    "exit_loss_weights",
    "layer_dropout_schedule",
]

CURRICULA = ("all", "rotational", "gradual")
EXIT_LOSSES = ("layerskip", "calm", "none")


def layer_dropout_schedule(
    num_layers: int,
    p_max: float,
    step: int | None = None,
    total_steps: int | None = None,
    warmup: str = "none",
) -> list[float]:
    """Per-layer dropout probabilities rising exponentially with depth (LayerSkip).

    ``p_l = S(t) * p_max * (exp(l * ln 2 / (L - 1)) - 1)`` for layers ``l = 0 .. L-1``: 0 at the first
    block, ``p_max`` at the last. With ``warmup="exp"`` the time factor ``S(t)`` rises from 0 to 1 the
    same way over ``total_steps``; otherwise ``S(t) = 1``.

    Raises:
        ValueError: ``p_max`` outside ``[0, 1)``, ``num_layers < 1``, or an unknown ``warmup``.
    """
    if not 0.0 <= p_max < 1.0:
        raise ValueError(f"p_max must lie in [0, 1), got {p_max}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if warmup not in ("none", "exp"):
        raise ValueError(f"warmup must be 'none' or 'exp', got {warmup!r}")
    scale = 1.0
    if warmup == "exp":
        if step is None or not total_steps:
            raise ValueError("warmup='exp' needs step and total_steps")
        frac = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
        scale = math.exp(frac * math.log(2.0)) - 1.0
    if num_layers == 1:
        return [scale * p_max]
    return [scale * p_max * (math.exp(i * math.log(2.0) / (num_layers - 1)) - 1.0) for i in range(num_layers)]


def exit_loss_weights(
    num_layers: int,
    step: int,
    kind: str = "layerskip",
    curriculum: str = "all",
    scale: float = 1.0,
    rotation: int = 2,
    total_steps: int | None = None,
) -> list[float]:
    """Weights of the per-layer cross-entropies in the early-exit loss at training ``step`` (sum to 1).

    - ``kind="layerskip"``: layer ``l < L-1`` gets ``scale * (1 + 2 + ... + (l+1))`` (rising with depth),
      the last layer 1, then normalised; a curriculum switches early layers on and off:
      ``all`` (every step), ``rotational`` (layer ``l`` when ``l % rotation == step % rotation``),
      ``gradual`` (layers switched on from the top down, one more every ``total_steps / (2 (L-1))`` steps).
      The final layer is always on.
    - ``kind="calm"``: CALM's depth-weighted average, weight proportional to ``l + 1``,
      every layer every step.
    - ``kind="none"``: final layer only (plain training).
    """
    if kind not in EXIT_LOSSES:
        raise ValueError(f"unknown exit loss {kind!r}: choose one of {EXIT_LOSSES}")
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown curriculum {curriculum!r}: choose one of {CURRICULA}")
    if scale < 0 or rotation < 1:
        raise ValueError(f"need scale >= 0 and rotation >= 1, got scale={scale}, rotation={rotation}")
    L = num_layers
    if kind == "none":
        raw = [0.0] * (L - 1) + [1.0]
    elif kind == "calm":
        raw = [float(i + 1) for i in range(L)]
    else:
        raw = []
        for i in range(L - 1):
            if curriculum == "all":
                on = True
            elif curriculum == "rotational":
                on = i % rotation == step % rotation
            else:
                if not total_steps:
                    raise ValueError("curriculum='gradual' needs total_steps")
                period = max(total_steps / (2 * max(L - 1, 1)), 1.0)
                enabled = int(step // period) + 1  # early layers switched on so far, from the top
                on = i >= (L - 1) - enabled
            raw.append(scale * (i + 1) * (i + 2) / 2 if on else 0.0)
        raw.append(1.0)
    total = sum(raw)
    return [w / total for w in raw]


class BlockTaps:
    """Context manager on a model's decoder blocks: capture outputs and apply per-sample layer dropout.

    Inside the context each block's output is stored in :attr:`outputs` (gradients kept). If
    ``drop_probs`` is given and the model is in training mode, each sample skips block ``l`` with
    probability ``drop_probs[l]``: its output is replaced by its input (the residual path). In eval mode
    nothing is dropped. Hooks are removed on exit, also when the forward raises.

    Args:
        model: Any causal LM :func:`deltaexit.find_structure` understands.
        drop_probs: One probability per block, or ``None`` for no dropout.
        generator: ``torch.Generator`` for the dropout draws (seeded for reproducibility).

    Example:
        >>> import torch
        >>> from deltaexit.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=64)
        >>> with BlockTaps(model, drop_probs=[0.0, 0.1]) as taps:
        ...     _ = model(input_ids=torch.tensor([[1, 2, 3]]))
        >>> len(taps.outputs), tuple(taps.outputs[-1].shape)
        (2, (1, 3, 32))
    """

    def __init__(
        self,
        model: nn.Module,
        drop_probs: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model = model
        self.structure = find_structure(model)
        n = self.structure.num_layers
        if drop_probs is not None and len(drop_probs) != n:
            raise ValueError(f"drop_probs has {len(drop_probs)} entries but the model has {n} blocks")
        self.drop_probs = list(drop_probs) if drop_probs is not None else [0.0] * n
        if any(p > 0.0 for p in self.drop_probs) and not self.structure.readout.identity:
            raise StructureError(
                f"layer dropout replaces a block's output tensor by its input, but {type(model).__name__}'s blocks "
                f"hold the residual stream elsewhere (readout {self.structure.readout.describe()}): train it without "
                "layer dropout (drop_probs=None); the exit losses work."
            )
        if any(p > 0.0 for p in self.drop_probs) and isinstance(self.structure.blocks, ParallelBlocks):
            raise StructureError(
                f"layer dropout replaces a block's output by its input, but {type(model).__name__}'s layers are parts "
                f"in parallel lists {self.structure.block_path!r} that its forward wires together (virtual blocks, "
                "observed by hooks, whose output no hook can replace): train it without layer dropout "
                "(drop_probs=None); the exit losses work."
            )
        self.generator = generator
        self.outputs: list[torch.Tensor | None] = [None] * n
        self.dropped: list[torch.Tensor | None] = [None] * n
        self._inputs: list[torch.Tensor | None] = [None] * n
        self._handles: list = []

    def __enter__(self) -> BlockTaps:
        try:
            for layer, block in enumerate(self.structure.blocks):
                self._handles.append(block.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._post_hook(layer)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs = [None] * len(self._inputs)

    def _pre_hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._inputs[layer] = block_input(args, kwargs)

        return hook

    def _post_hook(self, layer: int):
        def hook(module: nn.Module, _args: tuple, output: object):
            p = self.drop_probs[layer]
            if p == 0.0 or not module.training:
                self.outputs[layer] = self.structure.stream_output(output)  # the state the lens reads
                self._inputs[layer] = None
                return None
            out = block_output(output)
            h_in = self._inputs[layer]
            if h_in is None or h_in.shape != out.shape:
                raise RuntimeError(f"block {layer}: could not read its input to apply layer dropout")
            drop = torch.rand(out.shape[0], generator=self.generator).to(out.device) < p
            self.dropped[layer] = drop
            changed = bool(drop.any())
            if changed:
                out = torch.where(drop.view(-1, *([1] * (out.ndim - 1))), h_in, out)
            self.outputs[layer] = out
            self._inputs[layer] = None
            if not changed:
                return None
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook


def early_exit_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    weights: Sequence[float],
    attention_mask: torch.Tensor | None = None,
    drop_probs: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    lens: Lens | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Weighted sum of next-token cross-entropies at every block output through the shared lens.

    Layers with weight 0 are not scored (their head is not run). The last block is scored from the
    model's own logits, which equal the lens on its output.

    Args:
        model: A causal LM.
        input_ids: ``[batch, seq]`` token ids (labels are the same ids shifted by one).
        weights: One weight per block (see :func:`exit_loss_weights`).
        attention_mask: Optional ``[batch, seq]`` mask; masked targets are ignored.
        drop_probs: Per-block layer-dropout probabilities (training mode only).
        generator: RNG for the dropout draws.
        lens: The model's lens (built if ``None``).

    Returns:
        ``(loss, per_layer)``: the scalar loss and each block's mean CE (``nan`` where not scored).
    """
    lens = lens or Lens.from_model(model)
    n = lens.structure.num_layers
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries but the model has {n} blocks")
    labels = input_ids[:, 1:]
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, 1:] == 0, -100)
    with BlockTaps(model, drop_probs=drop_probs, generator=generator) as taps:
        final_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = final_logits.new_zeros(())
    per_layer = [float("nan")] * n
    for layer, weight in enumerate(weights):
        if weight == 0.0:
            continue
        h = taps.outputs[layer]
        if h is None:
            raise RuntimeError(f"block {layer} did not run during the forward pass")
        logits = final_logits if layer == n - 1 else lens(h)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        per_layer[layer] = float(ce.detach())
        loss = loss + weight * ce
    return loss, per_layer
