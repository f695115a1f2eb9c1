"""Out-of-core training of an exit net: :func:`~deltaexit.measures.fit.fit_exit_net` from a stream of batches.

A :class:`FitSource` hands out the training data as *units* (a shard of a streamed collection, or one batch of
an iterable) read in order as :class:`Chunk` s of raw per-layer features and labels; memory stays bounded by the
shuffle buffer, whatever the corpus size. The fit follows the in-memory one step by step:

1. **Split**: the source holds out whole units (the last ``max(1, round(val_fraction * units))`` in corpus
   order: a deterministic, shard-level split, the same on every rank) for early stopping.
2. **First pass**: per layer the token and positive-label counts, mean and sum of squared deviations (float64,
   :class:`~deltaexit.measures.fit.LayerStats`) over the training units; no feature is kept.
3. **Epochs**: each *stream* reads its units in order, standardises, and shuffles its rows (``(token, layer)``
   pairs, layer-major as the in-memory fit arranges them) in buffers of at most ``shuffle_rows`` rows with its own
   seeded generator (stream 0 continues the initialisation's generator, as the in-memory fit does); minibatch
   ``k`` of every stream makes global step ``k``, whose loss is the weighted binary cross-entropy summed over
   the rows of all streams and divided by their number. The held-out loss after each epoch drives the same early
   stopping.

With one stream and a buffer that holds every training row, the minibatches are exactly the in-memory fit's
(the same permutation of the same rows), so on the same tokens with the same held-out tokens the two fits give
bit-identical weights (tested). Under ``torch.distributed`` the streams are dealt to the ranks (stream ``s`` on
rank ``s % world_size``); each rank reads only its streams' units, the gradients are summed with
``all_reduce`` (each rank's loss is already divided by the global row count) and the held-out sums too, so every
rank holds the same weights, and the fit equals a one-process fit with the same ``streams`` up to the order of
floating-point sums. A rank whose streams ran dry contributes zero gradients: uneven shard counts never hang.
The gradients are reduced in one flat ``all_reduce`` per step rather than by wrapping the net in
``DistributedDataParallel``: its reducer expects every rank to produce every gradient at every step, which a rank
without rows (uneven shards) or a per-layer net whose batch misses a layer does not; the arithmetic is DDP's.
Under ``nccl`` the collectives run on the current CUDA device (not run here: gloo on CPU is what is tested).

Example:
    >>> import torch
    >>> from deltaexit.measures.fit import FitSettings
    >>> g = torch.Generator().manual_seed(0)
    >>> data = [torch.randn(30, 3, generator=g) for _ in range(4)]
    >>> source = TensorSource([[x] for x in data], [[x[:, 0] > 0] for x in data], layers=(0,), hidden_size=3)
    >>> state = fit_exit_net_stream(source, settings=FitSettings(max_epochs=2, hidden_units=0))
    >>> state.layers, len(state.history)
    ((0,), 3)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from deltaexit.measures.base import LayerState
from deltaexit.measures.fit import (
    EarlyStopping,
    FitSettings,
    LayerStats,
    batch_loss,
    held_out_sum,
    loss_weights,
    new_net,
    new_optimizer,
)
from deltaexit.measures.fitted import FittedState
from deltaexit.measures.nets import ExitNet

__all__ = [
    "DEFAULT_SHUFFLE_ROWS",
    "BatchSource",
    "Chunk",
    "FitSource",
    "TensorSource",
    "fit_exit_net_stream",
    "held_out_units",
    "rank_and_world",
]

#: Default shuffle-buffer size in rows (``(token, layer)`` pairs): ``rows * n_features_in * 4`` bytes at most
#: (256 MiB for a 4096-wide delta); the fit's memory stops growing once the training rows exceed it.
DEFAULT_SHUFFLE_ROWS = 1 << 14


@dataclass
class Chunk:
    """Raw features and labels of some tokens at every decision layer.

    Attributes:
        xs: ``[tokens, n_features_in]`` float32 per decision layer (rows in the source's layer order).
        ys: ``[tokens]`` bool per decision layer.
        where: Where the tokens come from (e.g. ``shard 'shard-r00000-00003.safetensors'``), for error messages.
    """

    xs: list[torch.Tensor]
    ys: list[torch.Tensor]
    where: str


class FitSource(Protocol):
    """What :func:`fit_exit_net_stream` reads: units of data, each read as :class:`Chunk` s.

    Attributes:
        layers: The decision layers (block indices), ascending: row ``i`` of every chunk is ``layers[i]``.
        hidden_size: Hidden size of the states the features came from.
        distributed: True if the units are global (every rank sees all; the fit gives each rank its own);
            False if each rank's source holds that rank's own units.
    """

    layers: tuple[int, ...]
    hidden_size: int
    distributed: bool

    def split(self, val_fraction: float) -> tuple[list[int], list[int]]:
        """The training units and the held-out units (deterministic; the same on every rank)."""
        ...

    def epoch_units(self, units: Sequence[int], epoch: int) -> list[int]:
        """The order in which epoch ``epoch`` (1, 2, ...) reads the training ``units``."""
        ...

    def chunks(self, units: Sequence[int]) -> Iterator[Chunk]:
        """Read ``units`` in this order."""
        ...


def held_out_units(count: int, val_fraction: float, what: str) -> tuple[list[int], list[int]]:
    """Split units ``0 .. count-1`` into the training head and the held-out tail (``max(1, round(f * count))``).

    Example:
        >>> held_out_units(7, 0.3, "shards")
        ([0, 1, 2, 3, 4], [5, 6])
    """
    if count < 2:
        raise ValueError(
            f"a streamed fit holds out whole {what} for early stopping and needs at least 2, got {count}; "
            f"use more, smaller {what}, or fit in memory with fit(states, labels)"
        )
    n_val = min(count - 1, max(1, round(val_fraction * count)))
    return list(range(count - n_val)), list(range(count - n_val, count))


class TensorSource:
    """A :class:`FitSource` over in-memory batches, one unit each: ``xs[b][i]``, ``ys[b][i]`` = batch ``b``, row ``i``.

    Mostly for tests and examples; the units are this process's own (``distributed = False``).
    """

    distributed = False

    def __init__(
        self,
        xs: Sequence[Sequence[torch.Tensor]],
        ys: Sequence[Sequence[torch.Tensor]],
        *,
        layers: Sequence[int],
        hidden_size: int,
    ) -> None:
        self.xs, self.ys = list(xs), list(ys)
        self.layers = tuple(int(layer) for layer in layers)
        self.hidden_size = int(hidden_size)

    def split(self, val_fraction: float) -> tuple[list[int], list[int]]:
        return held_out_units(len(self.xs), val_fraction, "batches")

    def epoch_units(self, units: Sequence[int], epoch: int) -> list[int]:
        return list(units)

    def chunks(self, units: Sequence[int]) -> Iterator[Chunk]:
        for unit in units:
            yield Chunk(list(self.xs[unit]), [y.to(torch.bool) for y in self.ys[unit]], f"batch {unit}")


class BatchSource:
    """A :class:`FitSource` over a re-iterable of ``(states, labels)`` batches, as ``fit(states, labels)`` takes them.

    Each batch is one unit: the last ``max(1, round(val_fraction * batches))`` batches are held out (the batches
    are counted in a first pass), unless the iterable declares its own: an optional method
    ``held_out_batches(val_fraction) -> list[int]`` names the held-out batch indices (called once, before any
    other pass; the batch count is ``len(batches)`` where it has one);
    :class:`deltaexit.stream_analysis.SplitBatches` uses it to hold out the in-memory fit's tail tokens.
    ``features`` turns a batch's states into raw features (the measure's ``fit_features``). Under
    ``torch.distributed`` every rank passes its own batches (``distributed = False``).
    """

    distributed = False

    def __init__(
        self, batches: Iterable[tuple[Sequence[LayerState], Sequence[torch.Tensor]]],
        features: Callable[[list[LayerState]], list[torch.Tensor]], hidden_size: Callable[[LayerState], int],
    ) -> None:  # fmt: skip
        if iter(batches) is batches:
            raise TypeError(
                "a streamed fit reads the data once per epoch: pass a re-iterable (a ShardDataset, a list, a "
                "DataLoader), not an iterator or generator"
            )
        self.batches, self.features = batches, features
        first = next(iter(batches), None)
        if first is None:
            raise ValueError("the batches are empty")
        states, _ = self._unpack(first, 0)
        self.layers = tuple(sorted(int(s.layer) for s in states))
        self.hidden_size = int(hidden_size(states[0]))

    @staticmethod
    def _unpack(batch: Any, index: int) -> tuple[list[LayerState], list[torch.Tensor]]:
        try:
            raw_states, raw_labels = batch
        except (TypeError, ValueError):
            raise TypeError(
                f"batch {index} is not a (states, labels) pair; each batch must be what fit(states, labels) takes "
                "(one LayerState and one [tokens] bool label tensor per decision layer)"
            ) from None
        states: list[LayerState] = list(raw_states)
        labels: list[torch.Tensor] = list(raw_labels)
        if not states or len(states) != len(labels):
            raise ValueError(f"batch {index}: {len(states)} states but {len(labels)} label tensors")
        return states, labels

    def split(self, val_fraction: float) -> tuple[list[int], list[int]]:
        declared = getattr(self.batches, "held_out_batches", None)
        if declared is None:
            return held_out_units(sum(1 for _ in self.batches), val_fraction, "batches")
        held = sorted({int(i) for i in declared(val_fraction)})
        count = len(self.batches) if isinstance(self.batches, Sized) else sum(1 for _ in self.batches)
        if not held or held[0] < 0 or held[-1] >= count or len(held) == count:
            raise ValueError(
                f"held_out_batches gave {held} of {count} batches: it must name at least one and not every batch"
            )
        held_set = frozenset(held)
        return [i for i in range(count) if i not in held_set], held

    def epoch_units(self, units: Sequence[int], epoch: int) -> list[int]:
        return list(units)

    def chunks(self, units: Sequence[int]) -> Iterator[Chunk]:
        wanted = sorted(set(units))
        if not wanted:
            return
        for index, batch in enumerate(self.batches):
            if index > wanted[-1]:
                break
            if index not in wanted:
                continue
            states, labels = self._unpack(batch, index)
            order = sorted(range(len(states)), key=lambda i: int(states[i].layer))
            if tuple(int(states[i].layer) for i in order) != self.layers:
                raise ValueError(f"batch {index} has layers {[s.layer for s in states]}, batch 0 {list(self.layers)}")
            xs = self.features([states[i] for i in order])
            ys = [torch.as_tensor(labels[i]).reshape(-1).to(torch.bool) for i in order]
            yield Chunk(xs, ys, f"batch {index}")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default ``torch.distributed`` process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class _Scaling:
    """The first pass's result: standardisation and class weights per layer row."""

    mean: torch.Tensor
    std: torch.Tensor
    w_pos: torch.Tensor
    w_neg: torch.Tensor

    def rows(self, chunk: Chunk) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Standardised features and labels of a chunk, per layer row."""
        return [(x - self.mean[i]) / self.std[i] for i, x in enumerate(chunk.xs)], list(chunk.ys)

    def assemble(
        self, xs: list[list[torch.Tensor]], ys: list[list[torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer-major ``(x, row, y, weight)`` of buffered pieces (``xs[i]`` = pieces of layer row ``i``)."""
        x = torch.cat([torch.cat(p) for p in xs])
        y = torch.cat([torch.cat(p) for p in ys])
        row = torch.cat([torch.full((sum(int(t.shape[0]) for t in p),), i, dtype=torch.long) for i, p in enumerate(xs)])
        return x, row, y, torch.where(y, self.w_pos[row], self.w_neg[row])


