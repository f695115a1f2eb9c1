"""Structure discovery beyond the 19 families (issue 14 items 3 and 4).

Heterogeneous block lists (Jamba, OLMo-hybrid), text decoders inside multimodal wrappers (Gemma-3, Llama-4),
a ``get_decoder()`` that returns the head (ModernBERT-decoder), and the steps between the last block and the
logits that only a traced forward shows (Llama-4's norm one level down, ERNIE's and RoBERTa's prediction-head
transforms, DeepSeek-V4's hyper-connection merge, CPM-Ant's prompt positions, Inkling's width multiplier and
padded vocabulary, RecurrentGemma's and xLSTM's logit soft-capping). Each model is a tiny random one built
offline from its default config, shrunk.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import deltaexit as dx
from deltaexit.testing import hook_counts, random_batch

VOCAB = 128
#: Size knobs set wherever the default config has them (the rest of each config stays the default).
SMALL: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}


def small_config(model_type: str, **extra: Any):
    """``AutoConfig.for_model(model_type)`` with :data:`SMALL` applied to the fields it has, then ``extra``."""
    default = AutoConfig.for_model(model_type)
    fields = {k: v for k, v in SMALL.items() if hasattr(default, k)}
    return AutoConfig.for_model(model_type, **{**fields, **extra})


#: Per-type knobs the common ones do not cover (expert counts, SSM and low-rank widths, nested configs).
EXTRA: dict[str, dict[str, Any]] = {
    "jamba": {
        "num_hidden_layers": 4,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "num_experts": 2,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "mamba_d_state": 4,
    },
    "olmo_hybrid": {
        "num_hidden_layers": 4,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 16,
    },
    "modernbert-decoder": {"global_attn_every_n_layers": 2, "cls_token_id": 1, "sep_token_id": 2},
    "gemma3": {
        "text_config": dict(SMALL),
        "vision_config": {**VISION, "image_size": 28, "patch_size": 14},
        "mm_tokens_per_image": 4,
    },
    "llama4_text": {"num_local_experts": 2, "intermediate_size_mlp": 64},
    "mllama": {"text_config": {**SMALL, "cross_attention_layers": []}},
    "ernie": {"is_decoder": True},
    "roberta": {"is_decoder": True},
    "cpmant": {"dim_model": 32, "num_heads": 4, "dim_head": 8, "dim_ff": 64, "prompt_length": 4},
    "deepseek_v4": {
        "q_lora_rank": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "o_groups": 2,
        "o_lora_rank": 16,
        "index_n_heads": 2,
        "index_head_dim": 8,
        "index_topk": 4,
        "sliding_window": 8,
        "hc_mult": 2,
        "hc_sinkhorn_iters": 3,
    },
    "inkling_text": {
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2,
        "swa_head_dim": 8,
        "moe_intermediate_size": 32,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "d_rel": 4,
        "rel_extent": 16,
        "sliding_window_size": 8,
        "unpadded_vocab_size": 120,
    },
    "recurrent_gemma": {"num_hidden_layers": 3, "lru_width": 32},
    "xlstm": {"num_blocks": 2, "embedding_dim": 32, "num_heads": 4},
}
WIDE = tuple(EXTRA)


def build(model_type: str, seed: int = 0, **extra: Any) -> nn.Module:
    config = small_config(model_type, **{**EXTRA.get(model_type, {}), **extra})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@functools.cache
def cached(model_type: str) -> nn.Module:
    return build(model_type)


def _check_exact(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Deltas telescope and the lens on the last block's output gives the model's logits, on real tokens."""
    structure = dx.find_structure(model)
    with torch.no_grad(), dx.collect(model, ("h_in", "h_out", "delta")) as trace:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # caches: issue 14 item 2
    real = mask.bool()
    h_in, h_out, delta = trace.h_in[:, real], trace.h_out[:, real], trace.delta[:, real]
    scale = max(1.0, h_out.abs().max().item())
    assert torch.allclose(h_in[0] + delta.sum(0), h_out[-1], atol=1e-4 * scale, rtol=1e-4)
    assert torch.allclose(h_in[1:], h_out[:-1], atol=1e-5 * scale)  # each block reads the previous one's output
    with torch.no_grad():
        lens = dx.Lens(structure)(h_out[-1])
    assert (lens - logits[real]).abs().max().item() < 1e-4
    assert hook_counts(model) == 0


