"""The KV-policy interface: how early-exit generation keeps the skipped layers' cache consistent.

A policy is a small strategy object (like ``transformers``' candidate generators): after the prompt,
:class:`~deltaexit.generation.early_exit.EarlyExit` calls :meth:`KVPolicy.start` once, then
:meth:`KVPolicy.step` until every row is finished. A step runs the exit scan
(:meth:`deltaexit.generation.scan.ExitScan.forward`) as the policy needs, keeps every layer's cache at the
same length, and appends at least one token to the run (:meth:`deltaexit.generation.run.Run.append`).
Policy-specific settings are fields of the policy; the shared ones (measure, threshold, ``min_exit_layer``)
belong to the scan.

The policies shipped, one module each, registered by name:

* ``"verify"`` (:class:`~deltaexit.generation.verify.Verify`, LayerSkip self-speculation): early exits only
  draft; the full model verifies the drafts in one pass; lossless.
* ``"propagate"`` (:class:`~deltaexit.generation.propagate.Propagate`, CALM): a skipped layer gets keys/values
  computed from the exit state.
* ``"recompute"`` (:class:`~deltaexit.generation.recompute.Recompute`, EE-LLM / FREE): the exited token is held
  back from the cache and re-run with the next token that goes to full depth.
* ``"tolerant"`` (:class:`~deltaexit.generation.tolerant.Tolerant`): ``verify`` that also accepts an early-exit
  draft whose full-model probability is within a calibrated factor of the top-1 (lossy below ``ratio=1``).

A new policy is a new module: subclass :class:`KVPolicy`, give it a ``name`` and decorate it with
:func:`register_policy`.

Example:
    >>> get_policy("verify")
    Verify(num_draft=4, adaptive=False, ngram=3, ngram_draft=16, ngram_min=1)
    >>> get_policy("recompute").name
    'recompute'
    >>> sorted(KV_POLICIES)
    ['propagate', 'recompute', 'tolerant', 'verify']
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from deltaexit.generation.run import Run
    from deltaexit.generation.scan import ExitScan

__all__ = ["KV_POLICIES", "KVPolicy", "get_policy", "register_policy"]


class KVPolicy(ABC):
    """Base class of the KV policies: one decode step at a time, every layer's cache kept consistent.

    Class attributes:
        name: Registry name (``kv=`` shortcut), also ``GenerationStats.policy``.
        kv_only_per_skipped_block: K/V-only block calls the policy makes per skipped block (the cost model's
            default for :meth:`deltaexit.generation.cost.CostModel.speedup`).
    """

    name: ClassVar[str] = ""
    kv_only_per_skipped_block: ClassVar[float] = 0.0

    def start(self, scan: ExitScan) -> Any:
        """Per-call state of one ``generate`` call, handed to every :meth:`step` (default: None)."""
        return None

    @abstractmethod
    def step(self, run: Run, scan: ExitScan, state: Any) -> None:
        """Generate at least one token per unfinished row and append it to ``run``.

        Args:
            run: The call's mutable state (sequences, cache, stopping, stats).
            scan: The exit scan (runs blocks, scores rows, decides exits).
            state: What :meth:`start` returned for this call.
        """


#: The registered KV policies, by name.
KV_POLICIES: dict[str, type[KVPolicy]] = {}

P = TypeVar("P", bound=type[KVPolicy])


def register_policy(cls: P) -> P:
    """Class decorator: register a :class:`KVPolicy` subclass under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name to be registered")
    if cls.name in KV_POLICIES and KV_POLICIES[cls.name] is not cls:
        raise ValueError(f"a KV policy named {cls.name!r} is already registered ({KV_POLICIES[cls.name].__name__})")
    KV_POLICIES[cls.name] = cls
    return cls


def get_policy(kv: str | KVPolicy) -> KVPolicy:
    """The policy for ``kv``: a registered name (its default settings) or a :class:`KVPolicy` instance."""
    if isinstance(kv, KVPolicy):
        return kv
    if isinstance(kv, str) and kv in KV_POLICIES:
        return KV_POLICIES[kv]()
    if isinstance(kv, str):
        raise ValueError(f"unknown kv policy {kv!r}; choose one of {sorted(KV_POLICIES)}")
    raise TypeError(f"kv must be a policy name or a KVPolicy instance (e.g. Verify(num_draft=4)), got {kv!r}")
