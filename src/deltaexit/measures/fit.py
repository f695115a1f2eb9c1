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

__all__ = [
    "EarlyStopping",
    "FitSettings",
    "LayerStats",
    "batch_loss",
    "fit_exit_net",
    "held_out_sum",
    "loss_weights",
    "new_net",
    "new_optimizer",
]


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


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth's TwoSum, float64)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _dd_sum(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums of ``v [n, F]`` float64 as double-double ``(hi, lo)``: a pairwise tree of TwoSums."""
    lo = torch.zeros(v.shape[1:], dtype=torch.float64)
    while v.shape[0] > 1:
        if v.shape[0] % 2:
            v = torch.cat([v, v.new_zeros(1, *v.shape[1:])])
        v, err = _two_sum(v[0::2], v[1::2])
        lo = lo + err.sum(dim=0)
    return (v[0] if v.shape[0] else torch.zeros_like(lo)), lo


class LayerStats:
    """Per decision layer: token and positive-label counts, and the sums of the features and of their squares.

    The sums are double-double (about 106 bits; the squares of float32 values are exact in float64), so they do
    not depend on how the tokens are cut into chunks or spread over ``torch.distributed`` ranks (:meth:`merge`)
    but for a rounding of the last of those bits: the float32 mean and std of one tensor, of a stream of its
    batches and of any split over ranks are the same (they differ only if a statistic lies within about 1e-30,
    relative, of a float32 rounding midpoint). One pass, no feature kept.

    Example:
        >>> stats = LayerStats(1, 2)
        >>> x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
        >>> stats.add(0, x[:1], torch.tensor([True])); stats.add(0, x[1:], torch.tensor([False, True]))
        >>> stats.count.tolist(), stats.rates(), stats.standardisation()[0].tolist()
        ([3], (0.6666666666666666,), [[2.0, 4.0]])
    """

    def __init__(self, num_rows: int, width: int) -> None:
        self.count = torch.zeros(num_rows, dtype=torch.long)
        self.positives = torch.zeros(num_rows, dtype=torch.long)
        #: ``[2, rows, width]``: hi and lo of the double-double sums of the features and of their squares.
        self.sums = torch.zeros(2, num_rows, width, dtype=torch.float64)
        self.squares = torch.zeros(2, num_rows, width, dtype=torch.float64)

    @property
    def width(self) -> int:
        """Features per token."""
        return int(self.sums.shape[2])

    def add(self, row: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fold ``x [n, width]`` (and its labels ``y [n]``) into row ``row``."""
        if int(x.shape[0]) == 0:
            return
        x64 = x.double()
        self._fold(row, int(x.shape[0]), int(y.sum()), _dd_sum(x64), _dd_sum(x64 * x64))

    def merge(self, other: LayerStats) -> None:
        """Fold another accumulator (e.g. another rank's) into this one, row by row."""
        for row in range(self.count.shape[0]):
            if int(other.count[row]):
                sums = (other.sums[0, row], other.sums[1, row])
                squares = (other.squares[0, row], other.squares[1, row])
                self._fold(row, int(other.count[row]), int(other.positives[row]), sums, squares)

    def _fold(self, row: int, n: int, positives: int, *parts: tuple[torch.Tensor, torch.Tensor]) -> None:
        for acc, (hi, lo) in zip((self.sums, self.squares), parts):
            s, e = _two_sum(acc[0, row], hi)
            acc[0, row], acc[1, row] = _two_sum(s, acc[1, row] + lo + e)
        self.count[row] += n
        self.positives[row] += positives

    def standardisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` float32 ``[rows, width]`` (population std, at least 1e-6)."""
        if int(self.count.min()) < 1:
            raise ValueError("every layer needs at least one training token")
        n = self.count[:, None].double()
        mean = (self.sums[0] + self.sums[1]) / n
        var = ((self.squares[0] + self.squares[1]) / n - mean * mean).clamp_min(0.0)
        return mean.float(), var.sqrt().float().clamp_min(1e-6)

    def rates(self) -> tuple[float, ...]:
        """Share of positive labels per row."""
        return tuple(int(p) / max(1, int(n)) for p, n in zip(self.positives, self.count))


def loss_weights(rates: Sequence[float], class_weight: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_pos, w_neg)`` per layer row: class-balanced (each class weighs half) or ones (``class_weight=None``).

    Without balancing the logit estimates the posterior P(safe | state), comparable across layers.
    """
    rate = torch.tensor(list(rates), dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
    if class_weight == "balanced":
        return 0.5 / rate, 0.5 / (1 - rate)
    return torch.ones_like(rate), torch.ones_like(rate)


def batch_loss(
    net: ExitNet, x: torch.Tensor, row: torch.Tensor, y: torch.Tensor, w: torch.Tensor, total: int
) -> torch.Tensor:
    """The weighted binary cross-entropy of a minibatch, summed and divided by ``total`` (the global batch rows)."""
    logits = net(x, row)
    return nn.functional.binary_cross_entropy_with_logits(logits, y.float(), weight=w, reduction="sum") / total


def held_out_sum(net: ExitNet, x: torch.Tensor, row: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """The float64 sum of the weighted held-out losses of these rows (no gradients)."""
    with torch.no_grad():
        loss = nn.functional.binary_cross_entropy_with_logits(net(x, row), y.float(), weight=w, reduction="none")
    return float(loss.double().sum())


class EarlyStopping:
    """Keeps the best held-out loss and its weights; says when ``patience`` epochs brought no improvement."""

    def __init__(self, net: ExitNet, loss: float, patience: int) -> None:
        self.net, self.patience = net, patience
        self.best, self.best_epoch, self.bad, self.history = loss, 0, 0, [loss]
        self.best_state = {k: v.clone() for k, v in net.state_dict().items()}

    def update(self, epoch: int, loss: float) -> bool:
        """Record the loss after ``epoch``; True when training should stop."""
        self.history.append(loss)
        if loss < self.best - 1e-5:
            self.best, self.best_epoch, self.bad = loss, epoch, 0
            self.best_state = {k: v.clone() for k, v in self.net.state_dict().items()}
            return False
        self.bad += 1
        return self.bad >= self.patience

    def result(self) -> tuple[ExitNet, tuple[float, ...], int]:
        """The best epoch's frozen net, the history, the best epoch."""
        self.net.load_state_dict(self.best_state)
        return self.net.freeze(), tuple(self.history), self.best_epoch


def new_net(in_features: int, num_layers: int, settings: FitSettings) -> tuple[ExitNet, torch.Generator]:
    """The seeded initial net and the generator it was drawn from (the batch order continues it)."""
    generator = torch.Generator().manual_seed(settings.seed)
    net = ExitNet(in_features, settings.hidden_units, num_layers, settings.per_layer, generator)
    return net, generator


def new_optimizer(net: ExitNet, settings: FitSettings) -> torch.optim.Optimizer:
    """AdamW with the settings' learning rate and weight decay."""
    return torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


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
    stats = LayerStats(len(xs), int(xs[0].shape[1]))
    n_vals = [max(1, round(settings.val_fraction * x.shape[0])) for x in xs]
    for row, (x, y, n_val) in enumerate(zip(xs, ys, n_vals)):
        stats.add(row, x[:-n_val], y[:-n_val])
    mean, std = stats.standardisation()
    rates = stats.rates()
    w_pos, w_neg = loss_weights(rates, settings.class_weight)
    train_x, train_y, train_r, val_x, val_y, val_r = [], [], [], [], [], []
    for row, (x, y, n_val) in enumerate(zip(xs, ys, n_vals)):
        train_x.append((x[:-n_val] - mean[row]) / std[row])
        train_y.append(y[:-n_val])
        train_r.append(torch.full((x.shape[0] - n_val,), row, dtype=torch.long))
        val_x.append((x[-n_val:] - mean[row]) / std[row])
        val_y.append(y[-n_val:])
        val_r.append(torch.full((n_val,), row, dtype=torch.long))
    ty, tr, vy, vr = torch.cat(train_y), torch.cat(train_r), torch.cat(val_y), torch.cat(val_r)
    return _Split(
        tx=torch.cat(train_x), ty=ty, tr=tr, tw=torch.where(ty, w_pos[tr], w_neg[tr]),
        vx=torch.cat(val_x), vy=vy, vr=vr, vw=torch.where(vy, w_pos[vr], w_neg[vr]),
        mean=mean, std=std, rates=rates,
    )  # fmt: skip


def _train(
    data: _Split, num_layers: int, settings: FitSettings, on_epoch: Callable[[int, float], None] | None
) -> tuple[ExitNet, tuple[float, ...], int]:
    """AdamW with early stopping on the held-out loss; returns the best epoch's frozen net, the history, the epoch."""
    net, generator = new_net(data.tx.shape[1], num_layers, settings)
    optimizer = new_optimizer(net, settings)
    n_val = int(data.vx.shape[0])
    stopping = EarlyStopping(net, held_out_sum(net, data.vx, data.vr, data.vy, data.vw) / n_val, settings.patience)
    for epoch in range(1, settings.max_epochs + 1):
        perm = torch.randperm(data.tx.shape[0], generator=generator)
        net.train()
        for start in range(0, data.tx.shape[0], settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            loss = batch_loss(net, data.tx[idx], data.tr[idx], data.ty[idx], data.tw[idx], int(idx.shape[0]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        current = held_out_sum(net, data.vx, data.vr, data.vy, data.vw) / n_val
        if on_epoch is not None:
            on_epoch(epoch, current)
        if stopping.update(epoch, current):
            break
    return stopping.result()


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
