"""Trainable exit predictors: logistic classifier and small MLPs on ``delta``, ``h`` or ``[h, delta]``.

Each predictor reads the state *after* block ``l`` (``h_out`` of block ``l``, the delta of
block ``l``) and predicts whether exiting there is safe: label ``next`` (the lens's top-1
does not change at block ``l+1``) or ``final`` (top-1 is already the final one). The score
is the classifier's logit (log-odds of "safe to exit", higher = safer).

Training follows scikit-learn conventions: ``fit(...) -> self``, fitted attributes end in
``_``; inputs are standardised per layer (``mean_``, ``std_``); the loss is class-balanced
per layer; the tail of each layer's tokens is held out for early stopping; a fixed ``seed``
makes fits bit-for-bit repeatable on one machine.

A predictor is either **shared** across layers (the layer index enters through a learned
layer embedding added to the first hidden layer, or a per-layer bias for ``linear``) or one
predictor **per layer** (``per_layer=True``).

Example:
    >>> from deltaexit.measures import get_measure
    >>> m = get_measure("delta-mlp", hidden_units=32, max_epochs=5)   # doctest: +SKIP
    >>> m.fit(states, labels)                                         # doctest: +SKIP
    >>> m.save("exit-predictor")                                      # doctest: +SKIP
    >>> m2 = load_measure("exit-predictor", hidden_size=model.config.hidden_size)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from deltaexit.io import atomic_path, atomic_write_json
from deltaexit.measures.base import ConfidenceMeasure, LayerState, get_measure, register_measure
from deltaexit.saturation import LABELS

__all__ = [
    "FORMAT_VERSION",
    "LENS_FEATURE_NAMES",
    "DeltaMLP",
    "ExitNet",
    "HDeltaMLP",
    "LensMLP",
    "LinearExit",
    "MeasureFileError",
    "TrainableMeasure",
    "lens_features",
    "load_measure",
]

#: Version of the on-disk format written by :meth:`TrainableMeasure.save`.
FORMAT_VERSION = 1
CONFIG_NAME = "measure.json"
WEIGHTS_NAME = "measure.safetensors"
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "delta": ("delta",),
    "h": ("h_out",),
    "h+delta": ("h_out", "delta"),
    "lens": ("h_in", "h_out"),
}
_LENS_CHUNK = 4096  # tokens per lens call when lens features are computed for many tokens at once
#: Names of the columns :func:`lens_features` returns (``k = 4``).
LENS_FEATURE_NAMES: tuple[str, ...] = (
    "p1", "p2", "p3", "p4", "p1_minus_p2", "entropy", "log_p1",
    "prev_top1_same", "prev_p_of_top1", "p_of_prev_top1", "kl_to_prev",
    "delta_norm", "h_out_norm", "cos_h_in_h_out",
)  # fmt: skip


def lens_features(state: LayerState, k: int = 4) -> torch.Tensor:
    """Summary features of the logit lens after block ``l`` and of its change from block ``l - 1``.

    Columns (:data:`LENS_FEATURE_NAMES` for ``k = 4``): the top-``k`` lens probabilities, top-1 minus
    top-2, entropy, log-probability of the top-1; whether the previous layer's lens (of ``h_in``) had
    the same top-1, the previous layer's probability of the current top-1, the current probability
    of the previous top-1, ``KL(current || previous)``; ``‖delta‖``, ``‖h_out‖`` and
    ``cos(h_in, h_out)``. These are what CALM's softmax response and "Looking Beyond the Top-1"
    read off the lens, plus how the prediction moved in the last block.

    Returns:
        ``[..., 2k + 6]`` float32.
    """
    if state.h_in is None:
        raise ValueError("lens features need h_in (the state before the block)")
    logp = torch.log_softmax(state.logits.float(), dim=-1)
    if logp.shape[-1] < k:
        raise ValueError(f"lens features need a vocabulary of at least {k} tokens, got {logp.shape[-1]}")
    probs = logp.exp()
    top = probs.topk(k, dim=-1)
    top1 = top.indices[..., :1]
    logp_prev = torch.log_softmax(state.logits_in.float(), dim=-1)
    prev_top1 = logp_prev.argmax(dim=-1, keepdim=True)
    h_in, h_out = state.h_in.float(), state.h_out.float()
    delta = h_out - h_in
    return torch.cat(
        [
            top.values,
            top.values[..., :1] - top.values[..., 1:2],
            -(probs * logp).sum(dim=-1, keepdim=True),
            logp.gather(-1, top1),
            (prev_top1 == top1).float(),
            logp_prev.gather(-1, top1).exp(),
            probs.gather(-1, prev_top1),
            (probs * (logp - logp_prev)).sum(dim=-1, keepdim=True),
            delta.norm(dim=-1, keepdim=True),
            h_out.norm(dim=-1, keepdim=True),
            torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)[..., None],
        ],
        dim=-1,
    )


class MeasureFileError(ValueError):
    """A saved measure is missing, corrupt, of another format version, or does not fit the model."""


class ExitNet(nn.Module):
    """Logit of "safe to exit" from standardised features, shared or one net per layer.

    Args:
        in_features: Input width.
        hidden_units: Width of the hidden layer; 0 gives a logistic (linear) classifier.
        num_layers: Number of decision layers the net serves.
        per_layer: One set of weights per layer instead of one shared set.
        generator: Seeded generator for the initialisation.
    """

    def __init__(
        self,
        in_features: int,
        hidden_units: int,
        num_layers: int,
        per_layer: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.hidden_units = hidden_units
        self.num_layers = num_layers
        self.per_layer = per_layer
        groups = num_layers if per_layer else 1
        width = hidden_units if hidden_units > 0 else 1

        def init(*shape: int, fan_in: int) -> nn.Parameter:
            bound = 1.0 / math.sqrt(max(1, fan_in))
            return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)

        self.w1 = init(groups, in_features, width, fan_in=in_features)
        self.b1 = nn.Parameter(torch.zeros(groups, width))
        # Shared nets see the layer through a learned embedding (a per-layer bias for linear).
        self.layer_embedding = nn.Parameter(torch.zeros(num_layers, width))
        if hidden_units > 0:
            self.w2 = init(groups, hidden_units, fan_in=hidden_units)
            self.b2 = nn.Parameter(torch.zeros(groups))

    def forward(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Logits ``[n]`` for features ``x [n, in]`` at layer rows ``row [n]`` (0..num_layers-1)."""
        if self.per_layer:
            out = x.new_empty(x.shape[0])
            for g in row.unique().tolist():
                mask = row == g
                out[mask] = self._head(x[mask], g, None)
            return out
        return self._head(x, 0, row)

    def _head(self, x: torch.Tensor, g: int, row: torch.Tensor | None) -> torch.Tensor:
        z = x @ self.w1[g] + self.b1[g]
        if row is not None:
            z = z + self.layer_embedding[row]
        if self.hidden_units == 0:
            return z[:, 0]
        return torch.nn.functional.gelu(z) @ self.w2[g] + self.b2[g]


