"""N-gram drafts in ``verify`` and the pay-off back-off (docs/generate.md), on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from deltaexit.generation import EarlyExit, Verify
from deltaexit.generation.backoff import Backoff, as_backoff, prior_cost
from deltaexit.generation.kv import cache_lengths
from deltaexit.generation.ngram import NgramIndex
from deltaexit.testing import ConstantScore, tiny_model

_MODELS: dict[tuple, torch.nn.Module] = {}


def model_of(arch: str = "llama", layers: int = 3, vocab: int = 128, seed: int = 0) -> torch.nn.Module:
    key = (arch, layers, vocab, seed)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, num_layers=layers, vocab=vocab, seed=seed)
    return _MODELS[key]


def repetitive(rows: int, length: int, seed: int, period: int = 4, vocab: int = 128) -> torch.Tensor:
    """Prompts that repeat a random pattern of ``period`` tokens per row (n-gram matches everywhere)."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(3, vocab, (rows, period), generator=g)
    return pattern.repeat(1, length // period + 1)[:, :length]


def generate_both(model, ee, ids, mask=None, **kw):
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, **kw}
    ref = model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kw)
    out = ee.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kw)
    return ref, out


class CostlyConstant(ConstantScore):
    """ConstantScore that declares a measure cost of 10 blocks per call (so early exit never pays)."""

    name = "test-costly-constant"

    def flops_per_token(self, hidden_size: int, vocab_size: int) -> float:
        return 1e12


class FullDepthChecker(BaseStreamer):
    """Checks after every token that every layer's cache has one length."""

    def __init__(self, cache):
        self.cache, self.puts, self.bad = cache, 0, []

    def put(self, value):
        self.puts += 1
        if self.puts > 1 and len(set(cache_lengths(self.cache))) != 1:
            self.bad.append(cache_lengths(self.cache))

    def end(self):
        pass


# ---------------------------------------------------------------- the n-gram index


def test_ngram_index_longest_latest_match_first():
    index = NgramIndex(max_n=3)
    assert index.update(torch.tensor([[7, 1, 2, 8, 1, 2, 9, 5, 1, 2]])) == [True]
    assert index.lookup(0, 2) == [9, 5]  # "1 2" twice before: the latest occurrence wins
    index.update(torch.tensor([[7, 1, 2, 8, 1, 2, 9, 5, 1, 2, 8]]))
    assert index.lookup(0, 5) == [1, 2, 9, 5, 1]  # "1 2 8" (n = 3) matched
    short = NgramIndex(max_n=2, min_n=2)
    short.update(torch.tensor([[4, 5, 6, 5]]))
    assert short.lookup(0, 3) == []  # only the unigram "5" occurred before


