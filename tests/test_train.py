"""``deltaexit train``: tokenizer, data, saved directory, determinism, perplexity, errors (tiny and fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deltaexit.cli import main
from deltaexit.threads import torch_threads
from deltaexit.training import (
    PRESETS,
    TrainConfig,
    WindowSampler,
    encode_stream,
    fit_tokenizer,
    layer_perplexities,
    perplexity,
    read_paragraphs,
    reference_config,
    train_reference,
)

WORDS = [
    "the",
    "a",
    "game",
    "of",
    "war",
    "was",
    "in",
    "1944",
    "@,@",
    "<unk>",
    "river",
    "north",
    "city",
    "team",
    "played",
    "first",
    "season",
    "=",
    "album",
    "song",
]


def _corpus(lines: int = 160, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(lines):
        n = int(torch.randint(5, 25, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx) + " .")
    return out


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(" " + line if i % 3 else "" for i, line in enumerate(_corpus())) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return fit_tokenizer(_corpus(), vocab_size=300)


TINY = {"vocab": 300, "hidden": 16, "heads": 2, "ffn": 32, "layers": 2, "context": 16}


def _tiny_train(data, out, seed=0, steps=3, **kw):
    cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-2, warmup=1, seed=seed, threads=1)
    with torch_threads(cfg.threads):
        return train_reference(data, out, train=cfg, progress=False, **{**TINY, **kw})


@given(st.text(max_size=60))
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_and_size(tokenizer):
    assert len(tokenizer) == 300
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # merges were learnt: the corpus takes far fewer tokens than bytes
    text = " ".join(_corpus())
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 0.6 * len(text.encode())


def test_tokenizer_rejects_tiny_vocab_and_empty_text():
    with pytest.raises(ValueError, match="too small"):
        fit_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        fit_tokenizer(["", ""], vocab_size=300)


def test_encode_stream_joins_paragraphs_with_eos(tokenizer):
    stream = encode_stream(tokenizer, ["the game", "a river"])
    a = tokenizer("the game", add_special_tokens=False)["input_ids"]
    b = tokenizer("a river", add_special_tokens=False)["input_ids"]
    assert stream.tolist() == [*a, 2, *b, 2]
    assert encode_stream(tokenizer, ["the game", "a river"], max_tokens=3).tolist() == [*a, 2, *b, 2][:3]


def test_window_sampler_is_seeded_and_in_range():
    stream = torch.arange(100)
    a = WindowSampler(stream, context=10, batch_size=4, seed=3)
    b = WindowSampler(stream, context=10, batch_size=4, seed=3)
    for _ in range(5):
        x, y = a.next(), b.next()
        assert torch.equal(x, y)
        assert x.shape == (4, 10)
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 9, dtype=torch.long))  # contiguous windows
    with pytest.raises(ValueError, match="fewer than one window"):
        WindowSampler(torch.arange(5), context=10, batch_size=1)


def test_read_paragraphs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_paragraphs(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="empty"):
        read_paragraphs(empty)


def test_reference_config_validation():
    cfg = reference_config()
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers) == (
        64,
        4,
        256,
        8,
    )
    with pytest.raises(ValueError, match="divisible"):
        reference_config(hidden=30, heads=4)
    with pytest.raises(ValueError, match="positive"):
        reference_config(layers=0)
    with pytest.raises(ValueError, match="unknown --arch"):
        reference_config(arch="gpt2")
    neox = reference_config(arch="gpt_neox", hidden=32, heads=4, ffn=64, layers=3)
    assert (neox.model_type, neox.hidden_size, neox.num_hidden_layers, neox.tie_word_embeddings) == (
        "gpt_neox", 32, 3, False,
    )  # fmt: skip


def test_saved_directory_loads_with_auto_classes(corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

    out = tmp_path / "model"
    report = _tiny_train(corpus_file, out, eval_data=corpus_file, eval_tokens=200)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 0)
    record = json.loads((out / "training.json").read_text())
    assert record["format_version"] == 1 and record["history"]["steps"] == 3
    # the stored evaluation is reproduced by the reloaded model
    text = read_paragraphs(corpus_file)
    assert perplexity(model, tok, text, max_tokens=200) == pytest.approx(record["eval"]["perplexity"], rel=1e-6)
    assert report["eval"]["layer_perplexity"][-1] == pytest.approx(report["eval"]["perplexity"])
    out_ids = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
    assert out_ids.shape == (1, 6)


def test_bfloat16_storage_halves_the_file_and_reports_the_saved_models_perplexity(corpus_file, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full, half = tmp_path / "fp32", tmp_path / "bf16"
    _tiny_train(corpus_file, full, eval_data=corpus_file, eval_tokens=200)
    record = _tiny_train(corpus_file, half, eval_data=corpus_file, eval_tokens=200, save_dtype="bfloat16")
    assert record["save_dtype"] == "bfloat16"
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 (safe_open is not iterable)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32).eval()
    text = read_paragraphs(corpus_file)
    ppl = perplexity(model, AutoTokenizer.from_pretrained(half), text, max_tokens=200)
    assert ppl == pytest.approx(record["eval"]["perplexity"], rel=1e-6)  # the rounded weights were evaluated
    with pytest.raises(ValueError, match="save_dtype must be one of"):
        _tiny_train(corpus_file, tmp_path / "x", save_dtype="int8")


def test_training_is_deterministic(corpus_file):
    a = _tiny_train(corpus_file, None, seed=1)["model"].state_dict()
    b = _tiny_train(corpus_file, None, seed=1)["model"].state_dict()
    c = _tiny_train(corpus_file, None, seed=2)["model"].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_training_reduces_loss(corpus_file):
    report = _tiny_train(corpus_file, None, steps=40)
    curve = report["history"]["loss_curve"]
    assert curve[-1][1] < curve[0][1] - 0.5


def test_perplexity_matches_direct_cross_entropy(tokenizer):
    from deltaexit.testing import tiny_model

    model = tiny_model("llama", num_layers=2, hidden=16, heads=2, vocab=300, max_position_embeddings=64)
    text = _corpus(6, seed=5)
    stream = encode_stream(tokenizer, text, max_tokens=40)
    with torch.no_grad():
        direct = model(input_ids=stream[None], labels=stream[None]).loss  # one window of 40 <= context 64
    assert perplexity(model, tokenizer, text, max_tokens=40, context=64) == pytest.approx(math.exp(direct), rel=1e-5)
    per_layer = layer_perplexities(model, tokenizer, text, max_tokens=40, context=64)
    assert len(per_layer) == 2 and per_layer[-1] == pytest.approx(math.exp(direct), rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tokenizer, "\n\n", max_tokens=10)


def test_cli_errors_are_clear(tmp_path, capsys, corpus_file):
    assert main(["train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "o"), "--no-eval"]) == 1
    assert "empty" in capsys.readouterr().err
    assert main(["train", "--data", str(corpus_file), "--out", str(tmp_path / "o"), "--steps", "0"]) == 1
    assert "--steps" in capsys.readouterr().err
    assert main(["train", "--data", str(corpus_file), "--out", str(tmp_path / "o"), "--hidden", "30", "--no-eval"]) == 1
    assert "divisible" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_trains_and_prints_json(tmp_path, capsys, corpus_file):
    args = ["train", "--data", str(corpus_file), "--out", str(tmp_path / "m"), "--steps", "2", "--quiet"]
    args += [
        "--vocab",
        "300",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--ffn",
        "32",
        "--layers",
        "2",
        "--context",
        "16",
    ]
    args += ["--batch-size", "2", "--eval-data", str(corpus_file), "--eval-tokens", "100"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and len(summary["layer_perplexity"]) == 2
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_cli_trains_a_gpt_neox_that_the_library_finds(tmp_path, capsys, corpus_file):
    from transformers import AutoModelForCausalLM

    from deltaexit.structure import find_structure

    out = tmp_path / "neox"
    args = ["train", "--data", str(corpus_file), "--out", str(out), "--steps", "2", "--quiet", "--arch", "gpt_neox"]
    args += ["--vocab", "300", "--hidden", "16", "--heads", "2", "--ffn", "32", "--layers", "2", "--context", "16"]
    assert main(args + ["--batch-size", "2", "--no-eval"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "gpt_neox" and find_structure(model).num_layers == 2
    assert PRESETS["neox-plain"]["arch"] == "gpt_neox" and PRESETS["neox-plain"]["recipe"] == "plain"


def test_train_without_data_is_a_clear_error(capsys):
    """No default path into a folder a user's clone does not have: --data is required and says what to pass."""
    from deltaexit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--out", "x"])
    assert info.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_build_preset_without_data_names_what_to_pass(tmp_path):
    from deltaexit.reference import build_preset

    with pytest.raises(FileNotFoundError, match=r"data=PATH.*valid\.txt"):
        build_preset("ref256-plain", cache_dir=tmp_path)