class TrainableMeasure(ConfidenceMeasure):
    """Base of exit predictors trained on collected states; see the module docstring.

    Args:
        features: ``"delta"``, ``"h"`` (``h_out`` of block ``l``) or ``"h+delta"``.
        hidden_units: Hidden width of the MLP (0: logistic classifier).
        per_layer: One predictor per layer instead of one shared predictor.
        label: ``"next"`` or ``"final"``: recorded with the fit (the caller supplies labels).
        max_epochs: Upper bound on passes over the training tokens.
        batch_size: Tokens per gradient step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        val_fraction: Tail share of each layer's tokens held out for early stopping.
        patience: Epochs without held-out improvement before stopping.
        seed: Seed of the initialisation and the batch order.
        class_weight: ``"balanced"`` (default) weighs each layer's positives and negatives equally, so
            the score ranks tokens within a layer; ``None`` keeps the natural label rates, so the score
            is the log-odds of the posterior and one threshold means the same risk at every layer.
        verbose: Print the held-out loss per epoch.

    Fitted attributes:
        layers_: Block indices (0-based) the predictor was fitted on.
        hidden_size_: Hidden size of the model it was fitted on.
        n_features_in_: Input width.
        mean_, std_: ``[len(layers_), n_features_in_]`` standardisation per layer.
        net_: The trained :class:`ExitNet`.
        positive_rate_: Share of positive labels per layer in the training tokens.
        history_: Held-out loss per epoch; ``best_epoch_``: the epoch kept.
    """

    requires_fit: ClassVar[bool] = True
    default_features: ClassVar[str] = "delta"
    default_hidden_units: ClassVar[int] = 64

    def __init__(
        self,
        *,
        features: str | None = None,
        hidden_units: int | None = None,
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
        features = self.default_features if features is None else features
        if features not in FEATURE_SETS:
            raise ValueError(f"features must be one of {list(FEATURE_SETS)}, got {features!r}")
        if (features == "lens") != (self.default_features == "lens"):
            raise ValueError(
                f"{self.name}: features={features!r} is not available here; lens features are the "
                "'lens-mlp' measure's (it reads the lens), the others take 'delta', 'h' or 'h+delta'"
            )
        hidden_units = self.default_hidden_units if hidden_units is None else int(hidden_units)
        if hidden_units < 0:
            raise ValueError(f"hidden_units must be >= 0, got {hidden_units}")
        if label not in LABELS:
            raise ValueError(f"label must be one of {list(LABELS)}, got {label!r}")
        if class_weight not in ("balanced", None):
            raise ValueError(f"class_weight must be 'balanced' or None, got {class_weight!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        self.features = features
        self.hidden_units = hidden_units
        self.per_layer = bool(per_layer)
        self.label = label
        self.max_epochs = int(max_epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.val_fraction = float(val_fraction)
        self.patience = int(patience)
        self.seed = int(seed)
        self.class_weight = class_weight
        self.verbose = bool(verbose)
        self.inputs = FEATURE_SETS[features]  # type: ignore[misc]

    # -- parameters (scikit-learn style) -----------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-friendly)."""
        return {
            "features": self.features,
            "hidden_units": self.hidden_units,
            "per_layer": self.per_layer,
            "label": self.label,
            "max_epochs": self.max_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "val_fraction": self.val_fraction,
            "patience": self.patience,
            "seed": self.seed,
            "class_weight": self.class_weight,
        }

    @property
    def display_name(self) -> str:
        """Name with the non-default choices, e.g. ``linear(h)`` or ``delta-mlp/per-layer``."""
        name = self.name
        if self.features != self.default_features:
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
    def _raw_features(self, state: LayerState) -> torch.Tensor:
        parts = []
        for name in self.inputs:
            if name == "delta":
                parts.append(state.delta)
            else:
                parts.append(state.h_out)
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return x.float()

    # -- training ----------------------------------------------------------------------------------
    def fit(self, states: Sequence[LayerState], labels: Sequence[torch.Tensor]) -> TrainableMeasure:
        """Train on one :class:`LayerState` per decision layer and its boolean labels.

        Args:
            states: States after block ``l`` (``[tokens, hidden]`` each), one per layer to serve.
            labels: ``[tokens]`` bool per state: True = safe to exit (label ``next`` or ``final``).

        Returns:
            self

        The tiny nets train on the CPU with one intra-op thread (restored afterwards): for
        matrices this small, thread hand-offs cost more than the arithmetic.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._fit(states, labels)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, states: Sequence[LayerState], labels: Sequence[torch.Tensor]) -> TrainableMeasure:
        states, labels = list(states), list(labels)
        if not states:
            raise ValueError("fit needs at least one LayerState")
        if len(states) != len(labels):
            raise ValueError(f"got {len(states)} states but {len(labels)} label tensors")
        layers = [int(s.layer) for s in states]
        if len(set(layers)) != len(layers):
            raise ValueError(f"one state per layer, please; got layers {layers}")
        xs, ys = [], []
        for state, y in zip(states, labels):
            x = self._raw_features(state).detach().cpu()
            x = x.reshape(-1, x.shape[-1])
            y = torch.as_tensor(y).reshape(-1).cpu()
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"layer {state.layer}: {x.shape[0]} tokens but {y.shape[0]} labels")
            if x.shape[0] < 4:
                raise ValueError(f"layer {state.layer}: need at least 4 tokens to fit, got {x.shape[0]}")
            if not torch.isfinite(x).all():
                raise ValueError(f"layer {state.layer}: the states contain NaN or inf")
            xs.append(x)
            ys.append(y.to(torch.bool))
        hidden = int(states[0].h_out.shape[-1])
        order = sorted(range(len(layers)), key=lambda i: layers[i])
        layers = [layers[i] for i in order]
        xs = [xs[i] for i in order]
        ys = [ys[i] for i in order]

        # Held-out tail of each layer's tokens for early stopping (tokens are in text order).
        train_x, train_y, train_r, val_x, val_y, val_r = [], [], [], [], [], []
        means, stds, rates = [], [], []
        for row, (x, y) in enumerate(zip(xs, ys)):
            n_val = max(1, round(self.val_fraction * x.shape[0]))
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
        tx, ty, tr = torch.cat(train_x), torch.cat(train_y), torch.cat(train_r)
        vx, vy, vr = torch.cat(val_x), torch.cat(val_y), torch.cat(val_r)

        # Class-balanced weights per layer: positives and negatives weigh half each. Without them
        # (class_weight=None) the logit estimates the posterior P(safe | state), comparable across layers.
        rate = torch.tensor(rates, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
        if self.class_weight == "balanced":
            w_pos, w_neg = 0.5 / rate, 0.5 / (1 - rate)
        else:
            w_pos, w_neg = torch.ones_like(rate), torch.ones_like(rate)

        def weights(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return torch.where(y, w_pos[r], w_neg[r])

        tw, vw = weights(ty, tr), weights(vy, vr)
        generator = torch.Generator().manual_seed(self.seed)
        net = ExitNet(tx.shape[1], self.hidden_units, len(layers), self.per_layer, generator)
        optimizer = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = nn.functional.binary_cross_entropy_with_logits

        def held_out_loss() -> float:
            with torch.no_grad():
                return float(loss_fn(net(vx, vr), vy.float(), weight=vw))

        best = held_out_loss()
        best_state = {k: v.clone() for k, v in net.state_dict().items()}
        best_epoch, bad, history = 0, 0, [best]
        for epoch in range(1, self.max_epochs + 1):
            perm = torch.randperm(tx.shape[0], generator=generator)
            net.train()
            for start in range(0, tx.shape[0], self.batch_size):
                idx = perm[start : start + self.batch_size]
                loss = loss_fn(net(tx[idx], tr[idx]), ty[idx].float(), weight=tw[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            net.eval()
            current = held_out_loss()
            history.append(current)
            if self.verbose:
                print(f"{self.display_name} epoch {epoch}: held-out loss {current:.4f}")
            if current < best - 1e-5:
                best, best_epoch, bad = current, epoch, 0
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
                if bad >= self.patience:
                    break
        net.load_state_dict(best_state)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)

        self.layers_ = tuple(layers)
        self.hidden_size_ = hidden
        self.n_features_in_ = int(tx.shape[1])
        self.mean_ = torch.stack(means)
        self.std_ = torch.stack(stds)
        self.positive_rate_ = tuple(rates)
        self.history_ = tuple(history)
        self.best_epoch_ = best_epoch
        self.net_ = net
        return self

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
        hidden = int(state.h_out.shape[-1])
        if hidden != self.hidden_size_:
            raise ValueError(
                f"{self.display_name} was fitted on hidden size {self.hidden_size_}, "
                f"but the state has hidden size {hidden}"
            )
        row = self._row(state.layer)
        x = self._raw_features(state)
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

    # -- save / load -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``measure.safetensors`` and ``measure.json`` into directory ``path`` (atomically).

        Returns:
            The directory.
        """
        from safetensors.torch import save_file

        if not self.is_fitted:
            raise RuntimeError(f"{self.display_name} is not fitted; nothing to save")
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.contiguous() for k, v in self.net_.state_dict().items()}
        tensors["mean"] = self.mean_.contiguous()
        tensors["std"] = self.std_.contiguous()
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp))
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        config = {
            "format": "deltaexit-measure",
            "format_version": FORMAT_VERSION,
            "measure": self.name,
            "params": self.get_params(),
            "fitted": {
                "layers": list(self.layers_),
                "hidden_size": self.hidden_size_,
                "n_features_in": self.n_features_in_,
                "positive_rate": list(self.positive_rate_),
                "best_epoch": self.best_epoch_,
                "history": list(self.history_),
            },
            "weights_sha256": digest,
        }
        atomic_write_json(directory / CONFIG_NAME, config)
        return directory


