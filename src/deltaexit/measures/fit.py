"""The training of an exit net: a pure function from per-layer features and labels to a :class:`FittedState`.

Inputs are standardised per layer over the training tokens; the tail of each layer's tokens
(``val_fraction``) is held out for early stopping; the binary cross-entropy is class-balanced
per layer (or unweighted with ``class_weight=None``); AdamW with a fixed ``seed`` for the
initialisation and the batch order makes fits bit-for-bit repeatable on one machine at one
thread count. It changes no process-wide setting: callers that want one intra-op thread (the
fastest for nets this small) wrap the call in :func:`deltaexit.threads.torch_threads`.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 3, generator=g)
    >>> state = fit_exit_net([x], [x[:, 0] > 0], [0], hidden_size=3, settings=FitSettings(max_epochs=2))
    >>> state.layers, state.mean.shape, len(state.history)
    ((0,), torch.Size([1, 3]), 3)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deltaexit.measures.fitted import FittedState
from deltaexit.measures.nets import ExitNet

__all__ = ["FitSettings", "fit_exit_net"]


@dataclass(frozen=True)
class FitSettings:
    """How to train (the trainable measures' constructor parameters of the same names).

    Attributes:
        hidden_units: Hidden width of the net (0: logistic classifier).
        per_layer: One net per layer instead of one shared net with a layer embedding.
        max_epochs: Upper bound on passes over the training tokens.
        batch_size: Tokens per gradient step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        val_fraction: Tail share of each layer's tokens held out for early stopping.
        patience: Epochs without held-out improvement before stopping.
        seed: Seed of the initialisation and the batch order.
        class_weight: ``"balanced"`` or None.
    """

    hidden_units: int = 64
    per_layer: bool = False
    max_epochs: int = 30
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    patience: int = 4
    seed: int = 0
    class_weight: str | None = "balanced"


@dataclass(frozen=True)
class _Split:
    """Standardised training and held-out tokens of all layers, with their layer rows and loss weights."""

    tx: torch.Tensor
    ty: torch.Tensor
    tr: torch.Tensor
    tw: torch.Tensor
    vx: torch.Tensor
    vy: torch.Tensor
    vr: torch.Tensor
    vw: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    rates: tuple[float, ...]


def _split(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], settings: FitSettings) -> _Split:
    """Hold out the tail of each layer's tokens (text order), standardise, weigh the classes per layer."""
    train_x, train_y, train_r, val_x, val_y, val_r = [], [], [], [], [], []
    means, stds, rates = [], [], []
    for row, (x, y) in enumerate(zip(xs, ys)):
        n_val = max(1, round(settings.val_fraction * x.shape[0]))
        xt, yt = x[:-n_val], y[:-n_val]
        mean = xt.mean(dim=0)
        std = xt.std(dim=0, unbiased=False).clamp_min(1e-6)
        means.append(mean)
        stds.append(std)
        rates.append(float(yt.float().mean()))
        train_x.append((xt - mean) / std)
        train_y.append(yt)
        train_r.append(torch.full((xt.shape[0],), row, dtype=torch.long))
        val_x.append((x[-n_val:] - mean) / std)
        val_y.append(y[-n_val:])
        val_r.append(torch.full((n_val,), row, dtype=torch.long))
    ty, tr, vy, vr = torch.cat(train_y), torch.cat(train_r), torch.cat(val_y), torch.cat(val_r)
    # Class-balanced weights per layer: positives and negatives weigh half each. Without them
    # (class_weight=None) the logit estimates the posterior P(safe | state), comparable across layers.
    rate = torch.tensor(rates, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
    if settings.class_weight == "balanced":
        w_pos, w_neg = 0.5 / rate, 0.5 / (1 - rate)
    else:
        w_pos, w_neg = torch.ones_like(rate), torch.ones_like(rate)
    return _Split(
        tx=torch.cat(train_x), ty=ty, tr=tr, tw=torch.where(ty, w_pos[tr], w_neg[tr]),
        vx=torch.cat(val_x), vy=vy, vr=vr, vw=torch.where(vy, w_pos[vr], w_neg[vr]),
        mean=torch.stack(means), std=torch.stack(stds), rates=tuple(rates),
    )  # fmt: skip


def _train(
    data: _Split, num_layers: int, settings: FitSettings, on_epoch: Callable[[int, float], None] | None
) -> tuple[ExitNet, tuple[float, ...], int]:
    """AdamW with early stopping on the held-out loss; returns the best epoch's frozen net, the history, the epoch."""
    generator = torch.Generator().manual_seed(settings.seed)
    net = ExitNet(data.tx.shape[1], settings.hidden_units, num_layers, settings.per_layer, generator)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = nn.functional.binary_cross_entropy_with_logits

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(net(data.vx, data.vr), data.vy.float(), weight=data.vw))

    best = held_out_loss()
    best_state = {k: v.clone() for k, v in net.state_dict().items()}
    best_epoch, bad, history = 0, 0, [best]
    for epoch in range(1, settings.max_epochs + 1):
        perm = torch.randperm(data.tx.shape[0], generator=generator)
        net.train()
        for start in range(0, data.tx.shape[0], settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            loss = loss_fn(net(data.tx[idx], data.tr[idx]), data.ty[idx].float(), weight=data.tw[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        current = held_out_loss()
        history.append(current)
        if on_epoch is not None:
            on_epoch(epoch, current)
        if current < best - 1e-5:
            best, best_epoch, bad = current, epoch, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= settings.patience:
                break
    net.load_state_dict(best_state)
    return net.freeze(), tuple(history), best_epoch


def fit_exit_net(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    layers: Sequence[int],
    *,
    hidden_size: int,
    settings: FitSettings,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FittedState:
    """Train an :class:`~deltaexit.measures.nets.ExitNet` on per-layer features and labels.

    Args:
        xs: ``[tokens, features]`` float32 per layer (tokens in text order; >= 2 each).
        ys: ``[tokens]`` bool per layer: True = safe to exit.
        layers: The block index of each entry (distinct); rows are sorted by it.
        hidden_size: Hidden size of the states the features came from (recorded).
        settings: How to train.
        on_epoch: Called with ``(epoch, held-out loss)`` after every epoch.

    Returns:
        The :class:`FittedState`.
    """
    if not len(xs) == len(ys) == len(layers) or not xs:
        raise ValueError(f"need one feature and one label tensor per layer; got {len(xs)}, {len(ys)}, {len(layers)}")
    order = sorted(range(len(layers)), key=lambda i: layers[i])
    data = _split([xs[i] for i in order], [ys[i] for i in order], settings)
    net, history, best_epoch = _train(data, len(layers), settings, on_epoch)
    return FittedState(
        layers=tuple(int(layers[i]) for i in order),
        hidden_size=int(hidden_size),
        n_features_in=int(data.tx.shape[1]),
        mean=data.mean,
        std=data.std,
        net=net,
        positive_rate=data.rates,
        history=history,
        best_epoch=best_epoch,
    )
