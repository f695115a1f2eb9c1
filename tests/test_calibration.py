"""dx.calibrate: synthetic validity over random splits, save/load, the offline simulator, the adapters."""

from __future__ import annotations

import itertools
import json
import math
from functools import partial
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltaexit as dx
from deltaexit.calibration import (
    CalibrationConfig,
    CalibrationFileError,
    CalibrationResult,
    CalmDecay,
    GenerationLosses,
    InsufficientCalibrationData,
    calibrate,
    candidate_thresholds,
    continuation_table,
    exit_table,
    greedy_continuations,
    hb_pvalue,
    learn_then_test,
    min_examples,
    prompts_needed,
    risk_consistency,
    sequence_disagreement,
    token_disagreement,
)
from deltaexit.calibration import result as calibration_result
from deltaexit.calibration import risk as calibration_risk
from deltaexit.calibration.ltt import fixed_sequence_test
from deltaexit.measures.base import ConfidenceMeasure, LayerState
from deltaexit.testing import tiny_model

SETTINGS = settings(max_examples=25, deadline=None)


class MaxProb(ConfidenceMeasure):
    """Test-local softmax response (the built-in measures live in another module)."""

    name: ClassVar[str] = "test-calib-maxprob"
    needs_lens: ClassVar[bool] = True

    def score(self, state: LayerState) -> torch.Tensor:
        return torch.softmax(state.logits.float(), dim=-1).amax(dim=-1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=3, hidden=32, heads=4, vocab=64, seed=1)


