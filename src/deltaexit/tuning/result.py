"""What :func:`~deltaexit.tuning.tune` found: the chosen setting and the measured figures of every candidate.

Saved as one JSON file (written atomically). The tuner searches registered training-free measures only, so the
file is everything needed: :meth:`TuneResult.early_exit` rebuilds the same ``EarlyExit`` on the model.

Example:
    >>> import math, os, tempfile
    >>> from deltaexit.tuning.grid import Candidate
    >>> best = Candidate("delta-norm", "verify", -math.inf, 2, {"num_draft": 4})
    >>> result = TuneResult(0.0, best, [CandidateResult(best, "fine", [1.2, 1.3, 1.25])])
    >>> path = os.path.join(tempfile.mkdtemp(), "tuned.json")
    >>> _ = result.save(path)
    >>> loaded = TuneResult.load(path)
    >>> loaded.chosen == best, loaded.speedup
    (True, 1.25)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from deltaexit.generation.early_exit import EarlyExit
from deltaexit.io import atomic_write_json
from deltaexit.jsonable import json_clean
from deltaexit.timing import spread
from deltaexit.tuning.grid import Candidate

__all__ = ["BASELINE_NAME", "FORMAT", "FORMAT_VERSION", "CandidateResult", "TuneFileError", "TuneResult"]

FORMAT = "deltaexit-tune"
FORMAT_VERSION = 1
#: The label of the "no early exit" candidate.
BASELINE_NAME = "model.generate (no early exit)"


class TuneFileError(ValueError):
    """A tuning file is missing, corrupt or of an unknown format version."""


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


@dataclass
class CandidateResult:
    """The figures measured for one candidate.

    Attributes:
        candidate: The setting (None: plain ``model.generate``).
        stage: ``"baseline"``, ``"screen"`` (timed once), ``"fine"`` (re-timed), ``"skipped"`` (budget spent)
            or ``"rejected"`` (``verify`` output not identical, or a calibrated setting's disagreement on the
            timed prompts above the tolerance).
        ratios: ``model.generate`` time / this setting's time, one per alternated repeat (``> 1``: faster).
        agreement: Share of new tokens equal to ``model.generate``'s on the timed prompts.
        identical: Every timed sequence equals ``model.generate``'s.
        mean_exit_layer: Mean 1-based exit layer of the emitted tokens.
        note: Why it was skipped or rejected.
    """

    candidate: Candidate | None
    stage: str
    ratios: list[float] = field(default_factory=list)
    agreement: float = 1.0
    identical: bool = True
    mean_exit_layer: float = float("nan")
    note: str = ""

    @property
    def name(self) -> str:
        """The candidate's label."""
        return BASELINE_NAME if self.candidate is None else self.candidate.name

    @property
    def median(self) -> float:
        """Median ratio to ``model.generate`` (nan if never timed)."""
        return float(spread(self.ratios)["median"])

    @property
    def spread(self) -> tuple[float, float]:
        """``(min, max)`` of the ratios."""
        summary = spread(self.ratios)
        return float(summary["min"]), float(summary["max"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (the derived median and spread included for readers)."""
        return {
            "name": self.name,
            "candidate": None if self.candidate is None else self.candidate.to_dict(),
            "stage": self.stage,
            "median_ratio": self.median,
            "spread": list(self.spread),
            "ratios": list(self.ratios),
            "agreement": self.agreement,
            "identical": self.identical,
            "mean_exit_layer": self.mean_exit_layer,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CandidateResult:
        """Inverse of :meth:`to_dict`."""
        candidate = None if d.get("candidate") is None else Candidate.from_dict(d["candidate"])
        return cls(
            candidate, d["stage"], [float(r) for r in d.get("ratios", [])], _nan(d.get("agreement")),
            bool(d.get("identical", False)), _nan(d.get("mean_exit_layer")), d.get("note", ""),
        )  # fmt: skip


@dataclass
class TuneResult:
    """The fastest setting that meets the tolerance, and how every candidate measured.

    Attributes:
        tolerance: The tolerated token disagreement asked for (0: identical output).
        chosen: The chosen setting, or None when plain ``model.generate`` was fastest.
        results: One entry per candidate tried, ``model.generate`` first.
        calibration: One record per Learn-then-Test calibration (``tolerance > 0``): measure, kv, threshold,
            certified, empirical risk, n, min_examples.
        info: Run facts (model, prompts, new tokens, threads, seconds).
    """

    tolerance: float
    chosen: Candidate | None
    results: list[CandidateResult] = field(default_factory=list)
    calibration: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen_result(self) -> CandidateResult | None:
        """The figures of :attr:`chosen` (the ``model.generate`` row when nothing beat it)."""
        for r in self.results:
            if r.candidate == self.chosen and (r.stage == "fine" or r.candidate is None):
                return r
        return None

    @property
    def uses_early_exit(self) -> bool:
        """False when no setting beat ``model.generate`` on the calibration prompts."""
        return self.chosen is not None

    @property
    def speedup(self) -> float:
        """Median ratio of the chosen setting to ``model.generate`` (1.0 when that is the choice)."""
        r = self.chosen_result
        return 1.0 if self.chosen is None or r is None else r.median

    @property
    def realised_disagreement(self) -> float:
        """Share of the chosen setting's new tokens that differ from ``model.generate``'s on the timed prompts."""
        r = self.chosen_result
        return 0.0 if self.chosen is None or r is None else 1.0 - r.agreement

    def early_exit(self, model: nn.Module) -> EarlyExit | None:
        """The chosen ``EarlyExit`` on ``model``, or None when plain ``model.generate`` is fastest."""
        return None if self.chosen is None else self.chosen.early_exit(model)

    def generate(self, model: nn.Module, inputs: torch.Tensor, **kwargs: Any) -> Any:
        """Generate with the chosen setting (``model.generate`` itself when nothing beat it)."""
        ee = self.early_exit(model)
        return ee.generate(inputs, **kwargs) if ee is not None else cast(Any, model).generate(inputs, **kwargs)

    def summary(self) -> str:
        """One line: the choice and its figure."""
        if self.chosen is None:
            return (
                f"no early-exit setting beat model.generate on the calibration prompts (tolerance {self.tolerance}): "
                "use plain model.generate"
            )
        r = self.chosen_result
        lo, hi = r.spread if r is not None else (math.nan, math.nan)
        return (
            f"{self.chosen.name}: {self.speedup:.2f}x model.generate (spread {lo:.2f}-{hi:.2f}), "
            f"disagreement {self.realised_disagreement:.4f} (tolerance {self.tolerance})"
        )

    def table(self) -> str:
        """A plain-text table of every candidate, fastest first."""
        rows = sorted(self.results, key=lambda r: -r.median if r.ratios else math.inf)
        width = max([len(r.name) for r in rows] + [9])
        lines = [f"{'candidate':<{width}}  stage     ratio  spread       agree   layer"]
        for r in rows:
            lo, hi = r.spread
            mark = "*" if r.candidate == self.chosen and r.stage in ("fine", "baseline") else " "
            lines.append(
                f"{r.name:<{width}}{mark} {r.stage:<8} {r.median:5.2f}x  {lo:4.2f}-{hi:4.2f}  {r.agreement:6.4f} "
                f"{r.mean_exit_layer:6.2f}" + (f"  {r.note}" if r.note else "")
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (non-finite figures become null; ``inf`` thresholds are strings)."""
        return json_clean(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "tolerance": self.tolerance,
                "chosen": None if self.chosen is None else self.chosen.to_dict(),
                "summary": self.summary(),
                "speedup": self.speedup,
                "realised_disagreement": self.realised_disagreement,
                "results": [r.to_dict() for r in self.results],
                "calibration": self.calibration,
                "info": self.info,
            }
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneResult:
        """Inverse of :meth:`to_dict`."""
        if d.get("format") != FORMAT or d.get("version") != FORMAT_VERSION:
            raise TuneFileError(
                f"not a {FORMAT} file of version {FORMAT_VERSION} (format={d.get('format')!r}, "
                f"version={d.get('version')!r}); re-run `deltaexit tune` to write one"
            )
        chosen = None if d.get("chosen") is None else Candidate.from_dict(d["chosen"])
        results = [CandidateResult.from_dict(r) for r in d.get("results", [])]
        return cls(float(d["tolerance"]), chosen, results, list(d.get("calibration", [])), dict(d.get("info", {})))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result as JSON to ``path`` atomically; returns the path."""
        target = Path(path)
        atomic_write_json(target, self.to_dict())
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TuneResult:
        """Read a file written by :meth:`save`.

        Raises:
            TuneFileError: The file is missing, not JSON, or not a tuning file of this version.
        """
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TuneFileError(
                f"no tuning file at {str(path)!r}; write one with `deltaexit tune --out PATH`"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise TuneFileError(f"cannot read the tuning file {str(path)!r}: {exc}") from None
        if not isinstance(d, dict):
            raise TuneFileError(f"{str(path)!r} does not hold a JSON object")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError) as exc:
            raise TuneFileError(f"the tuning file {str(path)!r} is incomplete or corrupt: {exc!r}") from None
