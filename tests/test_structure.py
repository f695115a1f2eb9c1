"""Structure discovery: blocks, final norm, head and logit steps found by structure on every architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltaexit as dx
from deltaexit.testing import ARCHITECTURES, cached_tiny_model, hook_counts, tiny_model


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_discovery_finds_all_blocks_and_validates(model_type):
    model = cached_tiny_model(model_type)
    before = hook_counts(model)
    structure = dx.find_structure(model)
    assert structure.validated
    assert structure.num_layers == model.config.get_text_config().num_hidden_layers
    assert structure.lm_head is model.get_output_embeddings()
    assert hook_counts(model) == before
    summary = structure.describe()
    assert summary["blocks"] and summary["num_layers"] == structure.num_layers


def test_logit_steps_are_read_from_config():
    gemma2 = cached_tiny_model("gemma2")
    granite = cached_tiny_model("granite")
    assert dx.find_structure(gemma2).final_softcap == gemma2.config.final_logit_softcapping
    assert dx.find_structure(granite).logit_divisor == granite.config.logits_scaling


def test_overrides_are_used():
    model = cached_tiny_model("llama")
    s = dx.find_structure(model, blocks="model.layers", final_norm="model.norm", lm_head="lm_head")
    assert s.blocks is model.model.layers and s.final_norm is model.model.norm


def test_wrong_override_fails_the_check_with_a_hint():
    model = cached_tiny_model("llama")
    with pytest.raises(dx.StructureError, match="does not reproduce"):
        dx.find_structure(model, final_norm=None)
    with pytest.raises(dx.StructureError, match="Pass the piece explicitly"):
        dx.find_structure(model, blocks="model.nonexistent")


def test_missing_logit_step_is_detected():
    """Dropping Gemma-2's soft-capping must fail the check: it proves the check sees logit steps."""
    model = tiny_model("gemma2", final_logit_softcapping=0.5)  # a cap small enough to bite
    assert dx.find_structure(model).final_softcap == 0.5
    with pytest.raises(dx.StructureError, match="does not reproduce"):
        dx.find_structure(model, final_softcap=None)
    with pytest.raises(dx.StructureError, match="does not reproduce"):
        dx.find_structure(cached_tiny_model("granite"), logit_divisor=None)


class _NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)

    def forward(self, input_ids=None, **_):
        return self.body(input_ids.float())


def test_unknown_structure_raises_clear_error():
    with pytest.raises(dx.StructureError, match="found no nn.ModuleList"):
        dx.find_structure(_NoBlocks())


def test_ambiguous_block_lists_raise():
    model = tiny_model("llama", num_layers=2)
    model.model.twins = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    with pytest.raises(dx.StructureError, match="several candidate block lists"):
        dx.find_structure(model)


def test_check_layer_range():
    s = dx.find_structure(cached_tiny_model("llama"))
    assert s.check_layer(-1) == s.num_layers - 1
    with pytest.raises(IndexError, match="out of range"):
        s.check_layer(s.num_layers)


def test_validation_restores_training_mode():
    model = tiny_model("llama", num_layers=2)
    model.train()
    dx.find_structure(model)
    assert model.training
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4]]))


def test_opt_project_out_is_part_of_the_lens():
    model = tiny_model("opt", word_embed_proj_dim=16)
    s = dx.find_structure(model)
    assert s.post_norm == (model.model.decoder.project_out,)
    with pytest.raises(dx.StructureError, match="lens"):
        dx.find_structure(model, post_norm=[])


def test_support_matrix_measures_each_column():
    from deltaexit.support import check_architecture

    row = check_architecture("gpt2")
    assert row["collect"] == "ok" and row["lens_exact"] == "ok"
    assert row["lens_max_abs_err"] < 1e-4


def _bert_config(**extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "bert",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        **extra,
    )


def _non_causal_models():
    from transformers import AutoConfig, BertForMaskedLM, BertModel, T5ForConditionalGeneration

    t5 = AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=128)
    return {
        "BertModel": BertModel(_bert_config()),
        "BertForMaskedLM": BertForMaskedLM(_bert_config()),
        "T5ForConditionalGeneration": T5ForConditionalGeneration(t5),
    }


@pytest.mark.parametrize("entry", ["find_structure", "collect", "Lens.from_model"])
def test_non_causal_model_is_told_it_is_not_a_causal_lm(entry):
    """Issue 16 item 6: an encoder / encoder-decoder model hears what it is, not override advice."""
    call = {
        "find_structure": dx.find_structure,
        "collect": dx.collect,
        "Lens.from_model": dx.Lens.from_model,
    }[entry]
    for name, model in _non_causal_models().items():
        with pytest.raises(dx.StructureError) as exc:
            call(model)
        message = str(exc.value)
        assert "decoder-only causal LM" in message and name in message, message
        assert "get_output_embeddings" not in message and "Pass the piece explicitly" not in message, message
        assert "does not reproduce" not in message, message


def test_non_causal_check_is_no_name_list():
    """The check reads the config / generation ability, so every registered causal LM still passes."""
    from deltaexit.structure import not_causal_lm_reason

    for model_type in ARCHITECTURES:
        assert not_causal_lm_reason(cached_tiny_model(model_type)) is None, model_type
    assert not_causal_lm_reason(nn.Linear(2, 2)) is None  # not a transformers model: left to the forward check


def test_nan_weights_are_reported_as_nan_not_as_a_structure_problem():
    """Issue 16 item 5: a model producing NaN logits is told so, with no override advice."""
    model = tiny_model("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(dx.StructureError) as exc:
        dx.find_structure(model)
    message = str(exc.value)
    assert "NaN" in message, message
    assert "Pass the piece explicitly" not in message and "blocks=" not in message, message