def naive_lookup(row: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The latest earlier occurrence of the longest suffix; its continuation, the row extended by its drafts."""
    size = len(row)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        ends = [e for e in range(n - 1, size - 1) if row[e - n + 1 : e + 1] == row[size - n :]]
        if ends:
            seq = list(row)
            for i in range(k):
                seq.append(seq[ends[-1] + 1 + i])
            return seq[size:]
    return []


@settings(max_examples=60, deadline=None)
@given(
    row=st.lists(st.integers(0, 4), min_size=1, max_size=30),
    k=st.integers(1, 40),
    max_n=st.integers(1, 4),
    split=st.integers(0, 30),
)
def test_ngram_lookup_matches_naive_search_and_repeats_past_the_end(row, k, max_n, split):
    index = NgramIndex(max_n=max_n)
    index.update(torch.tensor([row[: max(1, min(split, len(row)))]]))  # indexed in two updates
    index.update(torch.tensor([row]))
    found = index.lookup(0, k)
    assert found == naive_lookup(row, k, max_n, 1)
    assert len(found) in (0, k)  # a match drafts as many tokens as asked


@given(budget=st.integers(1, 16), drafted=st.integers(1, 16), accepted=st.integers(0, 16), most=st.integers(1, 16))
def test_ngram_budget_doubles_on_full_acceptance_else_halves(budget, drafted, accepted, most):
    accepted = min(accepted, drafted)
    nxt = Verify(ngram_draft=most).next_ngram_budget(budget, drafted, accepted)
    assert 1 <= nxt <= most
    if accepted == drafted:
        assert nxt == min(2 * budget, most)
    else:
        assert nxt == max(1, min(max(accepted + 1, budget // 2), most))


def test_ngram_drafts_same_length_for_every_active_row():
    index = NgramIndex(max_n=2)
    active = index.update(torch.tensor([[1, 2, 3, 4, 1, 2], [5, 6, 5, 6, 7, 5]]), torch.tensor([1, 1]))
    assert active == [True, True]
    assert index.drafts(active, 4) == [[3, 4, 1, 2], [6, 7, 5, 6]]  # row 1: "7 5" then the repeat of "5 6 7"
    assert index.drafts([True, False], 4) == [[3, 4, 1, 2], []]  # a finished row does not count
    none = NgramIndex(max_n=2)
    none.update(torch.tensor([[1, 2, 3, 1], [4, 5, 6, 7]]))
    assert none.drafts([True, True], 3) is None  # row 1 has no match: this round drafts with early exits


def test_bad_settings_raise():
    for kwargs in ({"ngram": -1}, {"ngram_draft": 0}, {"ngram_min": 0}, {"ngram": 2, "ngram_min": 3}):
        with pytest.raises(ValueError, match="ngram"):
            Verify(**kwargs)
    with pytest.raises(ValueError, match="signal"):
        Backoff(signal="flops")
    with pytest.raises(ValueError, match="max_hold"):
        Backoff(hold=64, max_hold=8)
    with pytest.raises(TypeError, match="backoff"):
        EarlyExit(model_of(), ConstantScore(), 0.5, backoff="yes")  # type: ignore[arg-type]
    assert as_backoff(True) == Backoff() and as_backoff(False) is None


# ---------------------------------------------------------------- n-gram drafts are lossless


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("threshold", [math.inf, 0.5])  # n-gram drafts only / both sources
def test_ngram_drafts_are_lossless(arch, threshold):
    model = model_of(arch)
    ids = repetitive(rows=1, length=12, seed=1)
    ee = EarlyExit(model, ConstantScore(1.0), threshold, Verify(num_draft=3, ngram=3), min_exit_layer=1)
    ref, out = generate_both(model, ee, ids, max_new_tokens=20)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out.scores, ref.scores))  # chunked pass: last bits
    assert out.stats.ngram_drafted > 0
    assert out.stats.ngram_accepted <= out.stats.ngram_drafted <= out.stats.drafted
    if threshold == math.inf:  # no exits: every draft was an n-gram draft
        assert out.stats.ngram_drafted == out.stats.drafted


def test_ngram_batch_rows_with_different_matches_and_padding():
    model = model_of()
    ids = torch.cat([repetitive(1, 10, seed=2, period=3), repetitive(1, 10, seed=3, period=5)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    for threshold in (math.inf, 0.5):
        ee = EarlyExit(model, ConstantScore(1.0), threshold, Verify(num_draft=2, ngram=2, ngram_draft=3))
        ref, out = generate_both(model, ee, ids, mask, max_new_tokens=16)
        assert torch.equal(out.sequences, ref.sequences)
        assert out.stats.ngram_drafted > 0


def test_ngram_eos_rows_finish_as_in_generate():
    model = model_of()
    ids = repetitive(rows=3, length=12, seed=4)
    free = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 3])  # a token row 0 generates: that row stops early
    ee = EarlyExit(model, ConstantScore(1.0), math.inf, Verify(ngram=3, ngram_draft=4))
    ref, out = generate_both(model, ee, ids, eos_token_id=eos)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out.scores, ref.scores))  # chunked pass: last bits
    assert (out.exit_layers == 0).any()


@pytest.mark.parametrize("new", [1, 2, 3, 5])
def test_ngram_drafts_stop_at_max_length(new):
    model = model_of()
    ids = repetitive(rows=2, length=9, seed=5)
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, Verify(num_draft=4, ngram=3, ngram_draft=8))
    ref, out = generate_both(model, ee, ids, max_new_tokens=new)
    assert out.sequences.shape == ref.sequences.shape
    assert torch.equal(out.sequences, ref.sequences)


@settings(max_examples=8, deadline=None)
@given(
    layers=st.integers(2, 4),
    rows=st.integers(1, 3),
    period=st.integers(2, 6),
    threshold=st.sampled_from([0.5, math.inf]),
    ngram=st.integers(1, 3),
    ngram_draft=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_ngram_lossless_property(layers, rows, period, threshold, ngram, ngram_draft, seed):
    model = model_of("llama", layers)
    ids = repetitive(rows, 10, seed, period=period)
    policy = Verify(num_draft=2, ngram=ngram, ngram_draft=ngram_draft)
    ee = EarlyExit(model, ConstantScore(1.0), threshold, policy, min_exit_layer=1)
    ref, out = generate_both(model, ee, ids, max_new_tokens=10)
    assert torch.equal(out.sequences, ref.sequences)


def test_ngram_sampling_matches_the_model_distribution():
    """Every row's last token occurs in the prompt, so every round drafts from n-grams (one-hot draft
    distribution); the (t1, t2) joint over 20000 rows is the model's exact one."""
    model = tiny_model("llama", num_layers=3, vocab=8, seed=3)
    rows = 20_000
    prompt = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 5, 3, 6, 4]])
    with torch.no_grad():
        p1 = torch.softmax(model(prompt).logits[0, -1].float(), -1)
        two = torch.cat([prompt.repeat(8, 1), torch.arange(8)[:, None]], dim=1)
        joint = p1[:, None] * torch.softmax(model(two).logits[:, -1].float(), -1)
    ee = EarlyExit(model, ConstantScore(1.0), math.inf, Verify(ngram=1, ngram_draft=1), backoff=False)
    torch.manual_seed(0)
    out = ee.generate(
        prompt.repeat(rows, 1), max_new_tokens=3, do_sample=True, eos_token_id=None, pad_token_id=0,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert out.stats.ngram_drafted == out.stats.drafted == 1  # one round: t2 drafted from an n-gram in every row
    new = out.sequences[:, prompt.shape[1] :]
    emp = torch.bincount(new[:, 0] * 8 + new[:, 1], minlength=64).float() / rows
    assert 0.5 * (emp - joint.reshape(-1)).abs().sum() < 0.04


# ---------------------------------------------------------------- back-off


@pytest.mark.parametrize("signal", ["time", "cost"])
def test_backoff_keeps_verify_lossless_when_always_exiting(signal):
    model = model_of()
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, Verify(num_draft=3), backoff=Backoff(signal, warmup=8, window=8))
    ref, out = generate_both(model, ee, ids, max_new_tokens=72)
    assert torch.equal(out.sequences, ref.sequences)