@pytest.mark.parametrize("model_type", WIDE)
def test_discovery_is_exact_on_the_wider_mapping(model_type):
    model = cached(model_type)
    structure = dx.find_structure(model)
    assert structure.validated and structure.num_layers == len(structure.blocks)
    ids, mask = random_batch(VOCAB, 2, 6, pad="left")
    _check_exact(model, ids, mask)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model_type=st.sampled_from(WIDE),
    batch=st.integers(1, 3),
    seq=st.integers(1, 7),
    pad=st.sampled_from([None, "left", "right"]),
    seed=st.integers(0, 1000),
)
def test_lens_and_telescoping_hold_for_any_input(model_type, batch, seq, pad, seed):
    ids, mask = random_batch(VOCAB, batch, seq, seed=seed, pad=pad)
    _check_exact(cached(model_type), ids, mask)


def test_heterogeneous_block_lists_are_the_blocks():
    for model_type in ("jamba", "olmo_hybrid"):
        model = cached(model_type)
        structure = dx.find_structure(model)
        assert len({type(b) for b in structure.blocks}) == 2, model_type  # both layer kinds, one list
        assert structure.num_layers == model.config.num_hidden_layers


def test_nested_text_decoder_is_found_not_the_vision_tower():
    model = cached("gemma3")
    structure = dx.find_structure(model)
    assert structure.blocks is model.get_decoder().layers
    vision = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and "vision" in n]
    assert vision and all(structure.blocks is not m for m in vision)


def test_decoder_root_that_is_the_head_is_not_searched():
    model = cached("modernbert-decoder")
    assert not any(isinstance(m, nn.ModuleList) for m in model.get_decoder().modules())
    assert dx.find_structure(model).num_layers == 2


@settings(max_examples=4, deadline=None)
@given(multiplier=st.floats(0.25, 64.0), cut=st.integers(1, 40))
def test_width_multiplier_and_vocab_slice_are_read_off_the_forward(multiplier, cut):
    """The divisor and the vocabulary slice are measured, not looked up: any value is found."""
    model = build("inkling_text", logits_mup_width_multiplier=multiplier, unpadded_vocab_size=VOCAB - cut)
    structure = dx.find_structure(model)
    found = 1.0 if structure.hidden_scale is None else structure.hidden_scale  # None: no scale to apply
    assert found == pytest.approx(1.0 / multiplier, rel=1e-4)
    assert structure.vocab_limit == VOCAB - cut and structure.vocab_size == VOCAB - cut
    ids, mask = random_batch(VOCAB, 1, 4, seed=cut)
    _check_exact(model, ids, mask)


@settings(max_examples=4, deadline=None)
@given(cap=st.floats(0.5, 100.0))
def test_soft_capping_is_read_off_the_forward(cap):
    """xLSTM soft-caps its logits under a config name the library never reads: the cap is measured."""
    model = build("xlstm", output_logit_soft_cap=cap)
    structure = dx.find_structure(model)
    assert structure.final_softcap == pytest.approx(cap, rel=1e-3)
    ids, mask = random_batch(VOCAB, 2, 5, seed=int(cap))
    _check_exact(model, ids, mask)


def test_steps_between_last_block_and_head_are_named():
    deepseek, cpmant, ernie = cached("deepseek_v4"), cached("cpmant"), cached("ernie")
    assert dx.find_structure(deepseek).pre_norm == (deepseek.model.hc_head,)
    assert dx.find_structure(cpmant).prefix_positions == cpmant.config.prompt_length
    assert dx.find_structure(ernie).post_norm == (ernie.cls.predictions.transform,)
    assert dx.find_structure(cached("llama4_text")).final_norm is cached("llama4_text").model.norm


