"""dx.tune: lossless choice reproduces model.generate, save/load, bad input before timing, calibrated path, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import deltaexit as dx
from deltaexit.calibration import InsufficientCalibrationData
from deltaexit.cli import main
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.testing import tiny_model
from deltaexit.tuning import Candidate, TuneConfig, TuneFileError, TuneResult, lossless_grid, prompts_required, tune

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is far faster on a busy machine

SMALL = {"max_new_tokens": 5, "repeats": 1, "progress": False, "draft_settings": ({"num_draft": 2},)}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=4, hidden=32, heads=4, vocab=64, seed=3)


def _prompts(n: int, length: int = 4) -> list[torch.Tensor]:
    return [torch.randint(1, 64, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _never(*_args):
    raise AssertionError("the timer was called: an input check ran after the timing started")


def _forced(monkeypatch, speedup: float) -> None:
    """Every early-exit call takes 1/speedup of model.generate's (fixed) time; outputs stay real."""
    from deltaexit.tuning.timing import PromptRuns

    base, early = PromptRuns._baseline, PromptRuns._early
    monkeypatch.setattr(PromptRuns, "_baseline", lambda self, ids: (1.0, base(self, ids)[1]))
    monkeypatch.setattr(PromptRuns, "_early", lambda self, ee, ids: (1.0 / speedup, *early(self, ee, ids)[1:]))


def test_lossless_choice_reproduces_generate(model):
    prompts = _prompts(3)
    result = tune(model, prompts, 0.0, exit_layers=(1, 2), timing_prompts=2, **SMALL)
    assert result.results[0].stage == "baseline"
    tried = [r for r in result.results if r.candidate is not None]
    assert len(tried) == 3 and all(r.candidate.kv == "verify" for r in tried)
    assert all(r.identical and r.agreement == 1.0 for r in tried)
    fine = [r for r in tried if r.stage == "fine"]
    assert fine and all(len(r.ratios) == 1 and math.isfinite(r.median) for r in fine)
    best = next(r for r in fine if r.candidate.name.startswith("verify E=1"))
    ee = best.candidate.early_exit(model)
    assert isinstance(ee, EarlyExit) and ee.min_exit_layer == 1
    for p in prompts:
        ids = p[None]
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(ee.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), ref)
    assert result.realised_disagreement == 0.0


def test_choice_is_the_fastest_above_one_else_generate(model, monkeypatch):
    _forced(monkeypatch, 2.0)
    fast = tune(model, _prompts(2), 0.0, exit_layers=(1,), verify_thresholds=(), **SMALL)
    assert fast.uses_early_exit and fast.speedup == pytest.approx(2.0)
    assert isinstance(fast.early_exit(model), EarlyExit)
    _forced(monkeypatch, 0.5)
    slow = tune(model, _prompts(2), 0.0, exit_layers=(1,), verify_thresholds=(), **SMALL)
    assert not slow.uses_early_exit and slow.early_exit(model) is None and slow.speedup == 1.0
    assert "no early-exit setting beat model.generate" in slow.summary()
    ids = _prompts(1)[0][None]
    assert torch.equal(
        slow.generate(model, ids, max_new_tokens=3, pad_token_id=0),
        model.generate(ids, max_new_tokens=3, pad_token_id=0),
    )


def test_save_load_round_trip(model, tmp_path, monkeypatch):
    _forced(monkeypatch, 1.5)
    result = tune(model, _prompts(2), 0.0, exit_layers=(1,), **SMALL)
    path = result.save(tmp_path / "sub" / "tuned.json")
    data = json.loads(path.read_text())
    assert data["format"] == "deltaexit-tune" and data["chosen"]["threshold"] == "-inf"
    loaded = TuneResult.load(path)
    assert loaded.chosen == result.chosen and loaded.tolerance == 0.0
    assert [r.name for r in loaded.results] == [r.name for r in result.results]
    assert [r.ratios for r in loaded.results] == [r.ratios for r in result.results]
    a, b = result.early_exit(model), loaded.early_exit(model)
    assert a is not None and b is not None
    assert (repr(a), a.policy) == (repr(b), b.policy)
    assert not list(tmp_path.glob("sub/.tuned.json.*"))  # atomic write left no temporary file


