"""Never slower: early-exit generation watches its own pay-off and backs off to plain decoding when it loses.

:class:`PayoffMonitor` wraps each decode step of :class:`~deltaexit.generation.early_exit.EarlyExit`'s loop. It
measures the cost per generated token of the KV policy's steps over a window of tokens and compares it with a
plain full-depth step (the model's own forward over the token with the cache, :func:`full_depth_step`: what
``model.generate`` runs). When early exit costs more, it backs off to plain steps for ``hold`` tokens, then
retries early exit; each failed retry doubles the hold (up to ``max_hold``), a success resets it.

The cost is, with ``signal="time"`` (the default), the wall-clock seconds per token (clipped sums over a window;
a full-depth step's time is the median of the latest plain steps, a few of them run as a probe when none is
recent; :class:`PlainTimes` keeps them across the ``generate`` calls of one ``EarlyExit``), and with
``signal="cost"`` the deterministic block count per token (blocks run, measure calls and ``propagate``'s K/V-only
calls in block equivalents) against ``L`` per token, so a run backs off at the same token on every machine.

With ``signal="cost"`` the monitor also decides before the first token (``Backoff.prior``): :func:`prior_cost` prices
an early-exit token from the cost model with its exits spread evenly over the scored layers (no knowledge of the
model's exits); when that costs more than a plain step (a measure that reads the whole vocabulary at every layer
of a model whose LM head weighs several blocks, as on ``v1``), the call starts backed off and first retries early
exit after ``4 * hold`` tokens.
Every policy keeps all layers' caches at one length after each step and ``recompute``'s held-back tokens are the
ones beyond the cache, so a plain step needs no settling: it runs the model over every token not yet in the cache.

Greedy ``verify`` output is unchanged (a plain step is ``model.generate``'s); for ``propagate``/``recompute`` the
backed-off tokens are the full model's. Backed-off and probe steps count ``L`` blocks in the stats.

Example:
    >>> import torch
    >>> from deltaexit.generation.early_exit import EarlyExit
    >>> from deltaexit.testing import ConstantScore, tiny_model
    >>> model = tiny_model("llama", num_layers=3)
    >>> ee = EarlyExit(model, ConstantScore(), 0.5, "propagate", backoff=Backoff(signal="cost", warmup=4))
    >>> out = ee.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=12, pad_token_id=0, return_dict_in_generate=True)
    >>> out.stats.backoffs, out.stats.backoff_steps  # exiting after block 1 of 3 saves blocks: no back-off
    (0, 0)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import median
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from deltaexit.exits import is_scored
from deltaexit.generation.cost import CostModel, measure_block_fraction, measure_setup_block_fraction
from deltaexit.generation.kv import cache_length, set_cache_length
from deltaexit.generation.recurrent import continues_chunks
from deltaexit.generation.run import Run
from deltaexit.measures.base import ConfidenceMeasure

if TYPE_CHECKING:
    from deltaexit.generation.scan import ExitScan

__all__ = [
    "PRIOR_POLICIES",
    "Backoff",
    "PayoffMonitor",
    "PlainTimes",
    "as_backoff",
    "block_cost",
    "full_depth_step",
    "prior_cost",
]

#: The KV policies whose tokens each come from one exit scan, so :func:`prior_cost` prices them (``Backoff.prior``).
PRIOR_POLICIES: tuple[str, ...] = ("propagate", "recompute")


@dataclass(frozen=True)
class Backoff:
    """Settings of the pay-off monitor (``EarlyExit(..., backoff=Backoff(...))``; ``backoff=False`` turns it off).

    Args:
        signal: ``"time"`` (wall-clock per token, what users see) or ``"cost"`` (blocks plus measure and K/V-only
            calls per token, deterministic).
        warmup: Early-exit tokens before the first judgement.
        window: Early-exit tokens per later judgement.
        probe: Plain steps timed when no recent full-depth time is known (``signal="time"``).
        hold: Plain tokens after backing off before early exit is retried (doubled after each failed retry).
        max_hold: Longest hold.
        margin: Back off when early exit costs more than ``1 + margin`` times a plain step per token.
        prior: With ``signal="cost"`` under ``propagate``/``recompute`` (:data:`PRIOR_POLICIES`), start backed off
            (for ``4 * hold`` tokens) when :func:`prior_cost` says an early-exit token costs more than a plain one
            before any token is made.
    """

    SIGNALS: ClassVar[tuple[str, ...]] = ("time", "cost")

    signal: str = "time"
    warmup: int = 32
    window: int = 32
    probe: int = 4
    hold: int = 64
    max_hold: int = 1024
    margin: float = 0.0
    prior: bool = True

    def __post_init__(self) -> None:
        if self.signal not in self.SIGNALS:
            raise ValueError(f"signal must be one of {self.SIGNALS}, got {self.signal!r}")
        for name in ("warmup", "window", "probe", "hold", "max_hold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_hold < self.hold:
            raise ValueError(f"max_hold ({self.max_hold}) must be >= hold ({self.hold})")
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0, got {self.margin!r}")


def as_backoff(backoff: bool | Backoff | None, policy: str = "verify") -> Backoff | None:
    """``True`` = the default :class:`Backoff`, ``False``/None = off, or the settings given.

    The default watches wall-clock time under ``verify`` (lossless: only the speed depends on it) and the
    deterministic cost count under the lossy policies, whose tokens would otherwise depend on how fast the machine
    ran. Under ``propagate``/``recompute`` the count, which has no noise to average out, judges after 4 tokens and
    then every 8 (a 32-token warm-up was half of a 64-token call, and most of a call that stops at EOS); other
    lossy policies (``tolerant``, which drafts and verifies in rounds) keep 32 and 32.

    Example:
        >>> as_backoff(True).signal, as_backoff(True, "propagate").signal, as_backoff(False)
        ('time', 'cost', None)
        >>> as_backoff(True, "recompute").warmup, as_backoff(True, "recompute").window
        (4, 8)
    """
    if isinstance(backoff, Backoff):
        return backoff
    if backoff is None or backoff is False:
        return None
    if backoff is True:
        if policy in PRIOR_POLICIES:
            return Backoff(signal="cost", warmup=4, window=8)
        return Backoff() if policy == "verify" else Backoff(signal="cost")
    raise TypeError(f"backoff must be a bool or a Backoff(...), got {backoff!r}")


def block_cost(model: nn.Module, measure: ConfidenceMeasure, context: int) -> Callable[[Run], float]:
    """``signal="cost"``'s clock: a run's blocks, measure calls and K/V-only calls so far, in block equivalents
    (:func:`~deltaexit.generation.cost.measure_block_fraction`, :attr:`CostModel.kv_only_blocks`)."""
    fraction = measure_block_fraction(model, measure, context)
    kv_only = CostModel.from_model(model, context=context).kv_only_blocks

    def cost(run: Run) -> float:
        stats = run.stats
        state = stats.state_calls * CostModel.state_call_blocks
        return stats.blocks_run + stats.measure_calls * fraction + stats.kv_only_calls * kv_only + state

    return cost


def prior_cost(model: nn.Module, scan: ExitScan, kv_per_skipped: float, context: int) -> float:
    """An early-exit token's cost in ``signal="cost"``'s block equivalents, before any token is made: the mean over
    its exit after each scored layer and no exit at all, equally likely (a plain step costs ``L``).

    An exit after the ``i``-th scored layer, at depth ``d``, costs ``d`` blocks, ``i`` measure calls and
    ``kv_per_skipped`` K/V-only calls per skipped block (``propagate``: 1; ``recompute``'s catch-up runs the skipped
    blocks with the next step's, priced 0); no exit costs ``L`` blocks and a measure call per scored layer. A
    candidate-set measure adds its setup once per token; a threshold of ``-inf`` makes every token exit there.

    Example:
        >>> from deltaexit.generation.early_exit import EarlyExit
        >>> from deltaexit.testing import ConstantScore, tiny_model
        >>> model = tiny_model("llama", num_layers=4)
        >>> round(prior_cost(model, EarlyExit(model, ConstantScore(), 0.5).scan, 0.0, 16), 2)  # (1+2+3+4)/4
        2.51
    """
    num_layers = scan.num_layers
    thresholds = scan.thresholds(0)
    depths = [
        d
        for d in range(1, num_layers + 1)
        if is_scored(d, thresholds[d - 1], min_exit_layer=scan.min_exit_layer, num_layers=num_layers)
    ]
    decision = measure_block_fraction(model, scan.measure, context)
    setup = measure_setup_block_fraction(model, scan.measure, context) if depths else 0.0  # candidate sets
    kv_only = CostModel.from_model(model, context=context).skipped_call_blocks * kv_per_skipped
    costs = []
    for i, d in enumerate(depths, start=1):
        cost = d + setup + i * decision + (num_layers - d) * kv_only
        if thresholds[d - 1] == -math.inf:  # every token exits here
            return cost
        costs.append(cost)
    costs.append(num_layers + setup + len(depths) * decision)
    return sum(costs) / len(costs)


def full_depth_step(run: Run, scan: ExitScan) -> None:
    """One plain step: the model's own forward over every token not yet in the cache (``model.generate``'s step;
    ``recompute``'s held-back tokens included), its last position's logits choose the next token."""
    start = cache_length(run.cache)
    ids = run.input_ids
    first = start
    if ids.shape[1] - start > 1 and not continues_chunks(run.model):  # recurrent layers: one token at a time
        for pos in range(start, ids.shape[1] - 1):
            run.model(**scan.model_inputs(ids[:, : pos + 1], run.model_kwargs, pos, pos + 1), return_dict=True)
        first = ids.shape[1] - 1
    outputs = run.model(**scan.model_inputs(ids, run.model_kwargs, first, ids.shape[1]), return_dict=True)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=ids.device)
    del outputs
    run.stats.blocks_run += scan.num_layers
    run.stats.token_blocks_run += scan.num_layers * (ids.shape[1] - start)
    set_cache_length(run.cache, ids.shape[1])
    token, _, scores = run.choose(ids, logits)
    run.append(token, torch.full_like(token, scan.num_layers), scores, logits)


@dataclass
class PlainTimes:
    """What is known of a plain full-depth step's wall-clock time per token (``signal="time"``).

    :class:`~deltaexit.generation.early_exit.EarlyExit` keeps one per batch size across its ``generate`` calls, so
    a later call reuses the latest plain steps' times instead of probing again (4 plain steps per call were 6% of
    a 64-token call on ``v3``); they are re-timed when older than ``refresh`` early-exit tokens, which doubles
    while early exit keeps winning, up to ``Backoff.max_hold``.

    Attributes:
        times: The latest plain steps' seconds per token (at most 8).
        age: Early-exit tokens since the latest plain step.
        refresh: Re-time plain steps when ``age`` exceeds this.
    """

    times: list[float] = field(default_factory=list)
    age: int = 0
    refresh: int = 32

    def add(self, per_token: float) -> None:
        """Note a plain step's seconds per token."""
        self.times = (self.times + [per_token])[-8:]
        self.age = 0

    def per_token(self) -> float | None:
        """The median of the latest plain steps' times; None when there are none or they are too old."""
        return median(self.times) if self.times and self.age <= self.refresh else None