def load_measure(path: str | os.PathLike[str], *, hidden_size: int | None = None, model: Any = None):
    """Load a measure saved with :meth:`TrainableMeasure.save`.

    Args:
        path: The directory written by ``save``.
        hidden_size: Expected hidden size; a mismatch raises.
        model: Alternatively a model whose ``config.hidden_size`` (or text config's) must match.

    Raises:
        MeasureFileError: Missing or corrupt files, an unknown format version, or a hidden-size mismatch.

    Example:
        >>> m = load_measure("exit-predictor", model=model)   # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(path)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise MeasureFileError(
                f"{p} not found; a saved measure is a directory with {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (written by measure.save(path))"
            )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MeasureFileError(f"{config_path} is not valid JSON (corrupt or truncated): {exc}") from None
    if not isinstance(config, dict) or config.get("format") != "deltaexit-measure":
        raise MeasureFileError(f"{config_path} is not a deltaexit measure config")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise MeasureFileError(
            f"{config_path} has format version {version!r}; this deltaexit reads version {FORMAT_VERSION}"
        )
    raw = weights_path.read_bytes()
    if config.get("weights_sha256") and hashlib.sha256(raw).hexdigest() != config["weights_sha256"]:
        raise MeasureFileError(
            f"{weights_path} does not match the checksum in {config_path}: the file is corrupt or truncated"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MeasureFileError(f"{weights_path} is corrupt or truncated: {exc}") from None
    fitted = config["fitted"]
    saved_hidden = int(fitted["hidden_size"])
    if model is not None:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden_size = int(cfg.hidden_size)
    if hidden_size is not None and int(hidden_size) != saved_hidden:
        raise MeasureFileError(
            f"{directory} was fitted on a model of hidden size {saved_hidden}; this model has hidden size "
            f"{hidden_size}. Fit a new measure on this model's states."
        )
    measure = get_measure(config["measure"], **config["params"])
    if not isinstance(measure, TrainableMeasure):
        raise MeasureFileError(f"{config['measure']!r} is not a trainable measure")
    layers = [int(x) for x in fitted["layers"]]
    n_in = int(fitted["n_features_in"])
    net = ExitNet(n_in, measure.hidden_units, len(layers), measure.per_layer)
    state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MeasureFileError(f"{weights_path} does not fit its config: {exc}") from None
    if tensors["mean"].shape != (len(layers), n_in) or tensors["std"].shape != (len(layers), n_in):
        raise MeasureFileError(f"{weights_path}: standardisation tensors have the wrong shape")
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    measure.layers_ = tuple(layers)
    measure.hidden_size_ = saved_hidden
    measure.n_features_in_ = n_in
    measure.mean_ = tensors["mean"]
    measure.std_ = tensors["std"]
    measure.positive_rate_ = tuple(fitted["positive_rate"])
    measure.history_ = tuple(fitted["history"])
    measure.best_epoch_ = int(fitted["best_epoch"])
    measure.net_ = net
    return measure


@register_measure
class LinearExit(TrainableMeasure):
    """CALM's early-exit classifier: logistic regression on ``delta`` (default) or ``h``."""

    name: ClassVar[str] = "linear"
    default_hidden_units: ClassVar[int] = 0
    inputs: ClassVar[tuple[str, ...]] = ("delta",)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("hidden_units", 0)
        super().__init__(**kwargs)


