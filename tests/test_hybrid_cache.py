"""Early-exit generation on recurrent and hybrid caches (linear attention, Mamba2 hybrids, pure Mamba), MLA, MoE and
sliding-window hybrids: every policy reproduces ``model.generate`` when no token exits, ``verify`` also when every
token drafts, and ``recompute``/``propagate`` keep the caches consistent when tokens exit. Plus the model's own
``use_cache=False`` and the refusals raised before the loop."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from _tiny_lm import CallCounter
from deltaexit.generation.backoff import Backoff
from deltaexit.generation.cost import CostModel
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.kv import UnsupportedCacheError, cache_length, cache_lengths, fresh_cache, has_state
from deltaexit.generation.recompute import Recompute
from deltaexit.generation.verify import Verify
from deltaexit.structure import StructureError
from deltaexit.testing import ConstantScore, hook_counts

COMMON = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "pad_token_id": 0, "eos_token_id": 2}

#: One tiny model per cache kind (sizes set by hand, nested configs included).
CONFIGS: dict[str, tuple[str, dict]] = {
    "linear-attention": (
        "qwen3_5_text",
        {
            "num_hidden_layers": 4,
            "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
        },
    ),
    "mamba2-hybrid": (
        "nemotron_h",
        {
            "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "mamba_num_heads": 8,
            "mamba_head_dim": 8,
            "ssm_state_size": 8,
            "n_groups": 1,
            "chunk_size": 8,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "moe_shared_expert_intermediate_size": 16,
        },
    ),
    "mamba": (
        "mamba",
        {"num_hidden_layers": 3, "state_size": 8, "expand": 2, "time_step_rank": 4, "initializer_range": 0.5},
    ),
    "mla": (
        "deepseek_v3",
        {
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "kv_lora_rank": 16,
            "q_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "moe_intermediate_size": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
        },
    ),
    "moe": (
        "qwen3_moe",
        {
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
        },
    ),
    "sliding-hybrid": (
        "gemma3_text",
        {
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        },
    ),
}


@functools.cache
def model_of(kind: str):
    model_type, fields = CONFIGS[kind]
    config = AutoConfig.for_model(model_type, **{**COMMON, **fields})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


prompt = st.integers(1, 2).flatmap(
    lambda rows: st.integers(3, 6).flatmap(
        lambda n: st.lists(st.integers(3, 127), min_size=rows * n, max_size=rows * n).map(
            lambda ids: torch.tensor(ids, dtype=torch.long).reshape(rows, n)
        )
    )
)
few = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NEW = 6


def generate(model, ids, ee=None):
    common = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    if ee is None:
        return model.generate(ids, attention_mask=torch.ones_like(ids), **common)
    return ee.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, **common)


@pytest.mark.parametrize("kind", list(CONFIGS))
@few
@given(ids=prompt, min_exit=st.integers(1, 2), num_draft=st.integers(1, 3))
def test_every_policy_reproduces_generate_and_verify_is_lossless(kind, ids, min_exit, num_draft):
    model = model_of(kind)
    reference = generate(model, ids)
    never = float("inf")
    for kv in ("verify", "recompute", "propagate"):
        out = generate(model, ids, EarlyExit(model, "softmax-max", never, kv, backoff=False))
        assert torch.equal(out.sequences, reference), (kind, kv)
    drafting = EarlyExit(
        model, "softmax-max", float("-inf"), Verify(num_draft=num_draft), min_exit_layer=min_exit, backoff=False
    )
    out = generate(model, ids, drafting)
    assert torch.equal(out.sequences, reference), (kind, "verify always-exit")
    if out.sequences.shape[1] > ids.shape[1] + 1:  # more than the prompt's token (not an immediate EOS)
        assert out.stats.drafted > 0  # the drafts really were made
    assert len(set(cache_lengths(out.cache))) <= 1


def states(cache):
    """Every recurrent state and key/value tensor of the cache, by layer."""
    found = {}
    for i, layer in enumerate(cache.layers):
        if has_state(layer):
            found[i] = [t for t in layer.recurrent_states.values() if t is not None]
            found[i] += [t[..., -layer.conv_kernel_size[j] :] for j, t in layer.conv_states.items() if t is not None]
        if getattr(layer, "keys", None) is not None:
            found.setdefault(i, []).extend([layer.keys, layer.values])
    return found


@pytest.mark.parametrize("kind", ["linear-attention", "mamba2-hybrid", "mamba"])
@few
@given(ids=prompt, min_exit=st.integers(1, 2), max_pending=st.integers(1, 3))
def test_recompute_holds_back_exited_tokens_and_leaves_the_full_models_states(kind, ids, min_exit, max_pending):
    """With every token exiting, the cache after generation is the one the full model makes over the tokens it
    holds: the recurrent states were put back before the held-back tokens ran again."""
    model = model_of(kind)
    policy = Recompute(max_pending=max_pending)
    out = generate(model, ids, EarlyExit(model, ConstantScore(), 0.5, policy, min_exit_layer=min_exit, backoff=False))
    exits = out.exit_layers[:, 1:]
    assert (exits == min_exit).any()  # tokens did exit (and were held back)
    assert out.stats.rounds > 0
    kept = cache_length(out.cache)
    with torch.no_grad():
        fresh = model(out.sequences[:, :kept], use_cache=True).cache
    ours, full = states(out.cache), states(fresh)
    assert ours.keys() == full.keys()
    for layer in ours:
        for a, b in zip(ours[layer], full[layer], strict=True):
            # float32 rounding of a one-token-at-a-time scan vs the prompt's chunked scan, relative to the state's
            # scale (Mamba SSM states reach ~100: an absolute 1e-4 fails on rounding alone)
            scale = max(1.0, float(b.abs().max()))
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4 * scale), (kind, layer)


@pytest.mark.parametrize("kind", ["mamba"])  # exits cost Mamba more than they save: the monitor backs off
def test_backed_off_recompute_runs_held_back_tokens_in_order(kind):
    """The back-off's full-depth steps run the held-back tokens too (one at a time where the recurrent layers need
    it, as Mamba's do): the cache is still the full model's over the tokens it holds."""
    model = model_of(kind)
    backoff = Backoff(signal="cost", warmup=2, window=2, hold=3)
    ee = EarlyExit(model, ConstantScore(), 0.5, Recompute(max_pending=3), min_exit_layer=1, backoff=backoff)
    ids = torch.tensor([[5, 60, 7, 80], [9, 100, 11, 120]])
    out = ee.generate(ids, max_new_tokens=16, pad_token_id=0, return_dict_in_generate=True)
    assert out.stats.backoff_steps > 0
    with torch.no_grad():
        fresh = model(out.sequences[:, : cache_length(out.cache)], use_cache=True).cache
    ours, full = states(out.cache), states(fresh)
    for layer in ours:
        for a, b in zip(ours[layer], full[layer], strict=True):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max())), (kind, layer)


@pytest.mark.parametrize("kind", ["linear-attention", "mamba2-hybrid", "mamba"])
def test_propagate_advances_skipped_recurrent_states_from_the_exit_state(kind):
    model = model_of(kind)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = generate(model, ids, EarlyExit(model, ConstantScore(), 0.5, "propagate", min_exit_layer=1, backoff=False))
    skipped = [i for i, layer in enumerate(out.cache.layers) if i >= 1 and has_state(layer)]
    assert out.stats.state_calls == len(skipped) * (NEW - 1)
    assert (out.exit_layers[:, 1:] == 1).all()
    assert len(set(cache_lengths(out.cache))) <= 1


@pytest.mark.parametrize("kind", ["linear-attention", "mamba2-hybrid", "mamba"])
def test_rejected_drafts_roll_the_recurrent_states_back(kind):
    model = model_of(kind)
    ids = torch.tensor([[5, 60, 7, 80], [9, 100, 11, 120]])
    policy = Verify(num_draft=3, ngram=0)
    out = generate(model, ids, EarlyExit(model, "softmax-max", float("-inf"), policy, backoff=False))
    assert out.stats.accepted < out.stats.drafted  # some drafts were rejected: the states were rolled back
    assert torch.equal(out.sequences, generate(model, ids))


def test_models_own_use_cache_false_is_not_the_users_request():
    config = AutoConfig.for_model("mpt", vocab_size=128, d_model=32, n_layers=2, n_heads=4, expansion_ratio=2)
    assert config.use_cache is False
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[5, 6, 7]])
    ee = EarlyExit(model, "softmax-max", float("-inf"), "verify")
    assert torch.equal(generate(model, ids, ee).sequences, generate(model, ids))
    with pytest.raises(ValueError, match="do not pass use_cache=False"):
        ee.generate(ids, max_new_tokens=2, pad_token_id=0, use_cache=False)


def test_a_cache_no_policy_can_crop_is_refused_before_any_block_runs():
    """Every cache class the models make is kept consistent now (support matrix); a cache the user passes that no
    policy can crop back (static, quantised, offloaded) is the one left, refused before the prompt runs."""
    from transformers import StaticCache

    from deltaexit.testing import tiny_model

    model = tiny_model("llama")
    ee = EarlyExit(model, "softmax-max", float("-inf"), "verify")  # structure discovery runs its check forward here
    counter = CallCounter(next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), before=True)
    try:
        with pytest.raises(UnsupportedCacheError, match="StaticCache") as err:
            ee.generate(
                torch.tensor([[5, 6]]), max_new_tokens=2, cache=StaticCache(config=model.config, max_cache_len=16)
            )
    finally:
        counter.close()
    assert counter.calls == 0 and hook_counts(model) == 0
    assert "verify" in str(err.value) and "model.generate" in str(err.value)


@pytest.mark.parametrize(
    ("model_type", "fields", "pattern"),
    [
        (  # a looped, recurrent-depth block list
            "dory",
            {
                "num_hidden_layers": 3,
                "n_input_layers": 1,
                "n_recurrent_layers": 1,
                "n_output_layers": 1,
                "n_recurrent_loops": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 8,
                "sliding_window": 8,
            },
            "recurrent.depth",
        ),
    ],
)
def test_block_chains_early_exit_cannot_run_are_refused_after_the_prompt_with_hooks_gone(model_type, fields, pattern):
    config = AutoConfig.for_model(model_type, **{**COMMON, **fields})
    model = AutoModelForCausalLM.from_config(config).eval()
    ee = None
    for _ in range(2):  # the second call (no probe) refuses too; so may structure discovery, up front
        with pytest.raises(StructureError, match=pattern):
            ee = ee or EarlyExit(model, "softmax-max", float("-inf"), "verify")
            ee.generate(torch.tensor([[5, 6]]), max_new_tokens=2, pad_token_id=0)
        assert hook_counts(model) == 0


@pytest.mark.parametrize("kind", ["linear-attention", "mamba2-hybrid", "mamba", "moe"])
def test_cost_model_prices_state_calls_of_skipped_recurrent_blocks(kind):
    model = model_of(kind)
    cost = CostModel.from_model(model, context=16)
    layers = fresh_cache(model.config).layers or [None] * cost.num_layers
    assert cost.recurrent_share == sum(has_state(layer) for layer in layers) / len(layers)
    plain = dataclasses.replace(cost, recurrent_share=0.0)
    bpt = cost.num_layers / 2
    if cost.recurrent_share > 0:  # a state call costs more than a K/V-only call: less speed-up than attention
        assert cost.speedup(bpt, kv="propagate") < plain.speedup(bpt, kv="propagate")
    else:
        assert cost.speedup(bpt, kv="propagate") == plain.speedup(bpt, kv="propagate")
    out = generate(model, torch.tensor([[5, 6, 7]]), EarlyExit(model, ConstantScore(), 0.5, "propagate", backoff=False))
    stats = out.stats
    calls, with_states = stats.state_calls, cost.speedup_of(stats)
    stats.state_calls = 0
    assert (with_states < cost.speedup_of(stats)) == (calls > 0)
