"""The training loop: AdamW, linear warm-up then cosine decay, gradient clipping, deterministic.

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> from deltaexit.training.data import WindowSampler
    >>> from deltaexit.training.recipes import PlainRecipe
    >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=64)
    >>> sampler = WindowSampler(torch.randint(0, 64, (500,)), context=16, batch_size=2)
    >>> history = train_loop(model, sampler, TrainConfig(steps=3, warmup=1), PlainRecipe(), progress=False)
    >>> history["steps"], history["stopped_on_time"]
    (3, False)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from deltaexit.training.data import WindowSampler

__all__ = ["TrainConfig", "deterministic", "train_loop"]


@dataclass
class TrainConfig:
    """Optimisation settings.

    Args:
        steps: Optimiser steps (the schedule's length).
        batch_size: Windows per step.
        lr: Peak learning rate.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        warmup: Linear warm-up steps.
        weight_decay: AdamW weight decay (not on norms and biases).
        grad_clip: Global gradient-norm clip (0: off).
        seed: Seed of the initialisation and the data order.
        minutes: Optional wall-clock cap; stopping on it makes the run depend on machine speed.
        threads: The intra-op thread count the run is meant for (recorded in ``training.json``;
            a seeded run is bit-identical for a fixed count). The library does not apply it: the
            caller wraps training in ``deltaexit.threads.torch_threads(config.threads)``, as
            ``deltaexit train`` and :func:`deltaexit.reference.build_preset` do.
    """

    steps: int = 1200
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    minutes: float | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"--threads must be an int >= 1, got {self.threads!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and enable deterministic algorithms; restore the algorithm setting on exit.

    The thread count is the caller's (``deltaexit.threads.torch_threads``).

    Example:
        >>> with deterministic(0):
        ...     a = torch.rand(2)
        >>> with deterministic(0):
        ...     torch.equal(a, torch.rand(2))
        True
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def train_loop(model: nn.Module, sampler: WindowSampler, cfg: TrainConfig, recipe, progress: bool = True) -> dict:
    """Train ``model`` in place for ``cfg.steps`` steps (or until ``cfg.minutes``) with ``recipe.loss``.

    Returns:
        A history dict: ``steps`` run, ``seconds``, ``steps_per_second``, ``loss`` (every 10 steps),
        ``final_loss`` (mean of the last 20 steps), ``stopped_on_time``.
    """
    model.train()
    optimizer = _optimizer(model, cfg)
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    stopped_on_time = False
    step = 0
    bar = tqdm(total=cfg.steps, desc=f"train ({recipe.name})", disable=not progress)
    try:
        for step in range(cfg.steps):
            if cfg.minutes is not None and time.perf_counter() - start > 60 * cfg.minutes:
                stopped_on_time = True
                break
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            ids = sampler.next()
            loss, logs = recipe.loss(model, ids, step, cfg.steps)
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss became {float(loss)} at step {step}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(logs["loss"])
            if step % 10 == 0:
                curve.append((step, logs["loss"]))
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
            bar.update(1)
        else:
            step = cfg.steps
    finally:
        bar.close()
        model.eval()
    seconds = time.perf_counter() - start
    done = len(losses)
    return {
        "steps": done,
        "seconds": round(seconds, 2),
        "steps_per_second": round(done / seconds, 4) if seconds > 0 else None,
        "final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1),
        "loss_curve": curve,
        "stopped_on_time": stopped_on_time,
    }