@register_measure
class DeltaMLP(TrainableMeasure):
    """The thesis: a small MLP on block ``l``'s delta vector."""

    name: ClassVar[str] = "delta-mlp"
    inputs: ClassVar[tuple[str, ...]] = ("delta",)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("features", "delta")
        super().__init__(**kwargs)


@register_measure
class HDeltaMLP(TrainableMeasure):
    """A small MLP on ``[h_out, delta]`` of block ``l`` (the note's next step 1)."""

    name: ClassVar[str] = "hdelta-mlp"
    default_features: ClassVar[str] = "h+delta"
    inputs: ClassVar[tuple[str, ...]] = ("h_out", "delta")

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("features", "h+delta")
        super().__init__(**kwargs)


@register_measure
class LensMLP(TrainableMeasure):
    """A small MLP on logit-lens summary features (:func:`lens_features`): CALM's learned classifier
    fed what the softmax response, "Looking Beyond the Top-1" and state propagation look at, plus how
    the lens's prediction moved in the last block.

    Defaults to ``class_weight=None``: the score is then the log-odds of the posterior "safe to exit",
    so one threshold means about the same risk at every layer (class-balanced fits rank tokens within
    a layer but shift the scale from layer to layer). Costs one lens call per scored layer: the
    early-exit loop hands the previous layer's lens logits on; only the first scored layer of a step
    also runs the lens on its ``h_in``.

    Example:
        >>> m = get_measure("lens-mlp")                        # doctest: +SKIP
        >>> m.fit(states, labels)                              # doctest: +SKIP
    """

    name: ClassVar[str] = "lens-mlp"
    needs_lens: ClassVar[bool] = True
    default_features: ClassVar[str] = "lens"
    default_hidden_units: ClassVar[int] = 64
    inputs: ClassVar[tuple[str, ...]] = ("h_in", "h_out")

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("features", "lens")
        kwargs.setdefault("class_weight", None)
        super().__init__(**kwargs)  # rejects any features but "lens"

    def _raw_features(self, state: LayerState) -> torch.Tensor:
        """Lens features, in chunks of tokens so a fit on many tokens never holds all their logits."""
        h_out = state.h_out.reshape(-1, state.h_out.shape[-1])
        if h_out.shape[0] <= _LENS_CHUNK:
            return lens_features(state)
        if state.h_in is None:
            raise ValueError("lens features need h_in (the state before the block)")
        h_in = state.h_in.reshape(-1, state.h_in.shape[-1])
        parts = []
        for start in range(0, h_out.shape[0], _LENS_CHUNK):
            part = slice(start, start + _LENS_CHUNK)
            chunk = LayerState(layer=state.layer, h_out=h_out[part], h_in=h_in[part], lens=state.lens)
            if state._logits is not None:
                chunk._logits = state._logits.reshape(-1, state._logits.shape[-1])[part]
            if state._logits_in is not None:
                chunk._logits_in = state._logits_in.reshape(-1, state._logits_in.shape[-1])[part]
            parts.append(lens_features(chunk))
        return torch.cat(parts).reshape(*state.h_out.shape[:-1], -1)

    def flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        from deltaexit.measures.simple import _lens_head_flops

        n_in = len(LENS_FEATURE_NAMES)
        h = self.hidden_units
        head = _lens_head_flops(hidden_size, vocab_size)
        # log-softmax of both layers' logits, top-k, gathers, entropy and KL over the vocabulary
        lens_stats = 14.0 * vocab_size
        states = 10.0 * hidden_size  # delta, two norms, cosine
        mlp = 2.0 * n_in + 2.0 * n_in * h + 12.0 * h + 1.0
        return head + lens_stats + states + mlp