def _comm_device() -> torch.device:
    """Where collectives run: the current CUDA device under ``nccl`` (which reduces only CUDA tensors), else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks (on the CPU, as given)."""
    device = _comm_device()
    moved = tensor.to(device)
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def _check_chunk(chunk: Chunk, layers: Sequence[int], width: int | None) -> None:
    if len(chunk.xs) != len(layers) or len(chunk.ys) != len(layers):
        raise ValueError(f"{chunk.where}: {len(chunk.xs)} layers of features, expected {len(layers)} ({list(layers)})")
    for layer, x, y in zip(layers, chunk.xs, chunk.ys):
        if x.dim() != 2 or x.shape[0] != y.shape[0] or (width is not None and x.shape[1] != width):
            raise ValueError(
                f"{chunk.where}, layer {layer}: features {tuple(x.shape)} and labels {tuple(y.shape)} do not match "
                f"[tokens, {width if width is not None else 'features'}] and [tokens]"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"{chunk.where}, layer {layer}: the states contain NaN or inf")


def _first_pass(source: FitSource, units: Sequence[int]) -> tuple[LayerStats | None, dict[int, int]]:
    """Counts, means and squared deviations per layer row over ``units``; tokens per unit."""
    stats: LayerStats | None = None
    tokens: dict[int, int] = {}
    for unit in units:
        tokens[unit] = 0
        for chunk in source.chunks([unit]):
            _check_chunk(chunk, source.layers, None if stats is None else stats.width)
            if stats is None:
                stats = LayerStats(len(source.layers), int(chunk.xs[0].shape[1]))
            for row, (x, y) in enumerate(zip(chunk.xs, chunk.ys)):
                stats.add(row, x, y)
            tokens[unit] += int(chunk.xs[0].shape[0])
    return stats, tokens


