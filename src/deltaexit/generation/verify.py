"""``kv="verify"`` (LayerSkip self-speculation): early exits only draft; the full model verifies them.

A round drafts up to ``num_draft`` tokens, each from a scan that every row exits (a row that does not ends the
drafting); the shallow layers' cache is the drafts'. The deep layers then run once over the whole chunk, the
full model's scores accept the longest agreeing prefix (greedy) or apply the speculative-sampling rule
(:mod:`deltaexit.generation.speculative`), and the cache is cropped after the last emitted token. The output is
the full model's (lossless); only the speed depends on the exits.

With ``adaptive=True`` each round's draft budget is chosen in ``0..num_draft`` from the running acceptance rate
and draft depth (:class:`AcceptanceTracker`), maximising expected tokens per block.

Example:
    >>> import torch
    >>> from deltaexit.generation.early_exit import EarlyExit
    >>> from deltaexit.testing import ConstantScore, tiny_model
    >>> model = tiny_model("llama", num_layers=4)
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> ee = EarlyExit(model, ConstantScore(), 0.5, Verify(num_draft=2), min_exit_layer=2)
    >>> out = ee.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    >>> torch.equal(out.sequences, model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from deltaexit.generation.kv import cache_length, cache_view, crop_cache, set_cache_length
from deltaexit.generation.ngram import NgramIndex
from deltaexit.generation.policy import KVPolicy, register_policy
from deltaexit.generation.recurrent import RecurrentRound
from deltaexit.generation.run import Run
from deltaexit.generation.scan import ExitScan
from deltaexit.generation.speculative import speculative_token

__all__ = ["AcceptanceTracker", "Verify", "VerifyState"]


@dataclass
class AcceptanceTracker:
    """``verify``'s running per-draft acceptance rate and draft depth in one ``generate`` call (``adaptive``).

    Attributes:
        rate: Running per-draft acceptance rate (optimistic start).
        depth: Running depth the drafts exit at.
    """

    rate: float = 0.8
    depth: float = 1.0

    def learn(self, drafted: int, accepted: int, depth: int, prior: float) -> None:
        """Update the running rate and depth (exponential moving averages) after a round."""
        if drafted == 0:  # no evidence this round: drift back to the prior so drafting is retried
            self.rate += 0.1 * (prior - self.rate)
            return
        failures = 1 if accepted < drafted else 0
        rate = accepted / (accepted + failures)
        self.rate = 0.6 * self.rate + 0.4 * rate
        self.depth = 0.6 * self.depth + 0.4 * depth


@dataclass
class _Chunk:
    """One round's drafts: the scans' block outputs, the draft tokens, their exits and draft probabilities."""

    states: list[list[torch.Tensor]] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    exits: list[torch.Tensor] = field(default_factory=list)
    probs: list[torch.Tensor | None] = field(default_factory=list)
    depth: int = 0  # the shallowest draft exit: the layers below share the drafts' cache


@dataclass
class VerifyState:
    """``verify``'s per-call state: the acceptance tracker (``adaptive``) and the n-gram index (``ngram > 0``)."""

    tracker: AcceptanceTracker
    index: NgramIndex | None = None
    ngram_budget: int = 1  # the next n-gram round's most drafts (Verify.next_ngram_budget)


def _verify_depth(scan: ExitScan, chunk: _Chunk) -> int:
    """The first block the verify pass runs: the shallowest draft exit; where a block there takes the block
    before's extra output (:attr:`~deltaexit.generation.runner.BlockRunner.carried`), the first block of that chain
    (:meth:`~deltaexit.generation.runner.BlockRunner.chain_start`), so every block of the pass is handed it; 0 where
    the model keeps no cache (:attr:`ExitScan.prefix`: the pass runs the whole sequence). Where a block below that
    stores state that deeper blocks read in the same forward (KV shared between layers:
    :attr:`~deltaexit.generation.runner.BlockRunner.shared_writers`), the pass starts at the first such block, so
    the deep blocks read it over the whole chunk."""
    if scan.prefix:
        return 0
    depth = scan.runner.chain_start(chunk.depth)
    below = [layer for layer in scan.runner.shared_writers if layer < depth < scan.num_layers]
    return min(below, default=depth)