@pytest.mark.parametrize("model_type", ["deepseek_v4", "inkling_text", "roberta"])
def test_candidate_logits_follow_the_found_path(model_type):
    model = cached(model_type)
    lens = dx.Lens.from_model(model)
    ids, mask = random_batch(VOCAB, 2, 5, seed=3)
    with torch.no_grad(), dx.collect(model, ("h_out",)) as trace:
        model(input_ids=ids, attention_mask=mask)
    h = trace.h_out[-1]
    with torch.no_grad():
        full = lens(h)
        top = full.topk(3, dim=-1)
        assert torch.allclose(lens.candidate_logits(h, top.indices), top.values, atol=1e-5)
    assert full.shape[-1] == lens.vocab_size


def test_model_without_a_findable_block_list_names_candidates_and_override():
    model = build("llama4_text")
    model.config.num_hidden_layers = 5  # the config matches no list, and two lists of one class are left
    model.model.taps = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    ran: list[int] = []
    counters = [b.register_forward_pre_hook(lambda *_: ran.append(1)) for b in model.model.layers]
    for call in (dx.find_structure, dx.collect, dx.Lens.from_model, lambda m: dx.EarlyExit(m, "softmax-max", 0.9)):
        with pytest.raises(dx.StructureError) as exc:
            call(model)
        message = str(exc.value)
        assert "'model.layers' (2: 2 x Llama4TextDecoderLayer)" in message, message
        assert "'model.taps' (3: 3 x Linear)" in message, message
        assert "num_hidden_layers=5" in message and "blocks='model.layers'" in message, message
        assert hook_counts(model) == len(counters)  # only the test's own counters
    assert not ran  # the error came before any block ran
    for handle in counters:
        handle.remove()
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    structure = dx.find_structure(model, blocks="model.layers")  # the override the message names works
    assert structure.num_layers == 2


def test_config_count_of_another_stack_falls_back_to_the_one_list():
    model = build("llama4_text")
    model.config.num_hidden_layers = 5  # e.g. BART's num_hidden_layers counts its encoder
    assert dx.find_structure(model).blocks is model.model.layers


def test_no_module_list_at_all_is_said_so():
    model = build("llama4_text")
    model.model.layers = nn.Sequential(*model.model.layers)  # the forward still runs; no ModuleList is left
    with pytest.raises(dx.StructureError, match="the module lists it holds: none") as exc:
        dx.collect(model)
    assert "blocks=" in str(exc.value) and "a sequence of the block modules" in str(exc.value)
    assert hook_counts(model) == 0


def test_ambiguous_mixed_lists_name_the_override():
    model = build("jamba")
    model.model.twin = nn.ModuleList([nn.Linear(2, 2), nn.Identity(), nn.Linear(2, 2), nn.Identity()])
    with pytest.raises(dx.StructureError, match="several candidate block lists") as exc:
        dx.find_structure(model)
    assert "blocks=" in str(exc.value)
    assert dx.find_structure(model, blocks="model.layers").num_layers == 4


def test_blocks_the_model_skips_without_image_inputs_are_recorded_as_skipped():
    """Mllama skips its cross-attention blocks on token ids alone: identity steps (tests/test_structure_more.py)."""
    model = build("mllama", text_config={**SMALL, "num_hidden_layers": 3, "cross_attention_layers": [1]})
    structure = dx.find_structure(model)
    assert structure.skipped == (1,) and structure.describe()["skipped"] == [1]
    assert hook_counts(model) == 0


class _NeedsPixels(nn.Module):
    """A wrapper whose forward refuses to run without image inputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, pixel_values=None, **kwargs):
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        return self.inner(input_ids=input_ids, **kwargs)


def test_forward_that_needs_more_than_token_ids_says_what_to_pass():
    model = _NeedsPixels(build("llama4_text"))
    with pytest.raises(dx.StructureError) as exc:
        dx.find_structure(model)
    message = str(exc.value)
    assert "pixel_values is required" in message and "input_ids alone" in message
    assert "get_text_config" in message and "validate=False" in message
    assert hook_counts(model) == 0


def test_looped_model_is_refused_with_the_reason():
    """Dory runs part of its block list several times per forward: no one-pass residual stream to collect."""
    model = build("dory", num_hidden_layers=3)
    with pytest.raises(dx.StructureError, match="times in one forward") as exc:
        dx.collect(model)
    assert "loops over part of its block list" in str(exc.value)
    assert hook_counts(model) == 0