def test_load_errors(tmp_path):
    with pytest.raises(TuneFileError, match="deltaexit tune --out"):
        TuneResult.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(TuneFileError, match="re-run"):
        TuneResult.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("prompts", "settings", "error", "match"),
    [
        ([], {}, ValueError, "no calibration prompts"),
        (None, {}, ValueError, "no calibration prompts"),
        ("short", {"tolerance": 1.0}, ValueError, r"tolerance must lie in \[0, 1\)"),
        ("short", {"tolerance": -0.1}, ValueError, r"tolerance must lie in \[0, 1\)"),
        ("short", {"tolerance": 0.05}, InsufficientCalibrationData, "needs at least 56 calibration prompts"),
        ("long", {}, ValueError, "exceeds the model's context"),
        ("short", {"exit_layers": (4,)}, ValueError, r"exit_layers \[4\] outside 1..3"),
        ("short", {"verify_measure": "delta-mlp"}, ValueError, "training-free measures only"),
        ("short", {"repeats": 0}, ValueError, "repeats must be an int >= 1"),
        ("short", {"budget_s": 0}, ValueError, "budget_s must be > 0"),
        ("strings", {}, ValueError, "pass tokenizer="),
    ],
)
def test_bad_input_raises_before_timing(model, prompts, settings, error, match):
    data = {"short": _prompts(3), "long": [torch.ones(model.config.max_position_embeddings, dtype=torch.long)],
            "strings": ["a prompt"]}.get(prompts, prompts) if isinstance(prompts, str) else prompts  # fmt: skip
    with pytest.raises(error, match=match):
        tune(model, data, timer=_never, progress=False, **settings)


def test_unknown_setting_lists_the_known_ones(model):
    with pytest.raises(TypeError, match="TuneConfig has"):
        tune(model, _prompts(1), num_drafts=(2,))


def test_prompts_required_follows_the_calibration_bound():
    from deltaexit.calibration import min_examples, prompts_needed

    assert prompts_required(TuneConfig()) == 1
    cfg = TuneConfig(tolerance=0.01, epsilon=0.1)
    assert prompts_required(cfg) == prompts_needed(min_examples(0.01, 0.1, "hb"), 0.2)


def test_grid_is_the_product_of_its_settings():
    cfg = TuneConfig(exit_layers=(1, 2), draft_settings=({"num_draft": 2}, {"num_draft": 4}),
                     verify_thresholds=(0.5, 0.9), exit_options=({}, {"flag": True}))  # fmt: skip
    grid = lossless_grid(cfg, num_layers=8)
    assert len(grid) == 2 * (2 * 2 + 2)
    assert {c.options.get("flag", False) for c in grid} == {False, True}
    assert lossless_grid(TuneConfig(), 8)[0].min_exit_layer == 1
    assert {c.min_exit_layer for c in lossless_grid(TuneConfig(), 8)} == {1, 2, 3, 4}
    c = Candidate("softmax-max", "recompute", [math.inf, 0.5], 1, {"max_pending": 4}, calibrated=True)
    assert Candidate.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_calibrated_path_uses_ltt_and_reports_disagreement(model, monkeypatch):
    import deltaexit.tuning.api as api

    calls = []
    real = api.calibrate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "calibrate", spy)
    cfg = TuneConfig(tolerance=0.3, epsilon=0.3, max_new_tokens=4, repeats=1, progress=False, exit_layers=(1,),
                     draft_settings=({"num_draft": 2},), verify_thresholds=(), num_thresholds=8,
                     tolerant_exit_layers=())  # fmt: skip
    prompts = _prompts(prompts_required(cfg))
    result = tune(model, prompts, config=cfg)
    assert calls and calls[0]["delta"] == 0.3 and calls[0]["kv"] == "recompute" and calls[0]["backend"] == "offline"
    record = result.calibration[0]
    assert record["measure"] == "softmax-max" and record["n"] >= record["min_examples"]
    calibrated = [r for r in result.results if r.candidate is not None and r.candidate.calibrated]
    assert len(calibrated) == int(record["usable"])
    for r in calibrated:
        assert 0.0 <= r.agreement <= 1.0
        if r.stage == "rejected":
            assert "above the tolerance" in r.note
    assert 0.0 <= result.realised_disagreement <= 0.3
    assert dx.tune is tune and dx.TuneResult is TuneResult


def test_cli_tune_and_generate_with_the_tuned_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The game began\n\nIn 1990 the city\n")
    out = tmp_path / "tuned.json"
    argv = ["tune", "--model", "v1", "--prompts", str(prompts), "--new-tokens", "3", "--max-candidates", "2",
            "--timing-prompts", "1", "--repeats", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "model.generate (no early exit)" in text and "verify E=1" in text
    assert TuneResult.load(out).info["num_prompts"] == 2
    assert (
        main(["generate", "--model", "v1", "--prompt", "The game", "--max-new-tokens", "3", "--tuned", str(out)]) == 0
    )
    assert "tokens, mean exit layer" in capsys.readouterr().out
    assert main(["tune", "--model", "v1", "--prompts", str(prompts), "--tolerance", "1.5", "--no-progress"]) == 1
    assert "tolerance must lie in [0, 1)" in capsys.readouterr().err
