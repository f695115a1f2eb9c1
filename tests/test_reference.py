"""The embedded reference models load offline and their lens reproduces their logits."""

from __future__ import annotations

import json

import pytest
import torch

import deltaexit as dx
from deltaexit.reference import available_references, load_reference, reference_path


def test_v1_is_shipped_small_and_loads():
    assert "v1" in available_references()
    path = reference_path("v1")
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size <= 5 * 1024 * 1024
    model, tokenizer = load_reference("v1")
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (
        "llama",
        64,
        4,
        256,
    )
    assert cfg.num_hidden_layers == 8 and cfg.vocab_size == len(tokenizer) == 4096
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    record = json.loads((path / "training.json").read_text())
    assert record["format_version"] == 1 and record["eval"]["max_tokens"] == 65536


@pytest.mark.parametrize("name", ["v1", "v2", "v3"])
def test_lens_reproduces_logits(name):
    if name not in available_references():
        pytest.skip(f"reference {name} not shipped")
    model, tokenizer = load_reference(name)
    ids = tokenizer(["The game was released in Japan .", "A river"], return_tensors="pt", padding=True)
    with torch.no_grad(), dx.collect(model, ("h_out",), positions="all") as trace:
        logits = model(**ids).logits
    lens = dx.Lens.from_model(model)
    mask = ids["attention_mask"].bool()
    assert torch.allclose(lens(trace.h_out[-1])[mask], logits[mask], atol=1e-4)


def test_v3_has_the_proportions_of_real_checkpoints():
    from deltaexit.generation.cost import CostModel

    assert "v3" in available_references()
    path = reference_path("v3")
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size <= 32 * 1024 * 1024  # bfloat16 storage
    model, _ = load_reference("v3")
    assert model.config.num_hidden_layers >= 12 and next(model.parameters()).dtype == torch.float32
    cost = CostModel.from_model(model)
    assert cost.head_flops <= cost.block_flops  # the LM head costs at most one block
    record = json.loads((path / "training.json").read_text())
    assert record["save_dtype"] == "bfloat16" and record["recipe"]["name"] == "layerskip"
    assert record["eval"]["perplexity"] < 1000


def test_v1_predicts_wikitext_better_than_chance():
    from deltaexit.samples import sample_paragraphs
    from deltaexit.training import perplexity

    model, tokenizer = load_reference("v1")
    lines = sample_paragraphs()[:40]  # the WikiText-2 sample the package ships
    assert perplexity(model, tokenizer, lines, max_tokens=1024) < 1000  # uniform would be 4096


def test_unknown_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="available"):
        reference_path("v99")


def test_build_preset_reuses_the_cache_and_rejects_unknown_names(tmp_path):
    from deltaexit.reference import build_preset

    cached = tmp_path / "ref256-plain"
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    assert build_preset("ref256-plain", cache_dir=tmp_path) == cached  # no training when present
    with pytest.raises(ValueError, match="preset"):
        build_preset("ref512", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="valid.txt"):
        build_preset("ref64-plain", cache_dir=tmp_path, data=tmp_path / "missing.txt")