@dataclass
class _Window:
    """Costs and tokens of the steps of one kind since the last judgement."""

    costs: list[float] = field(default_factory=list)
    tokens: int = 0

    def add(self, cost: float, tokens: int) -> None:
        self.costs.append(cost)
        self.tokens += tokens

    def per_token(self) -> float:
        """Cost per token, each step's cost clipped at 4x the median step (a stray pause does not decide)."""
        cap = 4.0 * median(self.costs)
        return sum(min(c, cap) for c in self.costs) / max(self.tokens, 1)


class PayoffMonitor:
    """Per-call state of the back-off: which kind of step runs next, and the costs measured so far.

    Args:
        settings: The :class:`Backoff` settings.
        scan: The exit scan (its ``num_layers``).
        cost: For ``signal="cost"``, a function of the run giving its cost so far in block equivalents.
        plain: For ``signal="time"``, the plain-step times known from earlier calls (updated in place; default:
            none known).
        prior: For ``signal="cost"``, :func:`prior_cost`: with ``settings.prior``, the call starts backed off for
            ``4 * settings.hold`` tokens when it exceeds a plain step's ``L`` (times ``1 + margin``).
    """

    def __init__(
        self,
        settings: Backoff,
        scan: ExitScan,
        cost: Callable[[Run], float] | None = None,
        plain: PlainTimes | None = None,
        prior: float | None = None,
    ) -> None:
        if settings.signal == "cost" and cost is None:
            raise ValueError("signal='cost' needs a cost function")
        self.settings = settings
        self.scan = scan
        self.cost = cost
        self.early = _Window()
        self.due = settings.warmup  # early-exit tokens in the window before the next judgement
        self.plain = plain if plain is not None else PlainTimes(refresh=settings.window)  # signal="time"
        self.probing = 0  # probe steps still to run
        self.holding = 0  # backed-off tokens still to run
        self.hold = settings.hold
        self.retrying = False
        self.held_from_start = (
            cost is not None
            and settings.prior
            and prior is not None
            and prior > scan.num_layers * (1.0 + settings.margin)
        )
        if self.held_from_start:  # early exit cannot pay here on the cost model: probe it rarely
            self.hold = min(4 * settings.hold, settings.max_hold)
            self.holding = self.hold

    def _clock(self, run: Run) -> float:
        return time.perf_counter() if self.cost is None else self.cost(run)

    def step(self, run: Run, early_step: Callable[[], None]) -> None:
        """Run one step, early exit (``early_step``) or plain, and update the judgement."""
        plain = self.probing > 0 or self.holding > 0
        if self.held_from_start:  # counted once, in the first step's stats
            run.stats.backoffs += 1
            self.held_from_start = False
        n0, c0 = run.step, self._clock(run)
        if plain:
            full_depth_step(run, self.scan)
        else:
            early_step()
        cost, tokens = self._clock(run) - c0, run.step - n0
        if plain:
            self._after_plain(run, cost / max(tokens, 1))
        else:
            self.early.add(cost, tokens)
            self.plain.age += tokens
            if self.early.tokens >= self.due:
                self._judge(run)

    def _after_plain(self, run: Run, per_token: float) -> None:
        run.stats.backoff_steps += 1
        self.plain.add(per_token)
        if self.probing:
            run.stats.probe_steps += 1
            self.probing -= 1
            if not self.probing:
                self._judge(run)
            return
        self.holding -= 1
        if not self.holding:  # retry early exit
            run.stats.retries += 1
            self.retrying = True
            self.early, self.due = _Window(), self.settings.window

    def _plain_per_token(self) -> float | None:
        """A plain step's cost per token; None when it must be timed again first."""
        if self.cost is not None:
            return float(self.scan.num_layers)
        return self.plain.per_token()

    def _judge(self, run: Run) -> None:
        plain = self._plain_per_token()
        if plain is None:  # no full-depth time known yet: probe it first
            self.probing = self.settings.probe
            return
        if self.early.per_token() > plain * (1.0 + self.settings.margin):
            run.stats.backoffs += 1
            if self.retrying:  # a failed retry: wait longer before the next one
                self.hold = min(2 * self.hold, self.settings.max_hold)
            self.holding = self.hold
        else:  # early exit pays: keep it, re-time plain steps less and less often (the context grows)
            self.hold = self.settings.hold
            self.plain.refresh = min(2 * self.plain.refresh, self.settings.max_hold)
        self.retrying = False
        self.early, self.due = _Window(), self.settings.window
