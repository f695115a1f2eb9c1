"""The peers benchmark's own code path, run with deltaexit alone (no peer needs to be installed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TRANSFORM_FAMILIES = ("gemma2", "granite", "cohere", "opt")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def driver():
    return _load("peers_tracing_under_test", BENCH / "peers_tracing.py")


@pytest.fixture(scope="module")
def common():
    return _load("peers_common_under_test", BENCH / "peers" / "common.py")


@pytest.fixture(scope="module")
def deltaexit_result(driver):
    spec = {
        "families": list(TRANSFORM_FAMILIES),
        "timing_sizes": {"layers": 2, "hidden": 32, "heads": 2, "vocab": 64},
        "timing_settings": {"length": 8, "new_tokens": 3, "forward_repeats": 2, "generate_repeats": 1},
    }
    return driver.run_peer("deltaexit", sys.executable, spec, timeout=300)


def test_worker_json_shape(deltaexit_result):
    result = deltaexit_result
    assert "error" not in result, result.get("stderr", result)
    assert result["peer"] == "deltaexit"
    assert set(result["versions"]) == {"peer", "transformers", "torch"}
    assert result["user_code_lines"] == 5
    assert set(result["families"]) == set(TRANSFORM_FAMILIES)
    for key in ("forward", "generate"):
        timing = result["timing"][key]
        assert timing["ratio"] > 0 and len(timing["ratio_iqr"]) == 2
        assert timing["repeats"] >= 1


@pytest.mark.parametrize("family", TRANSFORM_FAMILIES)
def test_deltaexit_captures_and_lens_is_exact(deltaexit_result, family):
    entry = deltaexit_result["families"][family]
    assert entry["built"]
    assert entry["capture"]["ok"], entry["capture"]
    assert entry["capture"]["blocks"] == entry["capture"]["expected"] == 4
    assert entry["lens_error"]["max_abs"] < 1e-4


def test_render_and_markers(driver, deltaexit_result, tmp_path):
    results = {"peers": {"deltaexit": deltaexit_result, "nnsight": {"peer": "nnsight", "skipped": "not installed"}}}
    text = driver.render(results)
    assert "| gemma2 (logit transform) | 0 |" in text
    assert "| nnsight | – |" in text
    doc = tmp_path / "peers.md"
    doc.write_text(f"# Title\n\nbefore\n\n{driver.START}\nold\n{driver.END}\n\nafter\n")
    driver.write_markdown(doc, results)
    written = doc.read_text()
    assert written.startswith("# Title\n\nbefore\n") and written.endswith("\nafter\n")
    assert "old" not in written and "| deltaexit |" in written


def test_missing_peer_is_skipped(driver, tmp_path):
    result = driver.run_peer("nnsight", str(tmp_path / "no-env" / "bin" / "python"), {})
    assert "not installed" in result["skipped"]
    with pytest.raises(ValueError, match="unknown peer"):
        driver.worker_path("nope")


def test_capture_check_flags_hf_hidden_states_last_entry(common):
    """``output_hidden_states``' last entry is normalised, so it is not the last block's output."""
    model = common.build("llama")
    ids = common.input_ids(256)
    logits, ref_in, ref_out = common.reference(model, ids)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    check = common.capture_check(list(hidden[1:]), list(hidden[:-1]), ref_in, ref_out)
    assert not check["ok"] and check["wrong_blocks"] == [3]
    assert common.capture_check(ref_out, ref_in, ref_in, ref_out)["ok"]
    assert common.lens_error(logits, logits)["max_abs"] == 0.0
