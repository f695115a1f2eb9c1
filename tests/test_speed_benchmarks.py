"""The speed figures' machinery (``deltaexit.timing``) and the speed benchmarks, run on tiny inputs.

Structure only: every ratio comes as a median with its spread, failed peers as error text. No timed assertions.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from deltaexit.testing import tiny_model
from deltaexit.timing import alternated, generate_row, peer_rows, spread, token_agreement

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
KW = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}


def _is_spread(s) -> bool:
    return set(s) == {"median", "min", "max", "iqr", "repeats"} and s["min"] <= s["median"] <= s["max"]


def _check_rows(rows) -> None:
    for row in rows:
        assert ("error" in row) != ("speed" in row), row
        if "error" in row:
            assert isinstance(row["error"], str) and row["error"]
        else:
            assert _is_spread(row["speed"]) and _is_spread(row["decode_speed"]), row
            assert 0.0 <= row["agreement"] <= 1.0 and isinstance(row["identical"], bool)


def test_spread_and_agreement():
    s = spread([3.0, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "iqr": [1.5, 2.5], "repeats": 3}
    assert spread([float("nan")])["repeats"] == 0
    assert token_agreement(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 3, 4]]), 1) == pytest.approx(2 / 3)


def test_alternated_rotates_and_records_failures():
    calls: list[str] = []

    def row(name):
        def call(x, streamer):
            calls.append(name)
            return x

        return call

    def broken(x, streamer):
        raise RuntimeError("no cache")

    timing = alternated({"a": row("a"), "b": row("b"), "bad": broken}, [1, 2], repeats=2)
    assert timing.errors == {"bad": "RuntimeError: no cache"}
    assert set(timing.seconds) == {"a", "b"} and len(timing.seconds["a"]) == 2 and len(timing.seconds["a"][0]) == 2
    assert calls[4:8] == ["a", "b", "b", "a"]  # after the warm-ups, the order rotates per input
    assert _is_spread(timing.speed("b", base="a"))
    with pytest.raises(KeyError, match="no cache"):
        timing.speed("bad", base="a")
    with pytest.raises(ValueError):
        alternated({}, [1], repeats=1)


def test_failed_layerskip_leaves_the_model_whole():
    """transformers' assistant_early_exit can raise on GPT-NeoX; the rows after it must still run full depth."""
    model = tiny_model("gpt_neox", num_layers=2, hidden=32, heads=2, vocab=64)
    ids = torch.tensor([[5, 6, 7, 8]])
    rows = peer_rows(model, KW, layerskip=[(1, 2)], prompt_lookup=None)
    rows["again"] = generate_row(model, KW)
    timing = alternated(rows, [ids], repeats=1)
    assert set(timing.errors) <= {"assistant_early_exit 1:2"}
    assert model.config.num_hidden_layers == 2
    assert torch.equal(timing.outputs["again"][0], timing.outputs["model.generate"][0])


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(name: str, argv: list[str], monkeypatch, capsys) -> dict:
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    _load(name).main()
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    """A tiny GPT-NeoX with the shipped tokenizer, saved as a model directory."""
    from deltaexit.reference import load_reference

    out = tmp_path_factory.mktemp("neox")
    tiny_model("gpt_neox", num_layers=2, hidden=32, heads=2, vocab=4096).save_pretrained(out)
    load_reference("v1")[1].save_pretrained(out)
    return out


def test_verify_speed_json(neox_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "verify.json"
    argv = ["--model", str(neox_dir), "--prompts", "2", "--prompt-len", "6", "--new-tokens", "3", "--repeats", "2"]
    result = _run_script("verify_speed", [*argv, "--settings", "1:2", "--json", str(path)], monkeypatch, capsys)
    assert json.loads(path.read_text()) == result
    names = [row["row"] for row in result["rows"]]
    assert names == ["model.generate", "assistant_early_exit 1:2", "prompt_lookup 3", "prompt_lookup 10", "verify 1:2"]
    _check_rows(result["rows"])
    verify = result["rows"][-1]
    assert verify["identical"] and verify["drafted"] >= verify["accepted"] >= 0
    assert "sample" in result["prompts"]  # the shipped sample by default


def test_generate_speed_json(monkeypatch, capsys):
    argv = ["--layers", "2", "--hidden", "32", "--heads", "2", "--vocab", "64", "--batches", "1", "2"]
    argv += ["--new-tokens", "3", "--prompt-len", "5", "--repeats", "2", "--fixed-exits", "1", "--measures"]
    result = _run_script("generate_speed", [*argv, "--policies", "verify", "propagate"], monkeypatch, capsys)
    rows = result["results"]
    _check_rows(rows)
    by = {(r["batch"], r["policy"], r.get("exit")): r for r in rows}
    assert {(1, "verify", "fixed-1"), (2, "propagate", "never"), (1, "prompt_lookup 3", None)} <= set(by)
    assert "error" in by[(2, "assistant_early_exit 1:4", None)]  # transformers' assisted generation: batch 1 only
    assert by[(1, "verify", "fixed-1")]["identical"]
    assert by[(1, "verify", "fixed-1")]["cost_model_speedup"] > 0
