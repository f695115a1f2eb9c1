"""Tests for the FLOP cost model of early-exit decoding (deltaexit.generation.cost)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from deltaexit.generation import CostModel, EarlyExit
from deltaexit.generation.cost import kv_only_flops
from deltaexit.measures.cost import block_flops_per_token
from deltaexit.structure import find_structure
from deltaexit.testing import ARCHITECTURES, ConstantScore, tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=4, hidden=32, heads=4, vocab=128, seed=1)


def test_parts_are_counted_from_the_weights(llama):
    cost = CostModel.from_model(llama, context=10)
    attn = find_structure(llama).blocks[0].self_attn
    assert cost.num_layers == 4
    assert cost.block_flops == block_flops_per_token(llama, context=10)
    assert cost.head_flops == 2 * 128 * 32
    kv = 2.0 * (attn.k_proj.weight.numel() + attn.v_proj.weight.numel())
    assert cost.kv_only_flops == kv
    with_q = CostModel.from_model(llama, context=10, query_skip=False)
    assert with_q.kv_only_flops == kv + 2.0 * attn.q_proj.weight.numel()
    assert cost.head_blocks == pytest.approx(cost.head_flops / cost.block_flops)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_has_a_kv_only_cost(arch):
    model = tiny_model(arch, num_layers=2)
    block = find_structure(model).blocks[0]
    assert 0 < kv_only_flops(block) <= kv_only_flops(block, query_skip=False) < block_flops_per_token(model)


def test_speedup_of_a_run_matches_the_formula(llama):
    """Every token after the first exits after block 2 of 4 under propagate: 2 blocks, 2 K/V-only calls, a head."""
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    out = EarlyExit(llama, ConstantScore(), 0.5, "propagate", min_exit_layer=2).generate(
        ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    s = out.stats
    assert s.blocks_run == 2 * s.decode_steps and s.kv_only_calls == 2 * s.decode_steps
    cost = CostModel.from_model(llama, context=8)
    per_token_measure = s.measure_block_equivalents / s.decode_steps
    expected = cost.speedup(2, measure_blocks_per_token=per_token_measure)
    assert cost.speedup_of(s) == pytest.approx(expected)
    h, k = cost.head_blocks, cost.kv_only_blocks
    assert expected == pytest.approx((4 + h) / (2 + per_token_measure + 2 * k + h))


def test_ceilings(llama):
    cost = CostModel.from_model(llama)
    for kv in ("propagate", "recompute", "verify"):
        assert cost.speedup(4, kv=kv) == pytest.approx(1.0)
        assert cost.share_ceiling(4, kv=kv) == pytest.approx(1.0)
    assert cost.share_ceiling(1) < cost.share_ceiling(1, kv="recompute") < 1.0
    assert cost.share_ceiling(1, measure_blocks_per_token=0.5) < 1.0


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(2, 80),
    head=st.floats(0.0, 10.0),
    kv_only=st.floats(0.0, 0.5),
    frac_a=st.floats(0.01, 1.0),
    frac_b=st.floats(0.01, 1.0),
)
def test_speedup_falls_with_depth_and_never_beats_the_blocks(layers, head, kv_only, frac_a, frac_b):
    cost = CostModel(num_layers=layers, block_flops=1.0, head_flops=head, kv_only_flops=kv_only, context=0)
    a, b = sorted((frac_a * layers, frac_b * layers))
    assert cost.speedup(a) >= cost.speedup(b) - 1e-9
    for kv in ("propagate", "recompute"):
        assert cost.share_ceiling(a, kv=kv) <= 1.0 + 1e-9


def test_meta_device_configuration_costs_no_memory():
    """The ceiling of an 8B-shaped configuration, from a model on the meta device (no weights, no forward)."""
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    cost = CostModel.from_model(model, context=256)
    weights = 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert cost.block_flops == 2.0 * weights + 4.0 * 256 * 32 * 128
    assert cost.head_flops == 2.0 * 4096 * 128256
    assert cost.kv_only_flops == 2.0 * 2 * 4096 * 1024
    assert 0.85 < cost.share_ceiling(16) < 0.95  # half depth: the 128k-way head caps it


def test_bad_input_raises(llama):
    cost = CostModel.from_model(llama)
    with pytest.raises(ValueError, match="blocks_per_token"):
        cost.speedup(0)
    with pytest.raises(ValueError, match="blocks_per_token"):
        cost.speedup(5)
    with pytest.raises(ValueError, match="kv policy"):
        cost.speedup(2, kv="skip")
    with pytest.raises(ValueError, match="context"):
        CostModel.from_model(llama, context=-1)
    other = tiny_model("llama", num_layers=2, hidden=32, heads=4, vocab=128)
    ids = torch.randint(3, 128, (1, 4))
    out = EarlyExit(other, ConstantScore(), 0.5, "propagate").generate(
        ids, max_new_tokens=3, return_dict_in_generate=True
    )
    with pytest.raises(ValueError, match="layers"):
        cost.speedup_of(out.stats)
