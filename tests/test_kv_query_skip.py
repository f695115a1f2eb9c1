"""``propagate``'s K/V-only calls skip the query projection: same tokens and cache, model left unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from deltaexit.generation import CostModel, EarlyExit, Propagate
from deltaexit.generation.kv import fresh_cache, store_kv_only
from deltaexit.structure import find_structure, query_projection
from deltaexit.testing import ARCHITECTURES, ConstantScore, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4
EXIT = 2  # every token exits after block 2 of 4: two K/V-only calls per token
FUSED = ("gpt2", "gpt_neox", "bloom", "falcon", "phi3")  # one fused q/k/v projection: nothing to skip


_MODELS: dict[str, torch.nn.Module] = {}


def model_of(arch: str) -> torch.nn.Module:
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch, num_layers=LAYERS, seed=7)
    return _MODELS[arch]


def prompt():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 128, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding in row 1
    return ids, mask


def generate(model, skip: bool):
    ids, mask = prompt()
    ee = EarlyExit(model, ConstantScore(), 0.5, Propagate(query_skip=skip), min_exit_layer=EXIT)
    with torch.no_grad():
        return ee.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, return_dict_in_generate=True)


def q_modules(model):
    found = [query_projection(block) for block in find_structure(model).blocks]
    return [None if f is None else f[0]._modules[f[1]] for f in found]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_skip_gives_the_same_tokens_and_cache(arch):
    model = model_of(arch)
    on, off = generate(model, True), generate(model, False)
    assert on.stats.kv_only_calls > 0 and (on.exit_layers[:, 1:] == EXIT).all()
    assert torch.equal(on.sequences, off.sequences)
    assert torch.equal(on.exit_layers, off.exit_layers)
    assert len(on.cache.layers) == len(off.cache.layers) == LAYERS
    for a, b in zip(on.cache.layers, off.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("arch", ["llama", "gpt_neo", "opt", "gemma2", "gpt2"])
def test_model_is_unchanged_after_generation(arch):
    model = model_of(arch)
    before_q = q_modules(model)
    before_modules = list(model.named_modules())
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    generate(model, True)
    assert all(a is b for a, b in zip(q_modules(model), before_q))
    after_modules = list(model.named_modules())
    assert [n for n, _ in after_modules] == [n for n, _ in before_modules]
    assert all(a is b for (_, a), (_, b) in zip(after_modules, before_modules))
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)


@pytest.mark.parametrize("arch", FUSED)
def test_fused_qkv_falls_back(arch):
    model = model_of(arch)
    assert all(query_projection(block) is None for block in find_structure(model).blocks)
    out = generate(model, True)
    assert out.stats.kv_only_calls == 4 * (LAYERS - EXIT)  # 5 new tokens: the prompt forward, then 4 early exits


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in FUSED])
@pytest.mark.parametrize("skip", [True, False])
def test_query_projection_runs_once_per_block_run(arch, skip):
    model = model_of(arch)
    calls = [0]

    def count(_module, _args, _output):
        calls[0] += 1

    handles = [q.register_forward_hook(count) for q in q_modules(model)]
    assert len(handles) == LAYERS
    try:
        out = generate(model, skip)
    finally:
        for h in handles:
            h.remove()
    s = out.stats
    assert s.kv_only_calls > 0
    expected = LAYERS + s.blocks_run + (0 if skip else s.kv_only_calls)  # the prompt's forward, then the loop
    assert calls[0] == expected, "the q projection ran in K/V-only calls: is the block passed to store_kv_only?"


def test_store_kv_only_restores_the_projection_when_the_block_fails():
    model = model_of("llama")
    block = find_structure(model).blocks[0]
    attn, name = query_projection(block)
    original = attn._modules[name]
    seen = []

    def failing_block():
        seen.append(attn._modules[name])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store_kv_only(fresh_cache(), 0, failing_block, block=block)
    assert seen[0] is not original and attn._modules[name] is original
    # without the block (or with the switch off) nothing is swapped
    seen.clear()
    with pytest.raises(RuntimeError):
        store_kv_only(fresh_cache(), 0, failing_block)
    assert seen[0] is original
    seen.clear()
    with pytest.raises(RuntimeError):
        store_kv_only(fresh_cache(), 0, failing_block, block=block, query_skip=False)
    assert seen[0] is original


def test_replaced_projection_is_found_again():
    model = tiny_model("llama", num_layers=2)
    block = find_structure(model).blocks[0]
    attn, name = query_projection(block)
    stand_ins = []

    def grab():
        stand_ins.append(attn._modules[name])
        raise RuntimeError

    with pytest.raises(RuntimeError):
        store_kv_only(fresh_cache(), 0, grab, block=block)
    replacement = torch.nn.Linear(attn._modules[name].in_features, 8)
    attn._modules[name] = replacement
    with pytest.raises(RuntimeError):
        store_kv_only(fresh_cache(), 0, grab, block=block)
    assert stand_ins[1].out_features == 8 and attn._modules[name] is replacement


def test_the_library_ignores_the_old_environment_switch():
    """The query skip is a field (``Propagate(query_skip=...)``, ``CostModel.from_model(query_skip=...)``);
    ``DELTAEXIT_NO_QSKIP`` (read by the speed benchmark only) changes nothing in the library."""
    code = (
        "from deltaexit.generation import CostModel, Propagate; from deltaexit.testing import tiny_model; "
        "print(Propagate().query_skip, CostModel.from_model(tiny_model('llama', num_layers=2)).kv_only_flops)"
    )
    expected = f"True {CostModel.from_model(tiny_model('llama', num_layers=2)).kv_only_flops}"
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    for value in ("1", "0"):
        env = {**os.environ, "DELTAEXIT_NO_QSKIP": value, "PYTHONPATH": src}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
