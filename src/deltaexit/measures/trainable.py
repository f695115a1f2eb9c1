"""The base of trainable exit predictors: parameters, fitting, scoring, save/load.

Each predictor reads the state *after* block ``l`` (``h_out`` of block ``l``, the delta of
block ``l``, or lens features) and predicts whether exiting there is safe: label ``next`` (the
lens's top-1 does not change at block ``l+1``) or ``final`` (top-1 is already the final one).
The score is the classifier's logit (log-odds of "safe to exit", higher = safer).

scikit-learn conventions: every constructor parameter is an explicit keyword argument
(:meth:`TrainableMeasure.get_params` / :meth:`~TrainableMeasure.set_params` read the
``__init__`` signature); ``fit(...) -> self``; the fitted attributes end in ``_`` and are
set in one place from one :class:`~deltaexit.measures.fitted.FittedState`. Training itself is
:func:`deltaexit.measures.fit.fit_exit_net`; the registered measures live in
``linear.py``, ``delta_mlp.py``, ``hdelta_mlp.py`` and ``lens_mlp.py``.

Example:
    >>> import tempfile, torch
    >>> from deltaexit.measures import LayerState, get_measure
    >>> g = torch.Generator().manual_seed(0)
    >>> h, d = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    >>> state = LayerState(layer=0, h_in=h, h_out=h + d)
    >>> m = get_measure("delta-mlp", hidden_units=8, max_epochs=2).fit([state], [d.norm(dim=-1) < 2])
    >>> m.inputs, m.layers_, m.get_params()["hidden_units"]
    (('delta',), (0,), 8)
    >>> m2 = load_measure(m.save(tempfile.mkdtemp()), hidden_size=4)
    >>> torch.equal(m2.score(state), m.score(state))
    True
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from deltaexit.measures.base import ConfidenceMeasure, LayerState, get_measure
from deltaexit.measures.fit import FitSettings, fit_exit_net
from deltaexit.measures.fitted import FittedState, MeasureFileError, fitted_state, read_saved, save_fitted
from deltaexit.measures.stream_fit import DEFAULT_SHUFFLE_ROWS, BatchSource, fit_exit_net_stream, rank_and_world
from deltaexit.saturation import LABELS
from deltaexit.structure import find_structure

__all__ = ["FEATURE_SETS", "UNSAVED_PARAMS", "TrainableMeasure", "load_measure"]

#: What each ``features`` choice reads: the measure's :attr:`~TrainableMeasure.inputs`.
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "delta": ("delta",),
    "h": ("h_out",),
    "h+delta": ("h_out", "delta"),
    "lens": ("h_in", "h_out"),
}
#: Parameters that say how a fit reports, not what it learns: not written by ``save``.
UNSAVED_PARAMS: tuple[str, ...] = ("verbose",)
_FITTED = ("layers", "hidden_size", "n_features_in", "mean", "std", "net", "positive_rate", "history", "best_epoch")


class TrainableMeasure(ConfidenceMeasure):
    """Base of exit predictors trained on collected states; see the module docstring.

    Args:
        features: ``"delta"``, ``"h"`` (``h_out`` of block ``l``) or ``"h+delta"``; ``"lens"`` for ``lens-mlp``.
        hidden_units: Hidden width of the MLP (0: logistic classifier).
        per_layer: One predictor per layer instead of one shared predictor.
        label: ``"next"``, ``"final"`` or ``"kept"``: recorded with the fit (the caller supplies labels).
        max_epochs: Upper bound on passes over the training tokens.
        batch_size: Tokens per gradient step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        val_fraction: Tail share of each layer's tokens held out for early stopping.
        patience: Epochs without held-out improvement before stopping.
        seed: Seed of the initialisation and the batch order.
        class_weight: ``"balanced"`` weighs each layer's positives and negatives equally, so the score
            ranks tokens within a layer; ``None`` keeps the natural label rates, so the score is the
            log-odds of the posterior and one threshold means the same risk at every layer.
        verbose: Print the held-out loss per epoch.

    Fitted attributes (set by :meth:`fit` or :func:`load_measure`, from one
    :class:`~deltaexit.measures.fitted.FittedState`):
        layers_: Block indices (0-based) the predictor was fitted on.
        hidden_size_: Hidden size of the model it was fitted on.
        n_features_in_: Input width.
        mean_, std_: ``[len(layers_), n_features_in_]`` standardisation per layer.
        net_: The trained :class:`~deltaexit.measures.nets.ExitNet`.
        positive_rate_: Share of positive labels per layer in the training tokens.
        history_: Held-out loss per epoch; ``best_epoch_``: the epoch kept.
    """

    requires_fit: ClassVar[bool] = True

    def __init__(
        self,
        *,
        features: str = "delta",
        hidden_units: int = 64,
        per_layer: bool = False,
        label: str = "next",
        max_epochs: int = 30,
        batch_size: int = 1024,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        val_fraction: float = 0.15,
        patience: int = 4,
        seed: int = 0,
        class_weight: str | None = "balanced",
        verbose: bool = False,
    ) -> None:
        self._assign_params(
            features=features, hidden_units=hidden_units, per_layer=per_layer, label=label, max_epochs=max_epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, val_fraction=val_fraction, patience=patience,
            seed=seed, class_weight=class_weight, verbose=verbose,
        )  # fmt: skip

    # -- parameters (scikit-learn style) -----------------------------------------------------------
    @classmethod
    def _signature(cls) -> dict[str, inspect.Parameter]:
        params = dict(inspect.signature(cls.__init__).parameters)
        params.pop("self", None)
        for p in params.values():
            if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise TypeError(f"{cls.__name__}.__init__ must list its parameters explicitly, not *{p.name}")
        return params

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters (names from the ``__init__`` signature) and their values."""
        return {name: getattr(self, name) for name in self._signature()}

    def set_params(self, **params: Any) -> TrainableMeasure:
        """Change constructor parameters (checked as in ``__init__``); returns self.

        Raises:
            ValueError: An unknown parameter name or a bad value.
        """
        unknown = set(params) - set(self._signature())
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameter(s) {sorted(unknown)}; see get_params()")
        self._assign_params(**{**self.get_params(), **params})
        return self

    def _assign_params(self, **params: Any) -> None:
        """Check every parameter, then store them (normalised) under their own names."""
        features, class_weight = params["features"], params["class_weight"]
        if features not in FEATURE_SETS:
            raise ValueError(f"features must be one of {list(FEATURE_SETS)}, got {features!r}")
        if (features == "lens") != self.needs_lens:
            raise ValueError(
                f"{self.name}: features={features!r} is not available here; lens features are the "
                "'lens-mlp' measure's (it reads the lens), the others take 'delta', 'h' or 'h+delta'"
            )
        if int(params["hidden_units"]) < 0:
            raise ValueError(f"hidden_units must be >= 0, got {params['hidden_units']}")
        if params["label"] not in LABELS:
            raise ValueError(f"label must be one of {list(LABELS)}, got {params['label']!r}")
        if class_weight not in ("balanced", None):
            raise ValueError(f"class_weight must be 'balanced' or None, got {class_weight!r}")
        if not 0.0 < params["val_fraction"] < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {params['val_fraction']}")
        self.features: str = features
        self.hidden_units = int(params["hidden_units"])
        self.per_layer = bool(params["per_layer"])
        self.label: str = params["label"]
        self.max_epochs = int(params["max_epochs"])
        self.batch_size = int(params["batch_size"])
        self.lr = float(params["lr"])
        self.weight_decay = float(params["weight_decay"])
        self.val_fraction = float(params["val_fraction"])
        self.patience = int(params["patience"])
        self.seed = int(params["seed"])
        self.class_weight: str | None = class_weight
        self.verbose = bool(params["verbose"])

    @property
    def inputs(self) -> tuple[str, ...]:
        """What the score reads, from ``features`` (:data:`FEATURE_SETS`): e.g. ``("h_out",)`` for ``linear(h)``."""
        return FEATURE_SETS[self.features]

    @property
    def display_name(self) -> str:
        """Name with the non-default choices, e.g. ``linear(h)`` or ``delta-mlp/per-layer``."""
        name = self.name
        if self.features != self._signature()["features"].default:
            name += f"({self.features})"
        if self.per_layer:
            name += "/per-layer"
        return name

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :func:`load_measure`) has run."""
        return hasattr(self, "net_")

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "unfitted"
        return f"{type(self).__name__}({self.display_name!r}, {state})"

    # -- features ----------------------------------------------------------------------------------
    def raw_features(self, state: LayerState) -> torch.Tensor:
        """The net's input before standardisation, ``[..., n_features_in_]`` float32 (``inputs`` concatenated)."""
        parts = [state.delta if name == "delta" else state.h_out for name in self.inputs]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return x.float()

    def state_hidden_size(self, state: LayerState) -> int:
        """The hidden size of ``state``, read off what this measure reads (a delta-only state has no ``h_out``)."""
        first = self.inputs[0]
        tensor = state.delta if first == "delta" else (state.h_in if first == "h_in" else state.h_out)
        if tensor is None:
            raise ValueError(f"{self.display_name} reads {first}, which the state does not hold")
        return int(tensor.shape[-1])

    # -- training ----------------------------------------------------------------------------------
    def fit_features(self, states: Sequence[LayerState]) -> list[torch.Tensor]:
        """Raw features ``[tokens, n_features_in]`` (float32, CPU, detached) of the same tokens at each state."""
        out = []
        for state in states:
            x = self.raw_features(state).detach().cpu()
            out.append(x.reshape(-1, x.shape[-1]))
        return out

    def _layer_data(
        self, state: LayerState, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.as_tensor(labels).reshape(-1).cpu()
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"layer {state.layer}: {x.shape[0]} tokens but {y.shape[0]} labels")
        if x.shape[0] < 4:
            raise ValueError(f"layer {state.layer}: need at least 4 tokens to fit, got {x.shape[0]}")
        if not torch.isfinite(x).all():
            raise ValueError(f"layer {state.layer}: the states contain NaN or inf")
        return x, y.to(torch.bool)

    def _settings(self) -> FitSettings:
        return FitSettings(
            hidden_units=self.hidden_units, per_layer=self.per_layer, max_epochs=self.max_epochs,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            val_fraction=self.val_fraction, patience=self.patience, seed=self.seed, class_weight=self.class_weight,
        )  # fmt: skip

    def fit(
        self,
        X: Any,
        y: Sequence[torch.Tensor] | None = None,
        *,
        lens: Any = None,
        model: torch.nn.Module | None = None,
        streams: int | None = None,
        shuffle_rows: int = DEFAULT_SHUFFLE_ROWS,
        progress: bool = False,
    ) -> TrainableMeasure:
        """Train in memory on states and labels, or out of core on a dataset (scikit-learn's ``fit(X, y)``).

        Runs on the CPU at torch's current thread count; for these tiny nets one thread is fastest:
        wrap the call in ``deltaexit.threads.torch_threads(1)``.

        In memory, ``fit(states, labels)``: one :class:`LayerState` per decision layer and its labels; the tail
        ``val_fraction`` of each layer's tokens is held out for early stopping.

        Out of core, ``fit(dataset)``: a :class:`~deltaexit.streaming.ShardDataset` (its features and this
        measure's ``label`` are read shard by shard) or any re-iterable of ``(states, labels)`` batches. Whole
        shards (batches) are held out: the last ``max(1, round(val_fraction * shards))`` in corpus order. The
        class balance and the standardisation come from a first streaming pass; rows are shuffled in buffers of
        ``shuffle_rows``; see :mod:`deltaexit.measures.stream_fit`. With one stream and a buffer holding every
        training row the minibatches are the in-memory fit's, so on the same tokens (and the same held-out
        tokens) both give the same weights. Under ``torch.distributed`` (``torchrun``) every rank calls
        ``fit(dataset)`` and reads only its own shards; gradients are summed over the ranks, every rank ends with
        the same weights, and :meth:`save` writes on rank 0 only.

        Args:
            X: The states (with ``y``), or the dataset (without).
            y: ``[tokens]`` bool per state: True = safe to exit (label ``next``, ``final`` or ``kept``).
            lens: The model's :class:`~deltaexit.lens.Lens`, for a dataset and a measure that reads the lens.
            model: For a dataset: the model it must have been collected from (checked against the manifest's
                fingerprint and hidden size before training).
            streams: For a dataset: parallel read streams (default: the world size); a 2-rank fit equals a
                one-process fit with ``streams=2``.
            shuffle_rows: For a dataset: rows (token-layer pairs) per shuffle buffer.
            progress: For a dataset: a tqdm bar over the epochs (rank 0).

        Returns:
            self
        """
        if y is None:
            return self._fit_stream(
                X, lens=lens, model=model, streams=streams, shuffle_rows=shuffle_rows, progress=progress
            )
        if callable(getattr(X, "fit_source", None)):
            raise TypeError("a dataset carries its own labels (the measure's label): call fit(dataset) without y")
        states, labels = list(X), list(y)
        if not states:
            raise ValueError("fit needs at least one LayerState")
        if len(states) != len(labels):
            raise ValueError(f"got {len(states)} states but {len(labels)} label tensors")
        layers = [int(s.layer) for s in states]
        if len(set(layers)) != len(layers):
            raise ValueError(f"one state per layer, please; got layers {layers}")
        xs = self.fit_features(states)
        data = [self._layer_data(state, x, t) for state, x, t in zip(states, xs, labels)]
        fitted = fit_exit_net(
            [x for x, _ in data], [t for _, t in data], layers, hidden_size=self.state_hidden_size(states[0]),
            settings=self._settings(), on_epoch=self._report if self.verbose else None,
        )  # fmt: skip
        self._set_fitted(fitted)
        return self

    def _fit_stream(
        self, dataset: Any, *, lens: Any, model: torch.nn.Module | None, streams: int | None, shuffle_rows: int,
        progress: bool,
    ) -> TrainableMeasure:  # fmt: skip
        if isinstance(dataset, (list, tuple)) and dataset and isinstance(dataset[0], LayerState):
            raise TypeError("fit(states) needs the labels too: fit(states, labels)")
        make_source = getattr(dataset, "fit_source", None)
        if callable(make_source):
            source = make_source(self, lens=lens, model=model)
        else:
            if model is not None:
                raise TypeError("model= checks a ShardDataset's collection; these batches carry no fingerprint")
            source = BatchSource(dataset, self.fit_features, self.state_hidden_size)
        fitted = fit_exit_net_stream(
            source, settings=self._settings(), streams=streams, shuffle_rows=shuffle_rows,
            on_epoch=self._report if self.verbose and rank_and_world()[0] == 0 else None, progress=progress,
        )  # fmt: skip
        self._set_fitted(fitted)
        return self

    def _report(self, epoch: int, loss: float) -> None:
        print(f"{self.display_name} epoch {epoch}: held-out loss {loss:.4f}")

    def _set_fitted(self, state: FittedState) -> None:
        """The one place the fitted attributes are set."""
        self.layers_ = state.layers
        self.hidden_size_ = state.hidden_size
        self.n_features_in_ = state.n_features_in
        self.mean_ = state.mean
        self.std_ = state.std
        self.net_ = state.net
        self.positive_rate_ = state.positive_rate
        self.history_ = state.history
        self.best_epoch_ = state.best_epoch

    def fitted_state(self) -> FittedState:
        """The fitted attributes as one :class:`~deltaexit.measures.fitted.FittedState`.

        Raises:
            RuntimeError: Not fitted.
        """
        if not self.is_fitted:
            raise RuntimeError(f"{self.display_name} is not fitted; call .fit(states, labels) first")
        return FittedState(**{name: getattr(self, name + "_") for name in _FITTED})

    # -- scoring -----------------------------------------------------------------------------------
    def _row(self, layer: int) -> int:
        try:
            return self.layers_.index(int(layer))
        except ValueError:
            raise ValueError(
                f"{self.display_name} was fitted on layers {list(self.layers_)}, not on layer {layer}"
            ) from None

    def score(self, state: LayerState) -> torch.Tensor:
        if not self.is_fitted:
            raise RuntimeError(f"{self.display_name} is not fitted; call .fit(states, labels) first")
        hidden = self.state_hidden_size(state)
        if hidden != self.hidden_size_:
            raise ValueError(
                f"{self.display_name} was fitted on hidden size {self.hidden_size_}, "
                f"but the state has hidden size {hidden}"
            )
        row = self._row(state.layer)
        x = self.raw_features(state)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).to(self.mean_.device)
        x = (x - self.mean_[row]) / self.std_[row]
        rows = torch.full((x.shape[0],), row, dtype=torch.long)
        with torch.no_grad():
            out = self.net_(x, rows)
        return out.reshape(lead)

    def flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        d_in = hidden_size * len(self.inputs)
        flops = 2.0 * d_in  # standardise
        if "delta" in self.inputs:
            flops += hidden_size  # h_out - h_in
        if self.hidden_units == 0:
            return flops + 2.0 * d_in + 2.0
        h = self.hidden_units
        return flops + 2.0 * d_in * h + 2.0 * h + 8.0 * h + 2.0 * h + 1.0  # matmul, bias(+emb), gelu, out

    # -- save --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``measure.safetensors`` and ``measure.json`` into directory ``path`` (atomically).

        Under ``torch.distributed`` only rank 0 writes (a data-parallel fit leaves the same weights on every
        rank); every rank waits for it at a barrier.

        The config holds :meth:`get_params` without :data:`UNSAVED_PARAMS`; see
        :mod:`deltaexit.measures.fitted` for the format.

        Returns:
            The directory.
        """
        if not self.is_fitted:
            raise RuntimeError(f"{self.display_name} is not fitted; nothing to save")
        params = {k: v for k, v in self.get_params().items() if k not in UNSAVED_PARAMS}
        rank, world = rank_and_world()
        if world == 1:
            return save_fitted(path, measure=self.name, params=params, state=self.fitted_state())
        if rank == 0:
            save_fitted(path, measure=self.name, params=params, state=self.fitted_state())
        torch.distributed.barrier()  # the other ranks return once rank 0's files are in place
        return Path(path)


def load_measure(
    path: str | os.PathLike[str], *, hidden_size: int | None = None, model: torch.nn.Module | None = None
) -> TrainableMeasure:
    """Load a measure saved with :meth:`TrainableMeasure.save`.

    Args:
        path: The directory written by ``save``.
        hidden_size: Expected hidden size; a mismatch raises.
        model: Alternatively a model whose hidden size (its structure's) must match.

    Raises:
        MeasureFileError: Missing or corrupt files, an unknown format version, or a hidden-size mismatch.
    """
    if model is not None:
        hidden_size = find_structure(model, validate=False).hidden_size
    saved = read_saved(path, hidden_size=hidden_size)
    measure = get_measure(saved.measure, **saved.params)
    if not isinstance(measure, TrainableMeasure):
        raise MeasureFileError(f"{saved.measure!r} is not a trainable measure")
    measure._set_fitted(fitted_state(saved, hidden_units=measure.hidden_units, per_layer=measure.per_layer))
    return measure