@pytest.fixture(scope="module")
def texts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (12, 10), generator=g)
    mask = torch.ones_like(ids)
    for i in range(0, 12, 3):  # some left padding, some right padding
        mask[i, :3] = 0
        mask[i + 1, -2:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def table(model, texts):
    ids, mask = texts
    return exit_table(model, ids, mask, MaxProb(), batch_size=5)


def _column(losses: torch.Tensor, j: int) -> torch.Tensor:
    return losses[:, j]


# -- validity over random calibration/test splits (synthetic, known risk curve) ----------------------
def _split_failures(true_risks: torch.Tensor, n: int, splits: int, delta: float, epsilon: float, seed: int):
    """Share of splits where LTT's (and a naive rule's) chosen candidate has true risk > delta."""
    g = torch.Generator().manual_seed(seed)
    ltt_fail = naive_fail = 0
    for _ in range(splits):
        u = torch.rand(n, 1, generator=g, dtype=torch.float64)
        losses = (u < true_risks[None]).to(torch.float64)  # [n, K]; E[loss_j] = true_risks[j]
        out = learn_then_test(partial(_column, losses), range(len(true_risks)), delta=delta, epsilon=epsilon)
        if out.index >= 0 and true_risks[out.index] > delta:
            ltt_fail += 1
        hat = losses.mean(0)
        naive = fixed_sequence_test([0.0 if float(r) <= delta else 1.0 for r in hat], epsilon)
        if naive >= 0 and true_risks[naive] > delta:
            naive_fail += 1
    return ltt_fail / splits, naive_fail / splits


@pytest.mark.parametrize("delta", [0.05, 0.1])
def test_guarantee_holds_over_random_splits(delta):
    epsilon, splits = 0.1, 100
    true_risks = torch.linspace(0.0, 2 * delta, 25, dtype=torch.float64)  # crosses delta slowly
    ltt, naive = _split_failures(true_risks, n=400, splits=splits, delta=delta, epsilon=epsilon, seed=7)
    slack = 3 * math.sqrt(epsilon * (1 - epsilon) / splits)
    assert ltt <= epsilon + slack
    # The check has power: picking by the empirical risk alone breaks the promise.
    assert naive > epsilon + slack


def test_guarantee_is_not_vacuous():
    """With a clear margin LTT does certify aggressive candidates (it is not just 'never exit')."""
    true_risks = torch.tensor([0.0, 0.001, 0.005, 0.01, 0.02, 0.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(2000, 1, generator=g, dtype=torch.float64)
    losses = (u < true_risks[None]).to(torch.float64)
    out = learn_then_test(lambda j: losses[:, j], range(6), delta=0.05, epsilon=0.1)
    assert out.index == 4


# -- dx.calibrate with a custom loss ------------------------------------------------------------------
def test_calibrate_with_custom_losses():
    assert dx.calibrate is calibrate and dx.CalibrationResult is CalibrationResult
    curve = {1.0: 0.0, 0.8: 0.0, 0.6: 0.02, 0.4: 0.2, 0.2: 0.0}
    r = calibrate(losses=lambda t: torch.full((500,), curve[t]), thresholds=list(curve), delta=0.05, epsilon=0.1)
    assert r.certified and r.threshold == 0.6 and r.index == 2
    assert r.n == 500 and r.delta == 0.05 and r.epsilon == 0.1
    assert r.pvalues[2] == pytest.approx(hb_pvalue(0.02, 500, 0.05))
    assert len(r.pvalues) == 4  # stopped at 0.4; 0.2 (risk 0 again) is never reached
    assert r.min_examples == min_examples(0.05, 0.1)
    assert "0.6" in r.summary()
    nothing = calibrate(losses=lambda t: torch.full((500,), 0.3), thresholds=[1.0, 0.5], delta=0.05, epsilon=0.1)
    assert not nothing.certified and nothing.threshold is None and nothing.schedule() == math.inf
    assert "nothing certified" in nothing.summary()


def test_too_few_examples_error_says_how_many(model):
    with pytest.raises(InsufficientCalibrationData, match="at least 230"):
        calibrate(losses=lambda t: torch.zeros(100), thresholds=[0.5], delta=0.01, epsilon=0.1)

    class Exploding(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("the model must not run before the sample size is checked")

        def generate(self, *a, **k):
            raise AssertionError("the model must not run before the sample size is checked")

    prompts = [torch.tensor([1, 2, 3])] * 50
    with pytest.raises(InsufficientCalibrationData, match=r"at least 45 .*10 more prompts"):
        calibrate(Exploding(), prompts, measure=MaxProb(), delta=0.05, epsilon=0.1)
    with pytest.raises(InsufficientCalibrationData, match="at least 45"):
        calibrate(Exploding(), prompts[:44], measure=MaxProb(), delta=0.05, epsilon=0.1, thresholds=[0.5])


def test_too_few_prompts_error_says_how_many_prompts():
    """The error gives the examples needed and the prompts to pass once the grid share is set aside."""

    class Exploding(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("the model must not run before the sample size is checked")

    prompts = [torch.tensor([1, 2, 3])] * 56
    with pytest.raises(
        InsufficientCalibrationData, match=r"at least 45 calibration examples.*grid_fraction=0.2.*56 prompts"
    ):
        calibrate(Exploding(), prompts[:50], measure=MaxProb(), delta=0.05, epsilon=0.1)
    with pytest.raises(InsufficientCalibrationData):
        calibrate(Exploding(), prompts[:55], measure=MaxProb(), delta=0.05, epsilon=0.1)
    assert prompts_needed(45, 0.2) == 56
    with pytest.raises(Exception) as failure:  # 56 prompts pass the size check (then the stand-in fails)
        calibrate(Exploding(), prompts, measure=MaxProb(), delta=0.05, epsilon=0.1, backend="offline")
    assert not isinstance(failure.value, InsufficientCalibrationData)


def test_calibrate_shows_progress_by_default(capsys):
    curve = lambda t: torch.zeros(100)  # noqa: E731
    calibrate(losses=curve, thresholds=[1.0, 0.5], delta=0.05, epsilon=0.1)
    assert "calibrating" in capsys.readouterr().err
    calibrate(losses=curve, thresholds=[1.0, 0.5], delta=0.05, epsilon=0.1, progress=False)
    assert capsys.readouterr().err == ""


def test_config_and_keyword_overrides():
    base = CalibrationConfig(delta=0.5, epsilon=0.2, progress=False)
    curve = lambda t: torch.zeros(100)  # noqa: E731
    r = calibrate(losses=curve, thresholds=[1.0, 0.5], config=base, delta=0.05)
    assert (r.delta, r.epsilon) == (0.05, 0.2)  # keywords override the config
    assert base.delta == 0.5  # the config itself is not changed
    with pytest.raises(TypeError, match="unknown calibration setting"):
        calibrate(losses=curve, thresholds=[1.0], config=base, deltaa=0.1)
    with pytest.raises(ValueError, match="backend"):
        CalibrationConfig(backend="simulate")


def test_calibrate_bad_arguments():
    with pytest.raises(ValueError, match="delta"):
        calibrate(losses=lambda t: torch.zeros(10), thresholds=[1.0], delta=0.0)
    with pytest.raises(ValueError, match="schedule"):
        calibrate(losses=lambda t: torch.zeros(10), thresholds=[1.0], schedule="linear")
    with pytest.raises(ValueError, match="thresholds="):
        calibrate(losses=lambda t: torch.zeros(10))
    with pytest.raises(ValueError, match="references"):
        calibrate(torch.nn.Linear(1, 1), [torch.tensor([1])], loss="risk", backend="offline")


# -- save / load ----------------------------------------------------------------------------------------
def _result(kind="constant") -> CalibrationResult:
    cands = [math.inf, 0.9, 0.5] if kind != "per-layer" else [[math.inf, math.inf], [0.9, 0.8], [0.5, 0.4]]
    return CalibrationResult(
        delta=0.05, epsilon=0.1, n=300, threshold=cands[1], kind=kind, measure="softmax-max", kv="propagate",
        index=1, candidates=cands, pvalues=[1e-7, 0.01, 0.3], risks=[0.0, 0.02, 0.07], min_examples=45,
        max_new_tokens=16, backend="offline", info={"model": "tiny"},
        losses=torch.rand(3, 300, dtype=torch.float64),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["constant", "per-layer", "decaying"])
def test_save_load_round_trip(tmp_path, kind):
    r = _result(kind)
    r.save(tmp_path / "m")
    back = CalibrationResult.load(tmp_path / "m")
    assert back.to_dict() == r.to_dict()
    assert torch.equal(back.losses, r.losses)
    assert back.candidates[0] == (math.inf if kind != "per-layer" else [math.inf, math.inf])
    assert CalibrationResult.load(tmp_path / "m" / "calibration.json").threshold == r.threshold
    d = json.loads((tmp_path / "m" / "calibration.json").read_text())
    assert d["format_version"] == 1 and d["delta"] == 0.05 and d["n"] == 300
    if kind == "decaying":
        sched = back.schedule()
        assert sched.values(0, 2)[0] == pytest.approx(0.9 * 0.9 + 0.1)


def test_save_next_to_measure_and_bad_files(tmp_path):
    class SavedMeasure:
        def save(self, path):
            (path / "measure.json").write_text("{}")

    r = _result()
    r.losses = None
    r.save(tmp_path, measure=SavedMeasure())
    assert (tmp_path / "measure.json").is_file() and not (tmp_path / "calibration.safetensors").exists()
    assert CalibrationResult.load(tmp_path).losses is None
    (tmp_path / "calibration.json").write_text("{not json")
    with pytest.raises(CalibrationFileError, match="corrupt"):
        CalibrationResult.load(tmp_path)
    d = _result().to_dict()
    d["format_version"] = 99
    (tmp_path / "calibration.json").write_text(json.dumps(d))
    with pytest.raises(CalibrationFileError, match="version"):
        CalibrationResult.load(tmp_path)
    with pytest.raises(CalibrationFileError, match="no calibration.json"):
        CalibrationResult.load(tmp_path / "elsewhere")
    r = _result()
    r.save(tmp_path / "t")
    (tmp_path / "t" / "calibration.safetensors").write_bytes(b"garbage")
    with pytest.raises(CalibrationFileError, match="corrupt"):
        CalibrationResult.load(tmp_path / "t")
    with pytest.raises(ValueError, match="directory"):
        r.save(tmp_path / "x.json")


# -- losses --------------------------------------------------------------------------------------------
def test_token_losses_hand_values():
    early = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    full = torch.tensor([[1, 2, 0, 4], [5, 0, 0, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert token_disagreement(early, full).tolist() == [0.25, 0.5]
    assert token_disagreement(early, full, mask).tolist() == [0.25, 0.5]
    assert sequence_disagreement(early, full).tolist() == [1.0, 1.0]
    assert sequence_disagreement(early, early).tolist() == [0.0, 0.0]
    ref = torch.tensor([[1, 2, 3, 0], [5, 6, 7, 8]])
    # early misses 1/4 and 0/4; full misses 2/4 and 2/4 -> clipped at 0
    assert risk_consistency(early, full, ref).tolist() == [0.0, 0.0]
    assert risk_consistency(full, early, ref).tolist() == [0.25, 0.5]
    with pytest.raises(ValueError, match="no token"):
        token_disagreement(early, full, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="same shape"):
        token_disagreement(early, full[:, :3])


# -- the offline simulator -------------------------------------------------------------------------------
def test_exit_table_matches_the_model(model, texts, table):
    ids, mask = texts
    with torch.no_grad():
        rows = []
        for i in range(ids.shape[0]):  # one unpadded row at a time: the model's own predictions
            real = ids[i][mask[i].bool()]
            rows.append(model(input_ids=real[None]).logits[0, :-1].argmax(-1))
    want = torch.cat(rows)
    assert table.num_tokens == want.numel() == int(mask.sum() - mask.shape[0])
    assert torch.equal(table.final, want)
    assert table.num_examples == 12 and table.num_layers == 3
    # the reference is the next real token of the text
    refs = torch.cat([ids[i][mask[i].bool()][1:] for i in range(12)])
    assert torch.equal(table.reference, refs)


def test_exit_rule_brute_force(table):
    thr = [0.05, 0.04]
    exits = table.exit_layers(thr)
    for t in range(table.num_tokens):
        want = 3
        for layer in range(2):
            if table.scores[layer, t] >= thr[layer]:
                want = layer + 1
                break
        assert exits[t] == want
    assert (table.exit_layers(math.inf) == 3).all()
    assert (table.exit_layers(-math.inf) == 1).all()
    assert (table.exit_layers(-math.inf, min_exit_layer=2) == 2).all()
    assert float(table.losses(math.inf).max()) == 0.0
    o = table.oracle()
    assert o["agreement"] == 1.0
    assert torch.equal(table.predictions(table.saturation_layer), table.final)
    dis = table.disagreement(thr)
    per_example = torch.zeros(12).index_add_(0, table.example, dis.float()) / torch.bincount(table.example)
    assert torch.allclose(table.losses(thr), per_example.double())
    assert torch.equal(table.losses(thr, "sequence"), (per_example > 0).double())


@SETTINGS
@given(st.floats(-0.1, 0.2), st.floats(0.0, 0.1))
def test_higher_threshold_never_exits_earlier(table, lo, gap):
    assert (table.exit_layers(lo + gap) >= table.exit_layers(lo)).all()


def test_schedules_in_the_simulator(table):
    decay = CalmDecay(0.02, tau=4.0, max_steps=8)
    exits = table.exit_layers(decay)
    for t in range(0, table.num_tokens, 7):
        value = 0.9 * 0.02 + 0.1 * math.exp(-4.0 * int(table.step[t]) / 8)
        passing = [layer + 1 for layer in range(2) if table.scores[layer, t] >= value]
        assert exits[t] == (passing[0] if passing else 3)
    with pytest.raises(ValueError, match="per-layer"):
        table.exit_layers([0.1] * 4)
    with pytest.raises(ValueError, match="NaN"):
        table.exit_layers(float("nan"))


def test_candidate_grids_are_ordered(table):
    const = candidate_thresholds(table, "constant", 16)
    assert const[0] == math.inf and all(a > b for a, b in itertools.pairwise(const))
    per_layer = candidate_thresholds(table, "per-layer", 16)
    assert per_layer[0] == [math.inf, math.inf]
    assert all(all(a >= b for a, b in zip(x, y)) for x, y in itertools.pairwise(per_layer))
    means = [table.summary(c)["mean_exit_layer"] for c in const]
    assert all(a >= b for a, b in itertools.pairwise(means))  # safest first


def test_compute_spaced_grid(table):
    for kind in ("constant", "per-layer", "decaying"):
        grid = candidate_thresholds(table, kind, 10)
        assert 2 <= len(grid) <= 10
        if kind == "decaying":
            steps = int(table.step.max()) + 1
            grid = [CalmDecay(c, max_steps=steps) if math.isfinite(c) else c for c in grid]
        depth = [table.summary(c)["mean_exit_layer"] for c in grid]
        assert depth[0] == 3.0 and all(a > b for a, b in itertools.pairwise(depth))
    quant = candidate_thresholds(table, "constant", 10, spacing="quantile")
    assert quant[0] == math.inf and len(quant) <= 11


def test_table_subset(table):
    sub = table.subset([5, 2])
    assert sub.num_examples == 2
    assert torch.equal(sub.losses(0.03), table.losses(0.03)[[5, 2]])


def test_offline_calibration_end_to_end(model):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g) for _ in range(16)]
    cont = greedy_continuations(model, prompts, 3, batch_size=16)
    tab = continuation_table(model, prompts, MaxProb(), cont)
    assert torch.equal(tab.final, tab.reference)  # the lens at the last block reproduces generate
    r = calibrate(
        model, prompts, measure=MaxProb(), delta=0.4, epsilon=0.3, backend="offline", max_new_tokens=3,
        thresholds=candidate_thresholds(tab, "constant", 12), batch_size=16, test_all=True,
    )  # fmt: skip
    assert r.n == 16 and r.backend == "offline" and r.certified
    assert r.risks[r.index] <= 0.4
    assert r.risks == pytest.approx([float(tab.losses(c).mean()) for c in r.candidates])
    refs = [c.flip(0) for c in cont]  # some reference continuation
    risk = calibrate(
        model, prompts, measure=MaxProb(), delta=0.4, epsilon=0.3, backend="offline", max_new_tokens=3,
        thresholds=[math.inf, 0.0], loss="risk", references=refs, batch_size=16,
    )  # fmt: skip
    assert risk.loss == "risk" and risk.n == 16


# -- the generation adapter, against a stand-in for dx.EarlyExit -----------------------------------------
def test_generation_losses_adapter(model, monkeypatch):
    class FakeEarlyExit:
        """Full greedy generation, with the first new token changed when the threshold is below 0.5."""

        def __init__(self, model, measure, threshold, kv, min_exit_layer=1):
            self.model, self.threshold = model, threshold

        def generate(self, ids, attention_mask=None, return_dict_in_generate=True, **kw):
            seq = self.model.generate(input_ids=ids, attention_mask=attention_mask, **kw)
            if self.threshold < 0.5:
                seq = seq.clone()
                seq[:, ids.shape[1]] = (seq[:, ids.shape[1]] + 1) % 64

            class Out:
                sequences = seq
                exit_layers = torch.full((ids.shape[0], seq.shape[1] - ids.shape[1]), 2)

            return Out()

    monkeypatch.setattr(calibration_risk, "EarlyExit", FakeEarlyExit)
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([7])]
    gen = GenerationLosses(model, prompts, MaxProb(), "propagate", max_new_tokens=4, batch_size=2)
    assert gen.full.shape == (3, 4)
    assert gen(0.9).tolist() == [0.0, 0.0, 0.0]
    assert gen(0.1).tolist() == (1 / gen.mask.sum(1).double()).tolist()  # one token per row, up to EOS
    assert gen.records[repr(0.1)]["mean_exit_layer"] == 2.0
    seq = GenerationLosses(model, prompts, MaxProb(), "propagate", max_new_tokens=4, loss="sequence")
    assert seq(0.1).tolist() == [1.0, 1.0, 1.0]


def test_kv_policy_objects_pass_through(model, monkeypatch):
    """A KV policy object (not only a name) reaches EarlyExit as given, and is saved as its name."""
    seen = []

    class Policy:
        name = "recompute"

    class FakeEarlyExit:
        def __init__(self, model, measure, threshold, kv, min_exit_layer=1):
            self.model = model
            seen.append(kv)

        def generate(self, ids, attention_mask=None, return_dict_in_generate=True, **kw):
            seq = self.model.generate(input_ids=ids, attention_mask=attention_mask, **kw)

            class Out:
                sequences = seq
                exit_layers = torch.full((ids.shape[0], seq.shape[1] - ids.shape[1]), 3)

            return Out()

    monkeypatch.setattr(calibration_risk, "EarlyExit", FakeEarlyExit)
    monkeypatch.setattr(calibration_result, "EarlyExit", FakeEarlyExit)
    policy = Policy()
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])] * 12
    r = calibrate(model, prompts, measure=MaxProb(), kv=policy, delta=0.2, epsilon=0.2, thresholds=[math.inf, 0.5],
                  max_new_tokens=2, progress=False)  # fmt: skip
    assert seen and all(kv is policy for kv in seen)
    assert r.kv is policy and r.to_dict()["kv"] == "recompute"
    seen.clear()
    r.early_exit(model)
    assert seen == [policy]


def test_first_continuation_token_is_full_depth(model):
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    cont = greedy_continuations(model, prompts, 3)
    tab = continuation_table(model, prompts, MaxProb(), cont)
    exits = tab.exit_layers(-math.inf)
    assert (exits[tab.step == 0] == 3).all() and (exits[tab.step > 0] == 1).all()
    assert tab.summary(-math.inf)["mean_exit_layer"] == 1.0  # decode steps only, like GenerationStats


def test_offline_sequence_loss_is_exact_for_recompute(model):
    """Up to the first disagreement, recompute sees the full model's states: the offline 'sequence'
    loss equals real early-exit generation's, example by example (runs once dx.EarlyExit exists)."""
    pytest.importorskip("deltaexit.generation")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g) for _ in range(8)]
    cont = greedy_continuations(model, prompts, 4)
    tab = continuation_table(model, prompts, MaxProb(), cont)
    gen = GenerationLosses(model, prompts, MaxProb(), "recompute", max_new_tokens=4, loss="sequence", batch_size=8)
    verify = GenerationLosses(model, prompts, MaxProb(), "verify", max_new_tokens=4, batch_size=8)
    grid = candidate_thresholds(tab, "constant", 8)
    for c in grid[1:]:
        assert tab.losses(c, "sequence").tolist() == gen(c).tolist()
    assert verify(grid[-1]).tolist() == [0.0] * 8  # lossless at any threshold