@register_policy
@dataclass(frozen=True)
class Verify(KVPolicy):
    """LayerSkip's self-speculation: early exits draft, the full model verifies (lossless).

    Args:
        num_draft: Most early-exit draft tokens per round.
        adaptive: Choose each round's early-exit draft budget in ``0..num_draft`` from the running acceptance
            rate and draft depth, maximising expected tokens per block (0 = a plain full-depth step when drafts
            keep being rejected, e.g. at batch > 1 where every row must accept). Output is unchanged; only the
            speed differs.
        ngram: Longest n-gram looked up in the prompt and output so far (prompt-lookup drafts, no compute);
            0 turns n-gram drafts off. A round whose last tokens matched earlier ones in every unfinished row
            drafts the tokens that followed (:mod:`deltaexit.generation.ngram`); otherwise it drafts with early
            exits.
        ngram_draft: Most n-gram draft tokens per round. A call's first n-gram round drafts this many; later
            rounds double the count after every draft was accepted and halve it otherwise
            (:meth:`next_ngram_budget`).
        ngram_min: Shortest n-gram looked up.
    """

    name: ClassVar[str] = "verify"
    #: Per-forward overhead (recording pass, lens, bookkeeping) in block equivalents, for the draft budget.
    FORWARD_OVERHEAD_BLOCKS: ClassVar[float] = 1.0
    #: The acceptance rate a round without drafts drifts back to.
    ACCEPT_PRIOR: ClassVar[float] = 0.5

    num_draft: int = 4
    adaptive: bool = False
    ngram: int = 3
    ngram_draft: int = 16
    ngram_min: int = 1

    def __post_init__(self) -> None:
        for name, low in (("num_draft", 1), ("ngram", 0), ("ngram_draft", 1), ("ngram_min", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.ngram and self.ngram_min > self.ngram:
            raise ValueError(f"ngram_min ({self.ngram_min}) must be <= ngram ({self.ngram}); or set ngram=0 (off)")

    def start(self, scan: ExitScan) -> VerifyState:
        """Fresh per-call state: an acceptance tracker (drafts start at ``min_exit_layer``), an empty n-gram index."""
        index = NgramIndex(self.ngram, self.ngram_min) if self.ngram else None
        return VerifyState(AcceptanceTracker(depth=float(scan.min_exit_layer)), index, self.ngram_draft)

    def draft_budget(self, tracker: AcceptanceTracker, num_layers: int) -> int:
        """Drafts to allow this round: argmax over k of expected tokens per block-equivalent of cost."""
        alpha = min(max(tracker.rate, 0.0), 0.99)
        L, o = num_layers, self.FORWARD_OVERHEAD_BLOCKS
        m = min(max(tracker.depth, 1.0), L)
        best_k, best = 0, 1.0 / (L + o)  # k = 0: one plain full-depth step
        tokens = 1.0
        for k in range(1, self.num_draft + 1):
            tokens += alpha**k  # expected emitted tokens with k drafts: 1 + a + ... + a^k
            cost = (k + 1) * (m + o) + (L - m) + o
            if tokens / cost > best:
                best_k, best = k, tokens / cost
        return best_k

    def next_ngram_budget(self, budget: int, drafted: int, accepted: int) -> int:
        """The next n-gram round's most drafts: doubled (up to ``ngram_draft``) after a round that accepted every
        n-gram draft, else halved but not below one more than the accepted ones. N-gram drafts cost no compute,
        only positions in the verify pass (a few percent of a pass each at batch 1 on CPU).

        Example:
            >>> Verify(ngram_draft=16).next_ngram_budget(4, 4, 4), Verify().next_ngram_budget(16, 16, 3)
            (8, 8)
        """
        grown = 2 * budget if accepted == drafted else max(accepted + 1, budget // 2)
        return max(1, min(grown, self.ngram_draft))

    def step(self, run: Run, scan: ExitScan, state: VerifyState) -> None:
        """One draft/verify round: emits between 1 and ``max(num_draft, ngram_draft) + 1`` tokens per row."""
        start = cache_length(run.cache)  # x0 (the last token) is in input_ids, not yet in the cache
        rounds = RecurrentRound.begin(run.cache, start, run.model)  # recurrent states: snapshot before the drafts
        # drafts that fit before max_length (the round also emits the full model's token after them)
        room = run.max_length - run.input_ids.shape[1] - 1 if run.max_length is not None else self.num_draft
        found = None
        if state.index is not None:
            k_ngram = min(state.ngram_budget, room) if run.max_length is not None else state.ngram_budget
            found = self._ngram_chunk(run, state.index, k_ngram)
        if found is not None:
            chunk, ids, kwargs = found
        else:
            k_max = max(0, min(self.num_draft, room))
            if self.adaptive:
                k_max = min(k_max, self.draft_budget(state.tracker, scan.num_layers))
            chunk, ids, kwargs = self._draft(run, scan, start, k_max)
        target = self._verify(run, scan, start, chunk, ids, kwargs, rounds)
        emitted, exits, scores = self._accept(run, chunk, target)
        self._count(run, state, chunk, len(emitted) - 1, ngram=found is not None)
        appended = 0
        for i, (tok, ex) in enumerate(zip(emitted, exits)):
            run.append(tok, ex, scores[i], target[:, i])
            appended += 1
            # A row that just finished is fed padding from here on by model.generate; the rest of this chunk was
            # verified on its drafts instead, so stop here and let the next round continue from padding.
            if run.done or run.just_finished:
                break
        crop_cache(run.cache, start + appended)
        if rounds is not None:  # rejected drafts: the recurrent blocks re-run on the kept tokens
            rounds.keep(scan, run.stats, chunk.states, _verify_depth(scan, chunk), ids, kwargs, appended)
        set_cache_length(run.cache, start + appended)

    def _count(self, run: Run, state: VerifyState, chunk: _Chunk, accepted: int, *, ngram: bool) -> None:
        """Record a round in the stats (and in the tracker, for early-exit drafts)."""
        drafted = len(chunk.tokens)
        if ngram:
            run.stats.ngram_drafted += drafted
            run.stats.ngram_accepted += accepted
            state.ngram_budget = self.next_ngram_budget(state.ngram_budget, drafted, accepted)
        elif self.adaptive:
            state.tracker.learn(drafted, accepted, chunk.depth, self.ACCEPT_PRIOR)
        run.stats.drafted += drafted
        run.stats.accepted += accepted
        run.stats.rounds += 1

    def _ngram_chunk(self, run: Run, index: NgramIndex, k_max: int):
        """N-gram drafts for every row (None without a match in every unfinished row, or without room): a chunk
        of depth 0, so the verify pass runs every layer over it."""
        active = index.update(run.input_ids, run.unfinished)
        if k_max < 1:
            return None
        found = index.drafts(active, k_max)
        if found is None:
            return None
        n = len(next(f for f in found if f))
        if run.eos_ids:  # the round's output stops at an end-of-sequence token if it is accepted: draft no further
            n = min(next((i + 1 for i, t in enumerate(f) if t in run.eos_ids), n) for f, on in zip(found, active) if on)
        pad = int(run.pad) if run.pad is not None else 0
        columns = torch.tensor([f[:n] if f else [pad] * n for f in found], device=run.input_ids.device).T
        full = torch.full_like(run.unfinished, run.num_layers)
        # depth 0: the verify pass runs every layer over the n-gram drafts; their draft probabilities are one-hot
        # (made in _accept when sampling)
        chunk = _Chunk(tokens=list(columns), exits=[full] * n, probs=[None] * n, depth=0)
        ids, kwargs = run.extended(run.input_ids, run.model_kwargs, columns.T)
        return chunk, ids, kwargs

    def _draft(self, run: Run, scan: ExitScan, start: int, k_max: int):
        """Draft up to ``k_max`` tokens; the last scan (one that did not draft) runs to the shallowest exit."""
        ids, kwargs = run.input_ids, run.model_kwargs
        chunk = _Chunk(depth=scan.num_layers)
        ended: torch.Tensor | None = None  # whether the latest draft ends a row, read with the next scan's decision
        while True:
            j = len(chunk.tokens)
            res = scan.forward(
                run,
                ids,
                kwargs,
                start + j,
                max_depth=chunk.depth,
                exits=j < k_max,
                freeze=False,
                keep_states=True,
                step=run.step + j,
                read_with=ended if j < k_max else None,
            )
            assert res.states is not None
            chunk.states.append(res.states)
            if res.read:  # the latest draft ends a row: if accepted, the round's output stops there; this scan
                chunk.depth = min(chunk.depth, res.depth)  # is the last one (its states reach the verify depth)
                return chunk, ids, kwargs
            if j >= k_max or not res.all_exited:
                return chunk, ids, kwargs
            token, probs, _ = run.choose(ids, res.logits_fn())
            if run.has_eos:  # rows already finished are fed padding, as model.generate feeds them
                token = token * run.unfinished + run.pad * (1 - run.unfinished)
            chunk.tokens.append(token)
            chunk.exits.append(res.exit_layer)
            chunk.probs.append(probs)
            ids, kwargs = run.extended(ids, kwargs, token)
            chunk.depth = min(chunk.depth, res.depth)
            ended = run.ends_a_row(token)

    def _verify(self, run: Run, scan: ExitScan, start: int, chunk: _Chunk, ids, kwargs, rounds=None) -> torch.Tensor:
        """``[B, n_chunk, V]`` float32 full-model logits over the chunk: the deep layers run once over it, the
        shallow layers' cache (below the shallowest exit) is the drafts'. N-gram chunks (depth 0) have run no
        block yet: every layer runs over them here."""
        m, L, n_chunk = _verify_depth(scan, chunk), scan.num_layers, len(chunk.tokens) + 1
        crop_cache(run.cache, start, range(m, L))
        if rounds is not None:
            rounds.reset(range(m, L))
        if m == L:  # each draft scan's token is its last position (a block may widen one token, e.g. RWKV's)
            h = torch.cat([states[m][:, -1:] for states in chunk.states], dim=1)
        elif rounds is not None and rounds.stepwise:  # recurrent layers that take one token at a time
            h = rounds.run_deep(scan, run.stats, ids, kwargs, chunk.states, m)
        else:
            with cache_view(run.cache, start):
                hidden, calls = scan.runner.record(**scan.model_inputs(ids, kwargs, start, start + n_chunk))
            h = hidden if m == 0 else torch.cat([states[m] for states in chunk.states], dim=1)
            h = scan.run_blocks(h, calls, range(m, L), run.stats, rounds.inputs if rounds is not None else None)
        return scan.lens(h[:, -n_chunk:]).float()  # (a model that keeps no cache ran the whole sequence)

    def _accept(self, run: Run, chunk: _Chunk, target: torch.Tensor):
        """The tokens to emit (the accepted drafts, then a correction or the bonus token), their exit layers and
        the full model's processed scores at each."""
        active = run.unfinished.bool()
        emitted: list[torch.Tensor] = []
        exits: list[torch.Tensor] = []
        step_scores: list[torch.Tensor] = []  # the full model's processed scores at each emitted position
        full = torch.full_like(run.unfinished, run.num_layers)
        prefix = run.input_ids
        n_chunk = len(chunk.tokens) + 1
        for i in range(n_chunk):
            scores = run.scores(prefix, target[:, i])
            step_scores.append(scores)  # every iteration emits exactly one token
            if i == n_chunk - 1:  # every draft so far accepted by all rows: the bonus token
                tok, _ = run.pick(scores)
                emitted.append(tok)
                exits.append(full)
                break
            draft = chunk.tokens[i]
            if run.do_sample:
                probs = chunk.probs[i]
                if probs is None:  # an n-gram draft: a one-hot draft distribution (accepted with p(draft))
                    probs = torch.nn.functional.one_hot(draft, scores.shape[-1]).to(scores.dtype)
                ok, tok = speculative_token(draft, torch.softmax(scores, dim=-1), probs)
                keep = bool(ok[active].all())
            else:
                tok = scores.argmax(dim=-1)
                ok = tok == draft
                keep = bool(ok[active].all())
            if keep:
                emitted.append(draft)
                exits.append(chunk.exits[i])
                prefix = torch.cat([prefix, draft[:, None]], dim=-1)
                continue
            emitted.append(tok)
            exits.append(torch.where(ok, chunk.exits[i], full) if run.do_sample else full)
            break
        return emitted, exits, step_scores