def test_rejected_drafts_back_off_and_stay_lossless():
    """Exiting after block 1 of a random 3-layer model: drafts are mostly rejected, a round costs more blocks per
    token than a plain step, so the run backs off (and retries); the output is still model.generate's."""
    model = model_of()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(7))
    settings_ = Backoff("cost", warmup=8, window=8, hold=8, max_hold=16)
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, Verify(num_draft=4, ngram=0), backoff=settings_)
    ref, out = generate_both(model, ee, ids, max_new_tokens=80)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out.scores, ref.scores))  # chunked pass: last bits
    stats = out.stats
    assert stats.backoffs >= 2 and stats.retries >= 1 and stats.backoff_steps >= 8
    assert stats.probe_steps == 0  # the cost signal knows a plain step's cost
    off = EarlyExit(model, ConstantScore(1.0), 0.5, Verify(num_draft=4, ngram=0), backoff=False)
    plain = generate_both(model, off, ids, max_new_tokens=80)[1].stats
    assert plain.backoffs == plain.backoff_steps == 0
    assert stats.blocks_run < plain.blocks_run  # backing off saved the wasted drafts


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_backed_off_steps_are_full_depth_steps(kv):
    """A measure too costly to pay: the run backs off; each backed-off token is the full model's next token given
    the prefix, with exit layer L, every layer's cache stays one length, and the blocks counted match."""
    model = model_of()
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(8))
    settings_ = Backoff("cost", warmup=4, window=4, hold=6, prior=False)  # no prior: it would start backed off
    ee = EarlyExit(model, CostlyConstant(), 0.5, kv, backoff=settings_)
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    checker_cache = DynamicCache()
    checker = FullDepthChecker(checker_cache)
    out = ee.generate(ids, cache=checker_cache, streamer=checker, **kw)
    assert not checker.bad
    stats = out.stats
    assert stats.backoffs >= 1 and stats.retries >= 1 and stats.backoff_steps >= 6
    exits = out.exit_layers[0].tolist()
    assert exits[1:5] == [1, 1, 1, 1] and exits[5:11] == [3] * 6  # 4 early-exit tokens, then 6 backed off
    if kv == "propagate":  # its cache holds the exited tokens' propagated K/V, so a full-depth step reads those
        return
    seq = out.sequences[0]
    p = ids.shape[1]
    with torch.no_grad():
        for i, layer in enumerate(exits):
            if layer == 3:
                assert int(model(seq[None, : p + i]).logits[0, -1].argmax()) == int(seq[p + i])


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), kv=st.sampled_from(["propagate", "recompute"]), hold=st.integers(2, 5))
def test_early_exit_that_cannot_pay_starts_backed_off(seed, kv, hold):
    """The cost model says a costly measure cannot pay: the call is backed off from its first token for 4 * hold
    tokens (exit layer L, the full model's tokens: model.generate's output), then retries early exit."""
    model = model_of()
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(seed))
    settings_ = Backoff("cost", warmup=2, window=2, hold=hold)
    ee = EarlyExit(model, CostlyConstant(), 0.5, kv, backoff=settings_)
    assert prior_cost(model, ee.scan, ee.policy.kv_only_per_skipped_block, 5) > ee.num_layers
    ref, out = generate_both(model, ee, ids, max_new_tokens=4 * hold + 1, eos_token_id=None)  # prompt's + held
    assert torch.equal(out.sequences, ref.sequences)
    assert out.exit_layers[0].tolist() == [3] * (4 * hold + 1)
    assert out.stats.backoffs == 1 and out.stats.backoff_steps == 4 * hold and out.stats.retries == 1
    longer = ee.generate(ids, max_new_tokens=4 * hold + 3, do_sample=False, pad_token_id=0, eos_token_id=None,
                         return_dict_in_generate=True)  # fmt: skip
    assert longer.exit_layers[0].tolist()[-2:] == [1, 1] and longer.stats.retries == 1  # the retry exits again
    free = EarlyExit(model, ConstantScore(), 0.5, kv, backoff=settings_)  # free decisions: exits from the start
    assert free.generate(ids, max_new_tokens=2, pad_token_id=0, return_dict_in_generate=True).stats.backoffs == 0


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 1000),
    kv=st.sampled_from(["propagate", "recompute"]),
    threshold=st.sampled_from([0.02, 0.05, 0.2]),
    prior=st.booleans(),
)
def test_cost_signal_tokens_do_not_depend_on_the_run(seed, kv, threshold, prior):
    """The lossy defaults' cost signal is deterministic: two EarlyExit objects, and two calls of one, give the same
    tokens, exits and back-off counters (whatever the machine's speed)."""
    model = model_of(vocab=128, seed=1)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(seed))
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    backoff = Backoff("cost", warmup=4, window=8, hold=4, prior=prior)
    a = EarlyExit(model, "softmax-max", threshold, kv, backoff=backoff)
    b = EarlyExit(model, "softmax-max", threshold, kv, backoff=backoff)
    outs = [a.generate(ids, **kw), b.generate(ids, **kw), a.generate(ids, **kw)]
    for other in outs[1:]:
        assert torch.equal(other.sequences, outs[0].sequences)
        assert torch.equal(other.exit_layers, outs[0].exit_layers)
        assert (other.stats.backoffs, other.stats.retries) == (outs[0].stats.backoffs, outs[0].stats.retries)