def _gather(obj: object, world: int) -> list[object]:
    if world == 1:
        return [obj]
    out: list[object] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _scaling(
    source: FitSource, train: Sequence[int], settings: FitSettings, rank: int, world: int
) -> tuple[_Scaling, LayerStats, list[dict[int, int]]]:
    """The first pass over this rank's training units, merged over the ranks in rank order."""
    mine = list(train[rank::world]) if source.distributed else list(train)
    local, tokens = _first_pass(source, mine)
    parts: list[tuple[LayerStats | None, dict[int, int]]] = _gather((local, tokens), world)  # type: ignore[assignment]
    stats: LayerStats | None = None
    for part_stats, _ in parts:
        if part_stats is None:
            continue
        if stats is None:
            stats = LayerStats(int(part_stats.count.shape[0]), part_stats.width)
        stats.merge(part_stats)
    if stats is None or int(stats.count.min()) == 0:
        raise ValueError("the training units hold no tokens (every layer needs at least one)")
    mean, std = stats.standardisation()
    w_pos, w_neg = loss_weights(stats.rates(), settings.class_weight)
    return _Scaling(mean, std, w_pos, w_neg), stats, [t for _, t in parts]


def _held_out_loss(net: ExitNet, source: FitSource, units: Sequence[int], scaling: _Scaling, world: int) -> float:
    """The weighted held-out loss per row over ``units`` (this rank's), summed over the ranks."""
    total, count = 0.0, 0
    for chunk in source.chunks(units):
        _check_chunk(chunk, source.layers, int(scaling.mean.shape[1]))
        xs, ys = scaling.rows(chunk)
        x, row, y, w = scaling.assemble([[t] for t in xs], [[t] for t in ys])
        total += held_out_sum(net, x, row, y, w)
        count += int(x.shape[0])
    if world > 1:
        sums = _all_reduce(torch.tensor([total, float(count)], dtype=torch.float64))
        total, count = float(sums[0]), int(sums[1])
    if count == 0:
        raise ValueError("the held-out units hold no tokens")
    return total / count


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _emit(
    scaling: _Scaling,
    buffer: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]],
    carry: Batch | None,
    generator: torch.Generator,
    batch_size: int,
    final: bool,
) -> Generator[Batch, None, Batch | None]:
    """Shuffle one buffer (after the rows carried from the last) and yield its minibatches; return the rest."""
    x, row, y, w = scaling.assemble(*buffer)
    if carry is not None:
        x, row, y, w = (torch.cat([c, t]) for c, t in zip(carry, (x, row, y, w)))
    n = int(x.shape[0])
    perm = torch.randperm(n, generator=generator)
    full = n if final else n - n % batch_size
    for start in range(0, full, batch_size):
        idx = perm[start : start + batch_size]
        yield x[idx], row[idx], y[idx], w[idx]
    rest = perm[full:]
    return None if rest.numel() == 0 else (x[rest], row[rest], y[rest], w[rest])


