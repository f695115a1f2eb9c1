"""The support matrix over the causal-LM mapping, and the config-shrinking procedure it builds its models with."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

import deltaexit.support as support
from deltaexit.shrink import TinySizes, shrink_config, tiny_model_for
from deltaexit.structure import StructureError
from deltaexit.support import GENERATE_CELLS, cell_status, check_architecture, support_matrix, support_summary

# One model of each shape that works today: Llama, GPT-2 (no rotary, fused QKV), Mixtral (MoE), DeepSeek-V3 (MLA,
# shared + routed experts), Gemma 3 and Cohere 2 (sliding-window and global layers interleaved).
SAMPLE = ("llama", "gpt2", "mixtral", "deepseek_v3", "gemma3_text", "cohere2")
ALL_CELLS = ("build", "structure", "collect", "lens_exact", *GENERATE_CELLS)


@pytest.fixture(scope="module")
def sample_rows():
    return {r["model_type"]: r for r in support_matrix(SAMPLE)}


@pytest.mark.parametrize("model_type", SAMPLE)
def test_sample_cells_that_work_today_are_ok(sample_rows, model_type):
    row = sample_rows[model_type]
    assert {c: cell_status(row.get(c)) for c in ALL_CELLS} == dict.fromkeys(ALL_CELLS, "ok"), row
    assert row["lens_max_abs_err"] < 1e-4 and row["telescope_err"] < 1e-4
    assert row["num_layers"] == shrink_config(model_type).get_text_config().num_hidden_layers


def test_sample_summary_meets_every_target(sample_rows):
    summary = support_summary(list(sample_rows.values()))
    assert summary["built"] == len(SAMPLE) and not summary["failures"] and not summary["refusals"]
    for figure in ("collect_lens", "verify", "propagate", "recompute"):
        assert summary[figure] == {"ok": len(SAMPLE), "of": len(SAMPLE), "percent": 100.0}


class _Raising:
    """Stands in for EarlyExit: raises ``exc`` when built."""

    def __init__(self, exc):
        self.exc = exc

    def __call__(self, *args, **kwargs):
        raise self.exc


def test_a_named_refusal_is_told_from_a_crash(monkeypatch):
    monkeypatch.setattr(support, "EarlyExit", _Raising(StructureError("no blocks here; pass blocks=...")))
    row = check_architecture("llama")
    assert {cell_status(row[c]) for c in GENERATE_CELLS} == {"refused"}
    assert "StructureError: no blocks here" in row["verify"]
    monkeypatch.setattr(support, "EarlyExit", _Raising(IndexError("list index out of range")))
    row = check_architecture("llama")
    assert {cell_status(row[c]) for c in GENERATE_CELLS} == {"FAIL"}
    assert row["propagate"] == "FAIL (IndexError: list index out of range)"
    summary = support_summary([row])
    assert [(f["cell"], f["error"]) for f in summary["failures"]] == [(c, row[c]) for c in GENERATE_CELLS]
    assert summary["verify"]["ok"] == 0 and summary["collect_lens"]["ok"] == 1


def test_output_that_differs_from_model_generate_is_a_mismatch(monkeypatch):
    real = support.EarlyExit

    class Shifted(real):  # type: ignore[misc,valid-type]
        def generate(self, inputs=None, **kwargs):
            seq = super().generate(inputs, **kwargs)
            return torch.cat([seq[:, :-1], (seq[:, -1:] + 1) % 256], dim=1)

    monkeypatch.setattr(support, "EarlyExit", Shifted)
    row = check_architecture("llama")
    assert {cell_status(row[c]) for c in GENERATE_CELLS} == {"MISMATCH"}
    assert support_summary([row])["verify"]["ok"] == 0


def test_one_crash_or_hang_does_not_end_the_sweep(monkeypatch):
    def check(model_type):
        if model_type == "crash":
            raise RuntimeError("segfault stand-in")
        if model_type == "hang":
            time.sleep(30)
        return {"model_type": model_type, "build": "ok", "collect": "ok", "lens_exact": "ok"}

    monkeypatch.setattr(support, "check_architecture", check)
    monkeypatch.setattr(support, "_check_types", lambda types: None)
    rows = support_matrix(["a", "crash", "hang", "b"], timeout=0.5)
    assert [r["model_type"] for r in rows] == ["a", "crash", "hang", "b"]
    assert rows[1]["build"] == "FAIL (RuntimeError: segfault stand-in)"
    assert rows[2]["build"].startswith("FAIL (TimeoutError")
    assert rows[0]["collect"] == rows[3]["collect"] == "ok"


def test_unknown_type_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="unknown model type.*no_such_model.*CONFIG_MAPPING"):
        support_matrix(["llama", "no_such_model"])


def test_cli_writes_markdown_and_json_for_a_subset(tmp_path):
    import json

    from deltaexit.cli import main

    out, js = tmp_path / "m.md", tmp_path / "m.json"
    assert main(["support-matrix", "--types", "gpt2", "--out", str(out), "--json", str(js), "--quiet"]) == 0
    text = out.read_text()
    assert f"`deltaexit support-matrix --types gpt2 --out {out} --json {js}`" in text
    assert "transformers " in text and "| gpt2 |" in text and "## How each model is shrunk" in text
    data = json.loads(js.read_text())
    assert data["rows"][0]["model_type"] == "gpt2" and data["summary"]["built"] == 1


_STATUSES = st.sampled_from(["ok", "MISMATCH (x)", "refused (StructureError: x)", "FAIL (IndexError: x)"])
_ROW = st.fixed_dictionaries(
    {c: _STATUSES for c in ("collect", "lens_exact", *GENERATE_CELLS)},
    optional={"build": st.sampled_from(["ok", "FAIL (KeyError: x)"])},
)


@given(st.lists(_ROW, min_size=1, max_size=8))
def test_summary_shares_count_what_the_cells_say(rows):
    for i, r in enumerate(rows):
        r["model_type"] = f"t{i}"
    s = support_summary(rows)
    built = [r for r in rows if r.get("build", "ok") == "ok"]
    assert s["built"] == len(built) and s["types"] == len(rows)
    assert s["collect_lens"]["ok"] == sum(r["collect"] == r["lens_exact"] == "ok" for r in built)
    assert s["verify"]["ok"] == sum(r["verify"] == r["verify-lossless"] == "ok" for r in built)
    assert s["recompute"]["ok"] == sum(r["recompute"] == "ok" for r in built)
    bad = sum(
        cell_status(r[c]) in ("FAIL", "MISMATCH") for r in built for c in ("collect", "lens_exact", *GENERATE_CELLS)
    )
    assert len(s["failures"]) == bad
    assert all(f["error"].startswith(("FAIL", "MISMATCH")) for f in s["failures"])


# -- the shrink procedure ----------------------------------------------------------------------------------------

# Types covering the shapes the procedure must handle: dense, fused QKV, per-layer attention kinds, hybrid
# linear-attention and SSM lists, pure SSM, MLA, MoE, nested text configs, per-layer (heterogeneous) configs.
SHRINK_TYPES = (
    "llama",
    "gpt2",
    "gpt_neo",
    "gemma3_text",
    "cohere2",
    "qwen3_5",
    "qwen3_next",
    "jamba",
    "mamba2",
    "falcon_h1",
    "nemotron_h",
    "deepseek_v3",
    "mixtral",
    "gemma4_text",
)
_SIZES = st.builds(
    TinySizes,
    hidden=st.sampled_from([32, 64, 96]),
    heads=st.sampled_from([2, 4]),
    head_dim=st.sampled_from([8, 16]),
    layers=st.integers(2, 5),
    vocab=st.sampled_from([128, 256]),
)


def _layer_kinds(config):
    for name in ("layer_types", "layers_block_type", "attention_layers"):
        kinds = getattr(config, name, None)
        if isinstance(kinds, (list, tuple)) and kinds:
            return list(kinds)
    return None


@given(model_type=st.sampled_from(SHRINK_TYPES), tiny=_SIZES)
def test_shrunk_config_has_the_asked_sizes_and_every_layer_kind(model_type, tiny):
    default = AutoConfig.for_model(model_type).get_text_config()
    config = shrink_config(model_type, tiny).get_text_config()
    assert config.hidden_size == tiny.hidden and config.vocab_size == tiny.vocab
    layers = config.num_hidden_layers
    kinds0, kinds = _layer_kinds(default), _layer_kinds(config)
    if kinds0 is None:
        assert layers == tiny.layers
    else:
        assert len(kinds) == layers >= min(tiny.layers, len(kinds0))
        assert set(kinds) == set(kinds0)  # at least one layer of each kind the default has
        assert all(kinds.count(k) >= min(2, kinds0.count(k)) for k in set(kinds0))
        needed = max(tiny.layers, sum(min(2, kinds0.count(k)) for k in set(kinds0)))
        assert layers == min(needed, len(kinds0))  # never more layers than the default


@given(model_type=st.sampled_from(SHRINK_TYPES), tiny=_SIZES)
def test_shrunk_model_builds_small_and_runs(model_type, tiny):
    model = tiny_model_for(model_type, tiny=tiny)
    assert sum(p.numel() for p in model.parameters()) < 4_000_000  # mixtral at hidden 96, 5 layers: 2.0M
    ids = torch.randint(3, tiny.vocab, (1, 5))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 5, tiny.vocab) and torch.isfinite(logits).all()


def test_shrunk_config_is_rebuilt_so_its_init_derives_again():
    config = shrink_config("gpt_neo")
    assert config.attention_types == [[["global", "local"], 2]]
    assert len(config.attention_layers) == config.num_layers == 4
    model = AutoModelForCausalLM.from_config(config)
    assert len(model.transformer.h) == 4