def test_lossy_defaults_judge_the_cost_signal_early():
    assert (as_backoff(True, "propagate").warmup, as_backoff(True, "propagate").window) == (4, 8)
    assert as_backoff(True, "recompute").signal == "cost" and as_backoff(True, "recompute").prior
    assert as_backoff(True, "tolerant") == Backoff(signal="cost")  # rounds of drafts: its own warm-up


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_prior_of_an_always_exit_threshold_is_its_first_exit(kv):
    """Threshold -inf: every token exits at the first scored layer, so the prior is that exit's cost (below L for a
    free measure: no back-off from the start); a costly measure is priced above L."""
    model = model_of()
    ee = EarlyExit(model, ConstantScore(), -math.inf, kv, min_exit_layer=2)
    first = prior_cost(model, ee.scan, ee.policy.kv_only_per_skipped_block, 6)
    assert 2 <= first < 3
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    out = ee.generate(ids, max_new_tokens=6, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert out.stats.backoffs == 0 and out.exit_layers[0, 1:].tolist() == [2] * 5
    costly = EarlyExit(model, CostlyConstant(), -math.inf, kv, min_exit_layer=2)
    assert prior_cost(model, costly.scan, costly.policy.kv_only_per_skipped_block, 6) > 3


def test_never_exit_with_ngram_drafts_matches_generate():
    model = model_of("gpt2")
    ids = repetitive(rows=2, length=8, seed=9)
    ee = EarlyExit(model, ConstantScore(1.0), math.inf, "verify")
    ref, out = generate_both(model, ee, ids, max_new_tokens=16)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats.blocks_run <= out.stats.full_depth_blocks


def test_plain_step_times_carry_over_calls_per_batch_size():
    """signal="time": the first call probes a plain step's time; a later call of the same batch size reuses it
    (no probe), one of another batch size probes its own; output stays model.generate's."""
    model = model_of()
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(10))
    settings_ = Backoff("time", warmup=4, window=1000, probe=2)
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, Verify(num_draft=2, ngram=0), backoff=settings_)
    first = generate_both(model, ee, ids, max_new_tokens=12)[1].stats
    ref, again = generate_both(model, ee, ids, max_new_tokens=12)
    assert first.probe_steps == 2 and again.stats.probe_steps == 0
    assert torch.equal(again.sequences, ref.sequences)
    assert generate_both(model, ee, ids.repeat(2, 1), max_new_tokens=12)[1].stats.probe_steps == 2
    assert sorted(ee.plain_times) == [1, 2] and all(p.times for p in ee.plain_times.values())


class RecordingVerify(Verify):
    """Verify that notes every round's draft tokens (row 0)."""

    def _verify(self, run, scan, start, chunk, ids, kwargs, *args):
        self.drafts.append([int(t[0]) for t in chunk.tokens])  # type: ignore[attr-defined]
        return super()._verify(run, scan, start, chunk, ids, kwargs, *args)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), threshold=st.sampled_from([0.5, math.inf]), eos_share=st.integers(5, 40))
def test_drafting_stops_at_an_end_of_sequence_token(seed, threshold, eos_share):
    """No round drafts past an end-of-sequence draft (its output would stop there), from either source; the
    output stays model.generate's."""
    model = model_of()
    ids = repetitive(1, 10, seed, period=3)
    eos = torch.randperm(128, generator=torch.Generator().manual_seed(seed))[:eos_share].tolist()
    policy = RecordingVerify(num_draft=4, ngram=2, ngram_draft=8)
    object.__setattr__(policy, "drafts", [])
    ee = EarlyExit(model, ConstantScore(1.0), threshold, policy, min_exit_layer=1, backoff=False)
    ref, out = generate_both(model, ee, ids, max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(t not in eos for drafts in policy.drafts for t in drafts[:-1])  # type: ignore[attr-defined]
