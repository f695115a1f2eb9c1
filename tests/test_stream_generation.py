"""Early-exit generation on residual streams stacked on a leading axis (Gemma-3n's AltUp): the runner hands blocks
their own ``[streams, batch, seq, hidden]`` layout and the policies see ``[batch, seq, streams, hidden]`` states;
Gemma-3n's last blocks reuse the keys/values an earlier block stores in the forward's shared mapping (no cache of
their own), so ``verify``'s deep pass starts at the first storing block below the exit."""

from __future__ import annotations

import functools

import pytest
import torch

from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.propagate import Propagate
from deltaexit.generation.recompute import Recompute
from deltaexit.generation.verify import Verify
from deltaexit.shrink import tiny_model_for
from deltaexit.structure import find_structure
from deltaexit.testing import ConstantScore, hook_counts

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([[5, 9, 13, 17, 21, 25], [7, 11, 3, 19, 23, 4]])
NEW = 6


@functools.cache
def _gemma3n():
    model = tiny_model_for("gemma3n_text")
    model.eval()
    return model


def _reference(model):
    return model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def test_structure_is_streams_with_shared_kv():
    model = _gemma3n()
    s = find_structure(model)
    assert s.leading_streams and s.state_dims == 2
    assert "reuse" in model.config.kv_sharing_modes  # the tiny model keeps Gemma-3n's KV sharing


@pytest.mark.parametrize("policy", ["verify", "propagate", "recompute"])
def test_never_exit_reproduces_generate(policy):
    model = _gemma3n()
    ee = EarlyExit(model, ConstantScore(0.0), 0.5, policy, min_exit_layer=1)
    out = ee.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _reference(model))
    assert hook_counts(model) == 0


@pytest.mark.parametrize("exit_after", [2, 6])
def test_verify_always_exit_is_lossless(exit_after):
    """Every token drafts after block ``exit_after``; after 6 the exit lies past both storing blocks (3, 4) and
    before reusing ones (5..7): the deep pass must rerun the storing blocks for the reusing ones to read."""
    model = _gemma3n()
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, Verify(num_draft=3), min_exit_layer=exit_after)
    out = ee.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, _reference(model))
    assert out.stats.drafted > 0
    assert sorted(ee.runner.shared_writers) == [3, 4]  # the blocks whose stored keys/values later blocks read


@pytest.mark.parametrize("policy", [Propagate(), Recompute(max_pending=2)])
def test_exits_keep_caches_consistent(policy):
    model = _gemma3n()
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, policy, min_exit_layer=6)
    out = ee.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert out.sequences.shape == (2, PROMPT.shape[1] + NEW)
    assert (out.exit_layers[:, 1:] <= model.config.num_hidden_layers).all()
    assert 6 in out.exit_layers.tolist()[0]


def test_hidden_state_measure_on_streams_is_a_clear_error():
    from deltaexit.measures.simple import StateCosine

    model = _gemma3n()
    ee = EarlyExit(model, StateCosine(), 0.0, "propagate", min_exit_layer=2)
    with pytest.raises(ValueError, match="one score per row"):
        ee.generate(PROMPT, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert hook_counts(model) == 0


@functools.cache
def _gemma4_shared():
    layer_types = ["sliding_attention", "full_attention"] * 3
    model = tiny_model_for("gemma4_text", num_hidden_layers=6, num_kv_shared_layers=2, layer_types=layer_types)
    return model.eval()


@pytest.mark.parametrize("exit_after", [1, 5])
def test_gemma4_kv_sharing_verify_is_lossless(exit_after):
    """Gemma-4 cuts the sequence to the kept logits before its KV-sharing blocks when generate asks for one
    position's logits; the runner's recording keeps every position, so verify chunks stay exact."""
    model = _gemma4_shared()
    assert model.config.kv_sharing_modes[-2:] == ["reuse", "reuse"]
    ids = PROMPT[:, :4]
    ref = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, Verify(num_draft=2), min_exit_layer=exit_after)
    out = ee.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert sorted(ee.runner.shared_writers) == [2, 3]


def test_a_forward_that_cuts_the_sequence_inside_its_block_loop_is_refused_by_name():
    """Asked for one position's logits, Gemma-4 cuts the sequence before its KV-sharing blocks: recording such a
    forward is a named StructureError, not blocks run on mismatched positions."""
    from deltaexit.generation.runner import BlockRunner
    from deltaexit.structure import StructureError

    model = _gemma4_shared()
    runner = BlockRunner(model)
    handle = runner.probe_output_type()
    with torch.no_grad():
        model(PROMPT[:, :4])
    handle.remove()
    with torch.no_grad(), pytest.raises(StructureError, match="cuts the sequence inside its block loop"):
        runner.record(input_ids=PROMPT[:, :4], use_cache=False, logits_to_keep=1)
    hidden, calls = runner.record(input_ids=PROMPT[:, :4], use_cache=False, logits_to_keep=0)
    assert hidden.shape[1] == 4 and len(calls) == 6
    assert hook_counts(model) == 0
