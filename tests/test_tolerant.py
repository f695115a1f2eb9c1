"""kv="tolerant": ratio 1 is model.generate, tolerated drafts are exactly those within the ratio, the offline bound
holds for real generation, Learn-then-Test's ratio meets delta on its calibration prompts, and dx.tune tries it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaexit.calibration import InsufficientCalibrationData
from deltaexit.calibration.losses import token_disagreement
from deltaexit.calibration.tolerant import ToleranceTable, calibrate_tolerant, tolerance_table
from deltaexit.generation import EarlyExit, Tolerant, get_policy
from deltaexit.generation.tolerant import tolerated_logits
from deltaexit.testing import tiny_model
from deltaexit.tuning import TuneConfig, prompts_required, tune

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=4, hidden=32, heads=4, vocab=64, seed=5)


def _prompts(n: int, length: int = 4, offset: int = 0) -> list[torch.Tensor]:
    return [torch.randint(1, 64, (length,), generator=torch.Generator().manual_seed(offset + i)) for i in range(n)]


def _generate(model, policy, prompts, exit_layer=1, backoff=True) -> torch.Tensor:
    ee = EarlyExit(model, "delta-norm", -math.inf, policy, min_exit_layer=exit_layer, backoff=backoff)
    rows = []
    for p in prompts:
        out = ee.generate(p[None], max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        new = out[0, p.numel() :]
        rows.append(torch.cat([new, torch.zeros(NEW - new.numel(), dtype=new.dtype)]))
    return torch.stack(rows)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), exit_layer=st.integers(1, 3), num_draft=st.integers(1, 4))
def test_ratio_one_is_model_generate(model, seed, exit_layer, num_draft):
    ids = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(seed))
    ee = EarlyExit(model, "delta-norm", -math.inf, Tolerant(ratio=1.0, num_draft=num_draft), min_exit_layer=exit_layer)
    out = ee.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out, model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    ratio=st.floats(0.01, 1.0),
    batch=st.integers(1, 3),
    positions=st.integers(1, 4),
)
def test_tolerated_drafts_are_those_within_the_ratio(seed, ratio, batch, positions):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, positions + 1, 16, generator=gen) * 2
    drafts = [torch.randint(0, 16, (batch,), generator=gen) for _ in range(positions)]
    out = tolerated_logits(logits, drafts, ratio)
    probs = torch.softmax(logits, dim=-1)
    for i, d in enumerate(drafts):
        top = probs[:, i].max(dim=-1).values
        own = probs[:, i].gather(-1, d[:, None]).squeeze(-1)
        within = own >= ratio * top * (1 + 1e-5)  # clear of the rounding at the boundary
        outside = own < ratio * top * (1 - 1e-5)
        picked = out[:, i].argmax(dim=-1)
        assert bool((picked[within] == d[within]).all())  # accepted: at least every draft the strict rule takes
        assert torch.equal(picked[outside], logits[:, i].argmax(dim=-1)[outside])  # the rest keep the top-1
    assert torch.equal(out[:, positions], logits[:, positions])  # the bonus position is untouched
    strict = tolerated_logits(logits, drafts, 1.0).argmax(-1)[:, :positions]
    looser = out.argmax(-1)[:, :positions]
    for i, d in enumerate(drafts):  # accepted drafts per position: never fewer than ratio 1 accepts
        assert bool(((looser[:, i] == d) | (strict[:, i] != d)).all())


def test_a_tiny_ratio_accepts_every_early_exit_draft(model):
    ids = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    ee = EarlyExit(model, "delta-norm", -math.inf, Tolerant(ratio=1e-12, ngram=0), min_exit_layer=1, backoff=False)
    stats = ee.generate(ids, max_new_tokens=NEW, pad_token_id=0, return_dict_in_generate=True).stats
    strict = EarlyExit(model, "delta-norm", -math.inf, Tolerant(ngram=0), min_exit_layer=1, backoff=False)
    strict_stats = strict.generate(ids, max_new_tokens=NEW, pad_token_id=0, return_dict_in_generate=True).stats
    assert stats.drafted > 0 and stats.accepted == stats.drafted
    assert stats.accepted / stats.drafted >= strict_stats.accepted / max(strict_stats.drafted, 1)


@pytest.fixture(scope="module")
def table(model) -> ToleranceTable:
    return tolerance_table(model, _prompts(24), max_new_tokens=NEW)


@pytest.mark.parametrize("ratio", [0.8, 0.3])
@pytest.mark.parametrize("exit_layer", [1, 2])
def test_offline_bound_holds_for_real_generation(model, table, ratio, exit_layer):
    prompts = _prompts(8)
    early = _generate(model, Tolerant(ratio=ratio, num_draft=3), prompts, exit_layer)
    real = token_disagreement(early, table.continuations[:8], table.mask[:8])
    bound = table.losses(ratio, [exit_layer])[:8]
    assert bool((real <= bound + 1e-12).all()), (real.tolist(), bound.tolist())


def test_ltt_ratio_meets_delta_on_its_calibration_prompts(model, table):
    delta = 0.5  # the random tiny model's logits are near-flat: even ratio 0.99 tolerates many drafts
    result = calibrate_tolerant(table, delta=delta, epsilon=0.3, exit_layers=(1,), progress=False)
    assert result.certified and result.kv == "tolerant" and result.n == 24
    assert float(result.threshold) < 1.0  # a lossy ratio was certified (ratio 1 would pass trivially)
    early = _generate(model, Tolerant(ratio=float(result.threshold), num_draft=3), _prompts(24))
    realised = token_disagreement(early, table.continuations, table.mask)
    assert float(realised.mean()) <= delta
    assert float(table.losses(result.threshold, [1]).mean()) <= delta


def test_bad_input():
    for bad in (0.0, -0.5, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="ratio must lie in"):
            Tolerant(ratio=bad)  # type: ignore[arg-type]
    assert get_policy("tolerant") == Tolerant()
    margins = torch.full((3, 2, 4), -math.inf, dtype=torch.float64)
    small = ToleranceTable(margins, torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="largest"):
        calibrate_tolerant(small, delta=0.3, ratios=(0.5, 0.9), progress=False)
    with pytest.raises(ValueError, match="exit_layers"):
        small.losses(0.5, [4])
    with pytest.raises(InsufficientCalibrationData, match="calibration examples"):
        calibrate_tolerant(small, delta=0.01, progress=False)


def test_tune_tries_tolerant_at_its_certified_ratio(model):
    cfg = TuneConfig(tolerance=0.3, epsilon=0.3, max_new_tokens=4, repeats=1, progress=False, exit_layers=(1,),
                     draft_settings=({"num_draft": 2},), verify_thresholds=(), calibrated=(),
                     tolerant_exit_layers=(1,), tolerant_draft=({"num_draft": 3},))  # fmt: skip
    prompts = _prompts(prompts_required(cfg))
    result = tune(model, prompts, config=cfg)
    record = result.calibration[0]
    assert record["kv"] == "tolerant" and record["n"] == len(prompts) and record["exit_layer"] == 1
    tolerant = [r for r in result.results if r.candidate is not None and r.candidate.kv == "tolerant"]
    assert len(tolerant) == int(record["usable"])
    for r in tolerant:
        assert r.candidate.policy["ratio"] == record["threshold"] < 1.0 and r.candidate.calibrated
        assert r.stage == "rejected" or 1.0 - r.agreement <= 0.3
    with pytest.raises(ValueError, match="tolerant_exit_layers"):
        tune(model, prompts, config=cfg.with_settings(tolerant_exit_layers=(4,)))
