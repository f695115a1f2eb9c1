"""The ``deltaexit generate`` command on a tiny saved model with a character tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from deltaexit.cli import main
from deltaexit.measures.base import ConfidenceMeasure, register_measure
from deltaexit.testing import tiny_model


@register_measure
class _AlwaysHalf(ConfidenceMeasure):
    name = "test-cli-half"

    def score(self, state):
        return torch.full(state.h_out.shape[:-1], 0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tiny_model("llama", num_layers=4, vocab=128).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kv", ["verify", "propagate", "recompute"])
def test_generate_command_json(model_dir, capsys, kv):
    code = main(
        [
            "generate",
            "--model",
            model_dir,
            "--prompt",
            "Hello",
            "--measure",
            "test-cli-half",
            "--threshold",
            "0.4",
            "--kv",
            kv,
            "--min-exit-layer",
            "2",
            "--max-new-tokens",
            "5",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    layers = [t["exit_layer"] for t in out["tokens"]]
    assert layers[0] == 4 and all(1 <= x <= 4 for x in layers)
    if kv != "verify":
        assert layers[1:] == [2] * (len(layers) - 1)
    assert out["stats"]["policy"] == kv
    if kv != "verify":  # the head and K/V-only calls only pull the FLOP figure from the blocks' towards 1
        assert 1.0 < out["stats"]["flop_speedup"] < out["stats"]["implied_speedup"]


def test_generate_command_text_and_errors(model_dir, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                model_dir,
                "--prompt",
                "Hi",
                "--measure",
                "test-cli-half",
                "--threshold",
                "inf",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("Hi") and "[4]" in text and "mean exit layer 4.00/4" in text
    assert main(["generate", "--model", model_dir, "--prompt", "Hi", "--measure", "nope"]) == 1
    assert "unknown measure" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir + "/missing", "--prompt", "Hi"]) == 1


def test_generate_command_loads_a_fitted_measure_and_refuses_an_unfitted_one(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import deltaexit as dx
    from deltaexit.measures import LayerState, get_measure

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    lens = dx.Lens.from_model(model)
    g = torch.Generator().manual_seed(0)
    states, labels = [], []
    for layer in range(3):
        h = torch.randn(64, model.config.hidden_size, generator=g)
        states.append(LayerState(layer=layer, h_in=h, h_out=h * 1.1, lens=lens, num_layers=4))
        labels.append(torch.arange(64) % 2 == 0)
    saved = get_measure("lens-mlp", max_epochs=1).fit(states, labels).save(tmp_path / "lm")
    args = ["generate", "--model", model_dir, "--prompt", "Hi", "--threshold", "inf", "--max-new-tokens", "2"]
    assert main([*args, "--measure", str(saved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["mean_exit_layer"] == 4
    assert main([*args, "--measure", "lens-mlp"]) == 1
    assert "must be fitted first" in capsys.readouterr().err


@pytest.mark.parametrize("form", [["--threshold=-inf"], ["--threshold", "-inf"]])
def test_generate_minus_inf_threshold_drafts_every_token(form, capsys):
    """-inf (the README's verify setting: always draft) stays -inf in both spellings; it used to become +inf."""
    from deltaexit.cli import main

    argv = ["generate", "--model", "v1", "--prompt", "The game", "--kv", "verify", "--min-exit-layer", "2"]
    assert main([*argv, *form, "--max-new-tokens", "6", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["drafted"] > 0  # +inf never exits, so it would draft nothing


def test_generate_accepts_reference_names(capsys):
    from deltaexit.cli import main

    assert main(["generate", "--model", "v1", "--prompt", "The game", "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 3
    assert main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 1
    assert "shipped reference" in capsys.readouterr().err