def _minibatches(
    source: FitSource, units: Sequence[int], scaling: _Scaling, generator: torch.Generator, settings: FitSettings,
    shuffle_rows: int,
) -> Iterator[Batch]:  # fmt: skip
    """One stream's minibatches of an epoch: buffers of at most ``shuffle_rows`` rows, shuffled, cut in order."""
    width = len(source.layers)
    xs: list[list[torch.Tensor]] = [[] for _ in range(width)]
    ys: list[list[torch.Tensor]] = [[] for _ in range(width)]
    rows, carry = 0, None
    for chunk in source.chunks(units):
        n = int(chunk.xs[0].shape[0]) * width
        if rows and rows + n > shuffle_rows:
            carry = yield from _emit(scaling, (xs, ys), carry, generator, settings.batch_size, final=False)
            xs, ys, rows = [[] for _ in range(width)], [[] for _ in range(width)], 0
        cx, cy = scaling.rows(chunk)
        for i in range(width):
            xs[i].append(cx[i])
            ys[i].append(cy[i])
        rows += n
    if rows or carry is not None:
        if not rows:
            xs = [[torch.empty(0, int(scaling.mean.shape[1]))] for _ in range(width)]
            ys = [[torch.empty(0, dtype=torch.bool)] for _ in range(width)]
        yield from _emit(scaling, (xs, ys), carry, generator, settings.batch_size, final=True)


