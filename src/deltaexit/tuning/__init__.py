"""Tuning early exit by measurement: ``dx.tune(model, prompts, tolerance=0.0)`` and its saved result.

* :func:`tune`: times a grid of ``EarlyExit`` settings against ``model.generate`` on this machine (successive
  halving, alternated runs, medians) and returns the fastest that meets the tolerance, or plain
  ``model.generate`` when nothing beats it.
* :class:`TuneConfig`, :class:`Candidate`: the search settings and one setting of the grid.
* :class:`TuneResult`: the choice and every candidate's figures; ``.early_exit(model)``, ``.save(path)``,
  ``TuneResult.load(path)``.
* :mod:`~deltaexit.tuning.timing`: alternated wall-clock against ``model.generate``.

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=4)
    >>> result = tune(model, [torch.tensor([5, 6, 7])], max_new_tokens=4, max_candidates=2, repeats=1,
    ...               progress=False)
    >>> len(result.results)           # model.generate and the two candidates timed
    3
"""

from deltaexit.tuning.api import check_prompts, prompts_required, tune
from deltaexit.tuning.grid import Candidate, TuneConfig, lossless_grid
from deltaexit.tuning.result import CandidateResult, TuneFileError, TuneResult
from deltaexit.tuning.timing import PromptRuns, Timing, time_against_generate

__all__ = [
    "Candidate",
    "CandidateResult",
    "PromptRuns",
    "Timing",
    "TuneConfig",
    "TuneFileError",
    "TuneResult",
    "check_prompts",
    "lossless_grid",
    "prompts_required",
    "time_against_generate",
    "tune",
]
