"""Tests for the speed-related parts of early-exit generation: cost accounting, recorder reuse, processors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from deltaexit.generation import EarlyExit, Verify
from deltaexit.generation.runner import BlockRunner
from deltaexit.generation.verify import AcceptanceTracker
from deltaexit.measures.base import ConfidenceMeasure, get_measure
from deltaexit.measures.cost import block_flops_per_token
from deltaexit.testing import ConstantScore, tiny_model

KW = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=4, hidden=32, heads=4, vocab=128, seed=3)


@pytest.mark.parametrize("kv", ["verify", "propagate", "recompute"])
@pytest.mark.parametrize("measure", ["softmax-max", "delta-norm"])
def test_measure_cost_enters_the_implied_speedup(model, kv, measure):
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    m = get_measure(measure)
    out = EarlyExit(model, m, 0.0, kv, min_exit_layer=2).generate(ids, return_dict_in_generate=True, **KW)
    s = out.stats
    context = (out.sequences.shape[1] + ids.shape[1]) // 2
    expected = m.flops_per_token(32, 128) / block_flops_per_token(model, context=context)
    assert s.measure_calls > 0
    assert s.measure_block_fraction == pytest.approx(expected)
    assert s.measure_block_equivalents == pytest.approx(s.measure_calls * expected)
    assert s.implied_speedup_with_measure == pytest.approx(
        s.full_depth_blocks / (s.blocks_run + s.measure_calls * expected)
    )
    assert s.implied_speedup_with_measure < s.implied_speedup
    d = s.to_dict()
    assert d["implied_speedup_with_measure"] == pytest.approx(s.implied_speedup_with_measure)


def test_never_exit_pays_no_measure(model):
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    s = EarlyExit(model, "softmax-max", math.inf, "verify").generate(ids, return_dict_in_generate=True, **KW).stats
    assert s.measure_calls == 0
    assert s.implied_speedup_with_measure == pytest.approx(s.implied_speedup) == pytest.approx(1.0)


def test_recorders_are_reused_and_the_block_list_restored(model):
    runner = BlockRunner(model)
    blocks = runner.blocks
    handle = runner.probe_output_type()
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids)
    handle.remove()
    h1, calls1 = runner.record(input_ids=ids, use_cache=False)
    recorders = runner._recorders
    h2, calls2 = runner.record(input_ids=ids[:, :4], use_cache=False)
    assert runner._recorders is recorders
    assert runner.structure.model.model.layers is blocks
    assert len(calls1) == len(calls2) == 4 and calls1 is not calls2
    assert h1.shape[1] == 6 and h2.shape[1] == 4
    # the first recording's calls were not overwritten by the second
    assert calls1[0].args[0].shape[1] == 6
    with torch.no_grad():
        h = h2
        for layer in range(4):
            h = runner.run_block(layer, h, calls2[layer])
        expected = model(ids[:, :4], output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(runner.structure.final_norm(h), expected, atol=1e-5)


class ForbidToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -math.inf
        return scores


class NeedsExtra(LogitsProcessor):
    def __call__(self, input_ids, scores, extra):
        return scores


@pytest.mark.parametrize("kv", ["verify", "propagate", "recompute"])
def test_custom_logits_processors_are_applied(model, kv):
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model.generate(ids, **KW)
    banned = int(plain[0, ids.shape[1]])
    procs = LogitsProcessorList([ForbidToken(banned)])
    with torch.no_grad():
        ref = model.generate(ids, logits_processor=procs, **KW)
    assert not (ref[:, ids.shape[1] :] == banned).any()
    threshold = math.inf if kv != "verify" else 0.0
    out = EarlyExit(model, ConstantScore(), threshold, kv, min_exit_layer=2).generate(ids, logits_processor=procs, **KW)
    assert torch.equal(out, ref)


def test_processor_needing_extra_arguments_raises(model):
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(ValueError, match="extra arguments"):
        EarlyExit(model, ConstantScore(), 0.0, "verify").generate(
            ids, logits_processor=LogitsProcessorList([NeedsExtra()]), **KW
        )


class Random(ConfidenceMeasure):
    name = "test-perf-random"

    def score(self, state):
        g = torch.Generator().manual_seed(1000 * state.layer + int(state.h_out.abs().sum() * 1e3) % 997)
        return torch.rand(state.h_out.shape[:-1], generator=g)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("rows", [1, 3])
def test_adaptive_draft_is_lossless(arch, rows):
    model = tiny_model(arch, num_layers=4, hidden=32, heads=4, vocab=128, seed=5)
    ids = torch.randint(3, 128, (rows, 6), generator=torch.Generator().manual_seed(rows))
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    for measure, threshold in ((Random(), 0.5), (ConstantScore(), 0.0)):
        ee = EarlyExit(model, measure, threshold, Verify(num_draft=5, adaptive=True), min_exit_layer=1)
        out = ee.generate(ids, return_dict_in_generate=True, **kw)
        assert torch.equal(out.sequences, ref)


def test_draft_budget_follows_the_acceptance_rate(model):
    ee = EarlyExit(model, ConstantScore(), 0.0, Verify(num_draft=6, adaptive=True), min_exit_layer=1)
    run = AcceptanceTracker(depth=1.0)
    budgets = []
    for rate in (0.0, 0.3, 0.6, 0.9, 0.99):
        run.rate = rate
        budgets.append(ee.policy.draft_budget(run, ee.num_layers))
    assert budgets[0] == 0  # drafts never accepted: plain full-depth steps
    assert budgets == sorted(budgets)  # more acceptance, more drafts
    assert budgets[-1] == 6
    run.rate, run.depth = 0.9, 4.0  # drafting as deep as the model: no point
    assert ee.policy.draft_budget(run, ee.num_layers) == 0


def test_adaptive_draft_stops_drafting_when_drafts_are_rejected(model):
    """Always exiting after block 1 of a random model: drafts are mostly rejected, so the budget falls to 0."""
    ids = torch.randint(3, 128, (4, 5), generator=torch.Generator().manual_seed(9))
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    fixed = EarlyExit(model, ConstantScore(), 0.0, Verify(num_draft=4)).generate(ids, **kw).stats
    adaptive = EarlyExit(model, ConstantScore(), 0.0, Verify(num_draft=4, adaptive=True)).generate(ids, **kw).stats
    assert fixed.acceptance_rate < 0.5
    assert adaptive.drafted < fixed.drafted
    assert adaptive.blocks_run < fixed.blocks_run


_HOST_READS = {
    torch.Tensor.__bool__,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
}


class _CountHostReads(torch.overrides.TorchFunctionMode):
    """Counts tensor-to-Python reads (each is a device sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kv", ["verify", "propagate", "recompute"])
@pytest.mark.parametrize("threshold", [0.9, 0.4])  # 0.9: scored at every block, never exits; 0.4: exits at once
def test_one_host_read_per_scored_block(model, kv, threshold):
    """The exit decision needs one device-to-host read per scored block; the loop adds at most two per step, and
    verify's n-gram lookup one per round (it reads the round's new tokens once)."""
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    ee = EarlyExit(model, ConstantScore(0.5), threshold, kv, min_exit_layer=1)
    with _CountHostReads() as reads:
        out = ee.generate(ids, return_dict_in_generate=True, min_new_tokens=8, **KW)
    steps = out.sequences.shape[1] - ids.shape[1]
    assert out.stats.measure_calls >= steps - 1
    lookups = out.stats.rounds if kv == "verify" else 0
    assert reads.count <= out.stats.measure_calls + 2 * steps + lookups + 8, (reads.count, out.stats.measure_calls)