def _all_reduce_grads(net: ExitNet) -> None:
    """Sum every parameter's gradient over the ranks (zeros where a rank had no rows), in one flat buffer."""
    params = list(net.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = _all_reduce(torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]))
    offset = 0
    for p in params:
        assert p.grad is not None
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


@dataclass
class _Plan:
    """Which units each stream reads this epoch, how many rows it has, and which streams are this rank's."""

    units: dict[int, list[int]]
    rows: dict[int, int]
    mine: list[int]

    def step_rows(self, batch_size: int) -> list[int]:
        """Rows of each global step: the sum over the streams of their ``k``-th minibatch's rows."""
        steps = max((math.ceil(r / batch_size) for r in self.rows.values()), default=0)
        return [sum(min(batch_size, max(0, r - k * batch_size)) for r in self.rows.values()) for k in range(steps)]


def _plan(
    source: FitSource, train: Sequence[int], epoch: int, streams: int, tokens: list[dict[int, int]], rank: int
) -> _Plan:
    width = len(source.layers)
    if source.distributed:
        counts = {u: n for part in tokens for u, n in part.items()}
        order = source.epoch_units(train, epoch)
        units = {s: order[s::streams] for s in range(streams)}
        rows = {s: sum(counts[u] for u in units[s]) * width for s in range(streams)}
        world = len(tokens)
        return _Plan(units, rows, [s for s in range(streams) if s % world == rank])
    rows = {r: sum(part.values()) * width for r, part in enumerate(tokens)}
    return _Plan({rank: source.epoch_units(train, epoch)}, rows, [rank])


