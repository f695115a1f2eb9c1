"""``dx.analyze`` / ``deltaexit analyze`` on a tiny random model with a tiny offline BPE tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

import deltaexit as dx
from _tiny_lm import tiny_model_dir, tiny_text, tiny_tokenizer
from deltaexit.cli import main
from deltaexit.features import collect_states, tokenize_text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tinylm"), num_layers=4, hidden=32)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(tiny_text(150))
    return path


def test_collect_states_matches_the_model(llama):
    ids = torch.randint(3, 128, (70,), generator=torch.Generator().manual_seed(0))
    states = collect_states(llama, ids, window=32, batch_size=2)
    assert states.num_tokens == 70 and states.num_layers == 3
    assert states.window.tolist() == [0] * 32 + [1] * 32 + [2] * 6
    with torch.no_grad():
        logits = llama(input_ids=ids[:32].unsqueeze(0)).logits[0]
    assert torch.equal(states.topk_ids[-1, :32, 0], logits.argmax(-1))
    torch.testing.assert_close(states.h_in[1:], states.h_out[:-1])  # h_in[l+1] == h_out[l]


def test_tokenize_text_rejects_empty_text():
    with pytest.raises(ValueError, match="empty"):
        tokenize_text(tiny_tokenizer(), "  \n ")


def test_analyze_function_returns_every_figure(model_dir, text_file):
    from deltaexit.commands.common import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    result = dx.analyze(
        model,
        tokenizer,
        text_file.read_text(),
        tokens=512,
        window=32,
        labels=("next", "final"),
        fit_kwargs={"max_epochs": 2},
    )
    json.dumps(result, allow_nan=False)
    assert result["tokens"]["test"] == 512
    assert result["tokens"]["train"] + result["tokens"]["select"] == result["tokens"]["fit"] == 512
    assert len(result["layers"]) == 4
    assert 1 <= result["oracle"]["oracle_mean_layer"] <= 4
    for label in ("next", "final"):
        ev = result["labels"][label]
        assert len(ev["transitions"]) == 3
        assert set(ev["summary"]) == set(dx.analysis.DEFAULT_MEASURES)
        for t in ev["transitions"]:
            for m in t["measures"].values():
                assert 0 <= m["f1"] <= 1
                assert m["auroc"] is None or 0 <= m["auroc"] <= 1
    assert set(result["cost"]["measures"]) == set(dx.analysis.DEFAULT_MEASURES)


def test_cli_writes_json_and_plots(model_dir, text_file, tmp_path, capsys):
    out_json, plots = tmp_path / "r.json", tmp_path / "plots"
    code = main(
        [
            "analyze", "--model", str(model_dir), "--data", str(text_file), "--tokens", "384",
            "--window", "32", "--label", "all", "--measures", "delta-norm,softmax-max,linear",
            "--json", str(out_json), "--plots", str(plots), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "trivial" in out and "oracle" in out
    data = json.loads(out_json.read_text())
    assert set(data["labels"]) == {"next", "final", "kept"}
    assert set(data["labels"]["next"]["summary"]) == {"delta-norm", "softmax-max", "linear"}
    # 'kept' scores transition l→l+1 from block l+1: decision layers 2..L
    assert [t["layer"] for t in data["labels"]["kept"]["transitions"]] == [2, 3, 4]
    assert [t["layer"] for t in data["labels"]["next"]["transitions"]] == [1, 2, 3]
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == [
        "delta_norm.png", "measures_final.png", "measures_kept.png", "measures_next.png", "saturation.png"
    ]  # fmt: skip
    assert all((plots / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_cli_saves_fitted_measures_that_generate_can_load(model_dir, text_file, tmp_path, capsys):
    saved = tmp_path / "measures"
    code = main(
        [
            "analyze", "--model", str(model_dir), "--data", str(text_file), "--tokens", "384",
            "--window", "32", "--label", "next", "--measures", "delta-norm,linear,delta-mlp/per-layer",
            "--save-measures", str(saved), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (saved / "next").iterdir()) == ["delta-mlp_per-layer", "linear"]
    capsys.readouterr()
    loaded = dx.load_measure(saved / "next" / "delta-mlp_per-layer")
    assert loaded.display_name == "delta-mlp/per-layer" and loaded.label == "next"
    args = ["generate", "--model", str(model_dir), "--prompt", "The", "--max-new-tokens", "3", "--json"]
    assert main([*args, "--measure", str(saved / "next" / "linear"), "--threshold", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["policy"] == "verify"


def test_cli_errors_are_clear(model_dir, text_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert main(["analyze", "--model", str(model_dir), "--data", str(empty)]) == 1
    assert "empty" in capsys.readouterr().err

    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((model_dir / "config.json").read_text())
    assert main(["analyze", "--model", str(no_tok), "--data", str(text_file)]) == 1
    assert "tokenizer" in capsys.readouterr().err

    assert main(["analyze", "--model", str(tmp_path / "nope"), "--data", str(text_file)]) == 1
    assert "not found" in capsys.readouterr().err

    code = main(["analyze", "--model", str(model_dir), "--data", str(text_file), "--measures", "delta-nrom"])
    assert code == 1
    assert "unknown measure 'delta-nrom'" in capsys.readouterr().err

    # Too few tokens left to fit on after the test tokens.
    with pytest.warns(UserWarning, match="only"):
        code = main(["analyze", "--model", str(model_dir), "--data", str(text_file), "--tokens", "100000",
                     "--window", "32", "--quiet"])  # fmt: skip
    assert code == 1
    assert "fit" in capsys.readouterr().err


def test_analyze_settings_come_from_one_config_and_threads_are_the_callers(llama):
    from deltaexit.analysis import AnalyzeConfig, analyze

    with pytest.raises(TypeError, match="torch_threads"):
        analyze(llama, tiny_tokenizer(), "some text", threads=1)
    with pytest.raises(TypeError, match="unknown analyze setting"):
        analyze(llama, tiny_tokenizer(), "some text", token=5)
    with pytest.raises(ValueError, match="tokens must be >= 2"):
        AnalyzeConfig(tokens=1)
    assert AnalyzeConfig.build(AnalyzeConfig(tokens=64), seed=2) == AnalyzeConfig(tokens=64, seed=2)


def test_saved_measure_paths_are_printed_as_written_and_generate_says_what_to_pass(
    model_dir, text_file, tmp_path, capsys
):
    """Issue 16 item 11: printed paths load in generate; the path a user types from the name is redirected;
    a `kept` measure asks for --min-exit-layer 2."""
    import re

    saved = tmp_path / "measures"
    code = main(
        [
            "analyze", "--model", str(model_dir), "--data", str(text_file), "--tokens", "384",
            "--window", "32", "--label", "all", "--measures", "linear,delta-mlp/per-layer",
            "--save-measures", str(saved), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    printed = dict(re.findall(r"saved (\w+) measure 'delta-mlp/per-layer': deltaexit generate --measure (\S+)", out))
    assert sorted(printed) == ["final", "kept", "next"]
    assert "--min-exit-layer 2" in out.split(printed["kept"])[1].splitlines()[0]
    base = ["generate", "--model", str(model_dir), "--prompt", "The", "--max-new-tokens", "3", "--json"]
    assert main([*base, "--measure", printed["next"], "--threshold", "0"]) == 0
    capsys.readouterr()
    typed = str(saved / "next" / "delta-mlp" / "per-layer")
    assert main([*base, "--measure", typed]) == 1
    assert f"the measure was saved as {printed['next']}: pass that" in capsys.readouterr().err
    assert main([*base, "--measure", printed["kept"]]) == 1
    assert "pass --min-exit-layer 2" in capsys.readouterr().err
    assert main([*base, "--measure", printed["kept"], "--min-exit-layer", "2", "--threshold", "0"]) == 0


def test_kept_leaves_out_measures_that_read_its_inputs_and_tables_fit_long_names(
    model_dir, text_file, tmp_path, capsys
):
    """Issue 16 items 3 and 12: lens-mlp is never scored on kept (it reads the lens of h_in and h_out);
    headers are not cut; the plot styles are distinct."""
    from deltaexit.analysis import plot_styles

    out = tmp_path / "r.json"
    code = main(
        [
            "analyze", "--model", str(model_dir), "--data", str(text_file), "--tokens", "384", "--window", "32",
            "--label", "all", "--measures", "delta-mlp/per-layer,lens-mlp", "--json", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert "lens-mlp" not in data["labels"]["kept"]["summary"] and "lens-mlp" in data["labels"]["next"]["summary"]
    assert "lens-mlp" in data["labels"]["kept"]["left_out"] and data["labels"]["next"]["left_out"] == {}
    assert "left out of label 'kept': lens-mlp" in text
    assert "delta-mlp/per-layer" in text and "delta-mlp/pe " not in text
    styles = plot_styles([f"m{i}" for i in range(40)])
    assert len({tuple(s.values()) for s in styles.values()}) == 40
