"""The outcome of a calibration: the chosen threshold and the (delta, epsilon, n) it is certified for.

Saved as ``calibration.json`` (format, version, every figure) plus ``calibration.safetensors`` (the
per-example losses of each tested candidate) in a directory, typically the one a trained measure
was saved to, so the measure and its thresholds travel together. Both files are written atomically.

Example:
    >>> import tempfile
    >>> result = CalibrationResult(delta=0.05, epsilon=0.1, n=100, threshold=0.9, index=1, candidates=[1.0, 0.9])
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     _ = result.save(directory)
    ...     CalibrationResult.load(directory).threshold
    0.9
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from deltaexit.exits import DecayingThreshold
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.io import atomic_path, atomic_write_json

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "KV_NAMES",
    "LOSSES_NAME",
    "CalibrationFileError",
    "CalibrationResult",
    "kv_name",
]

CONFIG_NAME = "calibration.json"
LOSSES_NAME = "calibration.safetensors"
FORMAT = "deltaexit-calibration"
FORMAT_VERSION = 1
KINDS = ("constant", "per-layer", "decaying")
#: The KV policy names :class:`~deltaexit.generation.early_exit.EarlyExit` takes as shortcuts.
KV_NAMES = ("verify", "propagate", "recompute")


def kv_name(kv: Any) -> str:
    """The name of a KV policy given as a name or a policy object (its ``name``, else its class name).

    Example:
        >>> kv_name("propagate")
        'propagate'
    """
    if isinstance(kv, str):
        return kv
    name = getattr(kv, "name", None)
    return name if isinstance(name, str) else type(kv).__name__.lower()


class CalibrationFileError(ValueError):
    """A calibration file is missing, corrupt or of an unknown format version."""


def _json_float(x: float) -> float | str:
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _from_json_float(x: Any) -> Any:
    if isinstance(x, str) and x in ("inf", "-inf"):
        return float(x)
    if isinstance(x, list):
        return [_from_json_float(v) for v in x]
    return x


def _encode(x: Any) -> Any:
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if isinstance(x, float):
        return _json_float(x)
    return x


@dataclass
class CalibrationResult:
    """A Learn-then-Test calibration: with probability ``>= 1 - epsilon`` over the draw of the ``n``
    calibration examples, the expected ``loss`` of early exit at ``threshold`` is ``<= delta``.

    Attributes:
        delta: Risk tolerance (expected per-example loss).
        epsilon: Error level of the guarantee.
        n: Calibration examples the p-values were computed on.
        threshold: The chosen candidate: a float (``"constant"``), a list of per-layer floats
            (``"per-layer"``) or the base of CALM's schedule (``"decaying"``); ``None`` when not even
            the safest candidate could be certified (then do not exit early).
        kind: ``"constant"``, ``"per-layer"`` or ``"decaying"``.
        measure: Name of the measure.
        kv: KV policy the losses were measured with, a name or the policy object passed to
            ``calibrate`` (saved as its name; ``"offline"`` simulation: ``"recompute"``-like).
        loss: ``"textual"``, ``"sequence"``, ``"risk"`` or ``"custom"``.
        bound: Concentration bound of the p-values (``"hb"``: Hoeffding–Bentkus).
        index: Index of the chosen candidate in ``candidates`` (-1: none).
        candidates: The ordered candidates (safest first).
        pvalues, risks: p-value and empirical risk of each tested candidate.
        min_examples: Fewest examples that could certify ``(delta, epsilon)`` at all.
        min_exit_layer, max_new_tokens, tau: Settings of the exit rule and the continuations.
        backend: ``"generate"`` (real early-exit generation), ``"offline"`` (exit table), ``"table"`` (a given exit
            table), ``"shards"`` (a streamed collection) or ``"custom"``.
        info: Free-form JSON-friendly details (grid prompts, model name, ...).
        losses: ``[tested, n]`` per-example losses of the tested candidates (float64), or None.
    """

    delta: float
    epsilon: float
    n: int
    threshold: Any
    kind: str = "constant"
    measure: str = ""
    kv: Any = ""
    loss: str = "textual"
    bound: str = "hb"
    index: int = -1
    candidates: list[Any] = field(default_factory=list)
    pvalues: list[float] = field(default_factory=list)
    risks: list[float] = field(default_factory=list)
    min_examples: int = 0
    min_exit_layer: int = 1
    max_new_tokens: int | None = None
    tau: float = 4.0
    backend: str = "custom"
    info: dict[str, Any] = field(default_factory=dict)
    losses: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")

    # -- reading --------------------------------------------------------------------------------------
    @property
    def certified(self) -> bool:
        """Whether some candidate was certified (else the safe choice is not to exit early)."""
        return self.index >= 0 and self.threshold is not None

    @property
    def empirical_risk(self) -> float:
        """Empirical risk of the chosen candidate on the calibration examples (nan if none)."""
        return self.risks[self.index] if self.certified else float("nan")

    @property
    def pvalue(self) -> float:
        """p-value of the chosen candidate (nan if none)."""
        return self.pvalues[self.index] if self.certified else float("nan")

    def schedule(self) -> Any:
        """The threshold in the form :class:`~deltaexit.generation.early_exit.EarlyExit` takes (``inf`` if
        not certified); ``"decaying"`` gives a :class:`~deltaexit.exits.DecayingThreshold`.

        Example:
            >>> CalibrationResult(delta=0.1, epsilon=0.1, n=50, threshold=0.8, index=0).schedule()
            0.8
        """
        if not self.certified:
            return math.inf
        if self.kind != "per-layer" and math.isinf(float(self.threshold)):
            return math.inf  # never exit (a clipped decaying schedule of inf would read 1.0)
        if self.kind == "decaying":
            return DecayingThreshold(float(self.threshold), tau=self.tau, max_steps=self.max_new_tokens or 64)
        if self.kind == "per-layer":
            return [float(v) for v in self.threshold]
        return float(self.threshold)

    def early_exit(self, model: Any, measure: Any = None, **kwargs: Any) -> EarlyExit:
        """:class:`~deltaexit.generation.early_exit.EarlyExit` with this threshold, measure (or ``measure``)
        and KV policy (``kv=`` and other keywords override; a KV that is not a policy gives ``"recompute"``).

        Example:
            >>> from deltaexit.testing import tiny_model
            >>> result = CalibrationResult(delta=0.1, epsilon=0.1, n=50, threshold=0.8, index=0,
            ...                            measure="softmax-max", kv="recompute")
            >>> type(result.early_exit(tiny_model("llama"))).__name__
            'EarlyExit'
        """
        kv = kwargs.pop("kv", self.kv if not isinstance(self.kv, str) or self.kv in KV_NAMES else "recompute")
        return EarlyExit(
            model, measure=measure if measure is not None else self.measure, threshold=self.schedule(), kv=kv,
            min_exit_layer=kwargs.pop("min_exit_layer", self.min_exit_layer), **kwargs,
        )  # fmt: skip

    def summary(self) -> str:
        """One line: what is certified."""
        if not self.certified:
            return (
                f"nothing certified: even the safest threshold's risk could not be shown <= {self.delta} "
                f"at epsilon={self.epsilon} with n={self.n} (do not exit early)"
            )
        return (
            f"{self.kind} threshold {self.threshold!r} for {self.measure or 'the measure'} "
            f"({kv_name(self.kv) or 'any'} KV, {self.backend}): "
            f"P(expected {self.loss} loss <= {self.delta}) >= {1 - self.epsilon:g} over n={self.n} examples "
            f"(empirical risk {self.empirical_risk:.4g}, p={self.pvalue:.3g}, candidate "
            f"{self.index + 1}/{len(self.candidates)})"
        )

    # -- saving ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (the losses tensor excluded)."""
        d = asdict(replace(self, kv=kv_name(self.kv), losses=None))  # a policy object is saved as its name
        d.pop("losses")
        d = {k: _encode(v) for k, v in d.items()}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationResult:
        """Inverse of :meth:`to_dict`."""
        if d.get("format") != FORMAT:
            raise CalibrationFileError(f"not a deltaexit calibration (format {d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CalibrationFileError(
                f"calibration format version {version!r} is not supported "
                f"(this deltaexit reads {FORMAT_VERSION}); re-run dx.calibrate"
            )
        fields = {k: _from_json_float(v) for k, v in d.items() if k not in ("format", "format_version")}
        missing = [k for k in ("delta", "epsilon", "n", "threshold") if k not in fields]
        if missing:
            raise CalibrationFileError(f"calibration file lacks {missing}")
        known = set(cls.__dataclass_fields__) - {"losses"}
        unknown = set(fields) - known
        if unknown:
            raise CalibrationFileError(f"calibration file has unknown fields {sorted(unknown)}")
        return cls(**fields)

    def save(self, path: str | os.PathLike[str], measure: Any = None) -> Path:
        """Write ``calibration.json`` (+ ``calibration.safetensors``) into directory ``path``.

        Args:
            path: A directory (created if needed), e.g. where the measure is saved.
            measure: Optionally a trained measure with ``.save(path)`` to write alongside.

        Returns:
            The directory.
        """
        directory = Path(path)
        if directory.suffix == ".json":
            raise ValueError(f"save takes a directory (it writes {CONFIG_NAME} there), got {path}")
        directory.mkdir(parents=True, exist_ok=True)
        if measure is not None and hasattr(measure, "save"):
            measure.save(directory)
        if self.losses is not None:
            from safetensors.torch import save_file

            with atomic_path(directory / LOSSES_NAME) as tmp:
                save_file({"losses": self.losses.detach().to(torch.float64).contiguous().cpu()}, str(tmp))
        else:
            (directory / LOSSES_NAME).unlink(missing_ok=True)
        atomic_write_json(directory / CONFIG_NAME, self.to_dict())
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationResult:
        """Read a directory written by :meth:`save` (or its ``calibration.json``)."""
        p = Path(path)
        file = p if p.suffix == ".json" else p / CONFIG_NAME
        if not file.is_file():
            raise CalibrationFileError(f"no {CONFIG_NAME} at {p}; save one with CalibrationResult.save(dir)")
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CalibrationFileError(f"{file} is not valid JSON ({exc}); the file is corrupt") from exc
        if not isinstance(d, dict):
            raise CalibrationFileError(f"{file} does not hold a JSON object")
        try:
            result = cls.from_dict(d)
        except TypeError as exc:
            raise CalibrationFileError(f"{file}: {exc}") from exc
        tensors = file.parent / LOSSES_NAME
        if tensors.is_file():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                result.losses = load_file(str(tensors))["losses"]
            except (SafetensorError, KeyError, OSError) as exc:
                raise CalibrationFileError(f"{tensors} is corrupt ({exc})") from exc
            if result.losses.dim() != 2 or result.losses.shape[1] != result.n:
                raise CalibrationFileError(
                    f"{tensors} holds losses of shape {tuple(result.losses.shape)}, expected [tested, {result.n}]"
                )
        return result