def _epoch(
    net: ExitNet, optimizer: torch.optim.Optimizer, source: FitSource, plan: _Plan, scaling: _Scaling,
    generators: dict[int, torch.Generator], settings: FitSettings, shuffle_rows: int, world: int,
) -> None:  # fmt: skip
    """One pass: global step ``k`` takes minibatch ``k`` of every stream (none where a stream ran dry)."""
    streams = {
        s: _minibatches(source, plan.units[s], scaling, generators[s], settings, shuffle_rows) for s in plan.mine
    }
    for total in plan.step_rows(settings.batch_size):
        parts = [b for b in (next(streams[s], None) for s in plan.mine) if b is not None]
        optimizer.zero_grad(set_to_none=True)
        if parts:
            x, row, y, w = (torch.cat(t) if len(parts) > 1 else t[0] for t in zip(*parts))
            batch_loss(net, x, row, y, w, total).backward()
        if world > 1:
            _all_reduce_grads(net)
        optimizer.step()


def _check_streams(source: FitSource, streams: int | None, world: int) -> int:
    streams = world if streams is None else int(streams)
    if streams < 1 or streams % world:
        raise ValueError(f"streams must be a positive multiple of the world size {world}, got {streams}")
    if not source.distributed and streams != world:
        raise ValueError(
            "this source holds this process's own batches: one stream per rank (streams=None); "
            "a ShardDataset can be read by any number of streams"
        )
    return streams


def fit_exit_net_stream(
    source: FitSource,
    *,
    settings: FitSettings,
    streams: int | None = None,
    shuffle_rows: int = DEFAULT_SHUFFLE_ROWS,
    on_epoch: Callable[[int, float], None] | None = None,
    progress: bool = False,
) -> FittedState:
    """Train an :class:`~deltaexit.measures.nets.ExitNet` from a :class:`FitSource` (see the module docstring).

    Args:
        source: The data.
        settings: How to train (``batch_size`` is per stream: a global step has ``streams * batch_size`` rows).
        streams: Parallel read streams (None: the ``torch.distributed`` world size, 1 without a process group);
            a multiple of the world size. The fit depends on the data, the settings and ``streams`` only, not on
            how many processes run it.
        shuffle_rows: Rows per shuffle buffer (memory: ``shuffle_rows * n_features_in * 4`` bytes, plus one chunk).
        on_epoch: Called with ``(epoch, held-out loss)`` after every epoch.
        progress: A tqdm bar over the epochs (on rank 0), with the held-out loss.

    Returns:
        The :class:`~deltaexit.measures.fitted.FittedState` (the same on every rank).
    """
    from tqdm.auto import tqdm

    if shuffle_rows < 1:
        raise ValueError(f"shuffle_rows must be >= 1, got {shuffle_rows}")
    rank, world = rank_and_world()
    streams = _check_streams(source, streams, world)
    train, val = source.split(settings.val_fraction)
    scaling, stats, tokens = _scaling(source, train, settings, rank, world)
    net, generator = new_net(stats.width, len(source.layers), settings)
    optimizer = new_optimizer(net, settings)
    generators = {s: generator if s == 0 else torch.Generator().manual_seed(settings.seed + 7_919 * s) for s in
                  range(streams)}  # fmt: skip
    val_mine = list(val[rank::world]) if source.distributed else list(val)
    stopping = EarlyStopping(net, _held_out_loss(net, source, val_mine, scaling, world), settings.patience)
    bar = tqdm(total=settings.max_epochs, desc="fit (streamed)", unit="epoch", disable=not progress or rank != 0)
    for epoch in range(1, settings.max_epochs + 1):
        net.train()
        plan = _plan(source, train, epoch, streams, tokens, rank)
        _epoch(net, optimizer, source, plan, scaling, generators, settings, shuffle_rows, world)
        net.eval()
        current = _held_out_loss(net, source, val_mine, scaling, world)
        if on_epoch is not None:
            on_epoch(epoch, current)
        bar.update(1)
        bar.set_postfix(held_out=f"{current:.4f}")
        if stopping.update(epoch, current):
            break
    bar.close()
    net, history, best_epoch = stopping.result()
    return FittedState(
        layers=source.layers, hidden_size=source.hidden_size, n_features_in=stats.width,
        mean=scaling.mean, std=scaling.std, net=net, positive_rate=stats.rates(), history=history,
        best_epoch=best_epoch,
    )  # fmt: skip
