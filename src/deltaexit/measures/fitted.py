"""What a trainable measure learns (one :class:`FittedState`), and its files: safetensors + JSON config.

A saved measure is a directory with ``measure.safetensors`` (the net's weights as ``net.<name>``
and the standardisation ``mean`` / ``std``) and ``measure.json`` (format ``deltaexit-measure``,
``format_version`` 1, the measure's name and constructor parameters, the fitted layers, hidden
size, input width, positive rates, best epoch and held-out loss history, and the SHA-256 of the
weights file). Both are written atomically.

Example:
    >>> import tempfile, torch
    >>> from deltaexit.measures.nets import ExitNet
    >>> state = FittedState(layers=(0,), hidden_size=2, n_features_in=2, mean=torch.zeros(1, 2),
    ...                     std=torch.ones(1, 2), net=ExitNet(2, 0, 1, False), positive_rate=(0.5,),
    ...                     history=(0.7,), best_epoch=0)
    >>> path = save_fitted(tempfile.mkdtemp(), measure="linear", params={"hidden_units": 0}, state=state)
    >>> saved = read_saved(path, hidden_size=2)
    >>> saved.measure, fitted_state(saved, hidden_units=0, per_layer=False).layers
    ('linear', (0,))
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltaexit.io import atomic_path, atomic_write_json
from deltaexit.measures.nets import ExitNet

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "FittedState",
    "MeasureFileError",
    "SavedMeasure",
    "fitted_state",
    "read_saved",
    "save_fitted",
]

#: Version of the on-disk format written by :func:`save_fitted`.
FORMAT_VERSION = 1
CONFIG_NAME = "measure.json"
WEIGHTS_NAME = "measure.safetensors"


class MeasureFileError(ValueError):
    """A saved measure is missing, corrupt, of another format version, or does not fit the model."""


@dataclass(frozen=True, eq=False)
class FittedState:
    """Everything a fit learns; a trainable measure's fitted attributes are these fields with a ``_``.

    Attributes:
        layers: Block indices (0-based) fitted on, ascending; row ``i`` of ``mean``/``std`` is ``layers[i]``.
        hidden_size: Hidden size of the model's states.
        n_features_in: Input width of the net.
        mean, std: ``[len(layers), n_features_in]`` standardisation per layer.
        net: The trained, frozen :class:`~deltaexit.measures.nets.ExitNet`.
        positive_rate: Share of positive labels per layer in the training tokens.
        history: Held-out loss per epoch (epoch 0 = before training).
        best_epoch: The epoch whose weights were kept.
    """

    layers: tuple[int, ...]
    hidden_size: int
    n_features_in: int
    mean: torch.Tensor
    std: torch.Tensor
    net: ExitNet
    positive_rate: tuple[float, ...]
    history: tuple[float, ...]
    best_epoch: int


@dataclass(frozen=True, eq=False)
class SavedMeasure:
    """A checked saved measure: its config entries and its tensors (see :func:`read_saved`)."""

    directory: Path
    measure: str
    params: dict[str, Any]
    fitted: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def save_fitted(path: str | os.PathLike[str], *, measure: str, params: dict[str, Any], state: FittedState) -> Path:
    """Write ``measure.safetensors`` and ``measure.json`` into directory ``path`` (atomically).

    Args:
        path: Directory (created if missing).
        measure: Registry name of the measure.
        params: Its constructor parameters (JSON-friendly).
        state: What it learnt.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.contiguous() for k, v in state.net.state_dict().items()}
    tensors["mean"] = state.mean.contiguous()
    tensors["std"] = state.std.contiguous()
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    config = {
        "format": "deltaexit-measure",
        "format_version": FORMAT_VERSION,
        "measure": measure,
        "params": params,
        "fitted": {
            "layers": list(state.layers),
            "hidden_size": state.hidden_size,
            "n_features_in": state.n_features_in,
            "positive_rate": list(state.positive_rate),
            "best_epoch": state.best_epoch,
            "history": list(state.history),
        },
        "weights_sha256": digest,
    }
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


def _read_config(directory: Path) -> dict[str, Any]:
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
    return config


def _read_weights(directory: Path, checksum: str | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = directory / WEIGHTS_NAME
    if checksum and hashlib.sha256(weights_path.read_bytes()).hexdigest() != checksum:
        raise MeasureFileError(
            f"{weights_path} does not match the checksum in {directory / CONFIG_NAME}: the file is corrupt or truncated"
        )
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MeasureFileError(f"{weights_path} is corrupt or truncated: {exc}") from None


def read_saved(path: str | os.PathLike[str], *, hidden_size: int | None = None) -> SavedMeasure:
    """Read and check a directory written by :func:`save_fitted`.

    Args:
        path: The directory.
        hidden_size: Expected hidden size; a mismatch raises.

    Raises:
        MeasureFileError: Missing or corrupt files, an unknown format version, or a hidden-size mismatch.
    """
    directory = Path(path)
    config = _read_config(directory)
    tensors = _read_weights(directory, config.get("weights_sha256"))
    fitted = config["fitted"]
    saved_hidden = int(fitted["hidden_size"])
    if hidden_size is not None and int(hidden_size) != saved_hidden:
        raise MeasureFileError(
            f"{directory} was fitted on a model of hidden size {saved_hidden}; this model has hidden size "
            f"{hidden_size}. Fit a new measure on this model's states."
        )
    return SavedMeasure(directory, config["measure"], dict(config["params"]), fitted, tensors)


def fitted_state(saved: SavedMeasure, *, hidden_units: int, per_layer: bool) -> FittedState:
    """The :class:`FittedState` of a saved measure whose net has ``hidden_units`` and ``per_layer``.

    Raises:
        MeasureFileError: The tensors do not fit the config.
    """
    weights_path = saved.directory / WEIGHTS_NAME
    fitted, tensors = saved.fitted, saved.tensors
    layers = tuple(int(x) for x in fitted["layers"])
    n_in = int(fitted["n_features_in"])
    net = ExitNet(n_in, hidden_units, len(layers), per_layer)
    weights = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise MeasureFileError(f"{weights_path} does not fit its config: {exc}") from None
    if tensors["mean"].shape != (len(layers), n_in) or tensors["std"].shape != (len(layers), n_in):
        raise MeasureFileError(f"{weights_path}: standardisation tensors have the wrong shape")
    return FittedState(
        layers=layers,
        hidden_size=int(fitted["hidden_size"]),
        n_features_in=n_in,
        mean=tensors["mean"],
        std=tensors["std"],
        net=net.freeze(),
        positive_rate=tuple(fitted["positive_rate"]),
        history=tuple(fitted["history"]),
        best_epoch=int(fitted["best_epoch"]),
    )
