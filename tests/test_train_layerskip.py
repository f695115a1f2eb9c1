"""The LayerSkip recipe: dropout schedule, exit weights, block taps, early-exit loss vs a direct computation."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

from deltaexit.lens import Lens
from deltaexit.testing import tiny_model
from deltaexit.training import (
    BlockTaps,
    LayerSkipRecipe,
    TrainConfig,
    early_exit_loss,
    exit_loss_weights,
    fit_tokenizer,
    get_recipe,
    layer_dropout_schedule,
    save_model_dir,
    train_reference,
)


@given(st.integers(1, 40), st.floats(0.0, 0.99), st.integers(0, 100), st.sampled_from(["none", "exp"]))
def test_dropout_schedule_monotone_and_bounded(layers, p_max, step, warmup):
    probs = layer_dropout_schedule(layers, p_max, step=step, total_steps=101, warmup=warmup)
    assert len(probs) == layers
    assert all(0.0 <= p <= p_max + 1e-12 for p in probs)
    assert all(a <= b + 1e-15 for a, b in itertools.pairwise(probs))
    if warmup == "none" and layers > 1:
        assert probs[0] == 0.0 and probs[-1] == pytest.approx(p_max)
        # exponential: the gaps grow with depth
        gaps = [b - a for a, b in itertools.pairwise(probs)]
        assert all(g1 <= g2 + 1e-12 for g1, g2 in itertools.pairwise(gaps))


def test_dropout_schedule_time_warmup_and_errors():
    early = layer_dropout_schedule(4, 0.2, step=0, total_steps=100, warmup="exp")
    late = layer_dropout_schedule(4, 0.2, step=99, total_steps=100, warmup="exp")
    assert early == [0.0] * 4 and late == pytest.approx(layer_dropout_schedule(4, 0.2))
    with pytest.raises(ValueError, match="p_max"):
        layer_dropout_schedule(4, 1.0)
    with pytest.raises(ValueError, match="warmup"):
        layer_dropout_schedule(4, 0.1, warmup="linear")


@given(st.integers(1, 16), st.integers(0, 50), st.sampled_from(["all", "rotational", "gradual"]))
def test_exit_loss_weights_properties(layers, step, curriculum):
    w = exit_loss_weights(layers, step, "layerskip", curriculum, scale=1.0, rotation=2, total_steps=50)
    assert len(w) == layers and sum(w) == pytest.approx(1.0) and w[-1] > 0
    assert all(x >= 0 for x in w)
    on = [x for x in w[:-1] if x > 0]
    assert all(a < b for a, b in itertools.pairwise(on))  # rising with depth among the active early layers
    if curriculum == "all":
        assert all(x > 0 for x in w)
    if curriculum == "rotational" and layers > 2:
        other = exit_loss_weights(layers, step + 1, "layerskip", "rotational", rotation=2)
        assert {i for i, x in enumerate(w[:-1]) if x > 0}.isdisjoint({i for i, x in enumerate(other[:-1]) if x > 0})


def test_gradual_curriculum_switches_layers_on_from_the_top():
    active = [sum(x > 0 for x in exit_loss_weights(5, t, curriculum="gradual", total_steps=80)) for t in range(80)]
    assert active[0] == 2 and active[-1] == 5
    assert all(a <= b for a, b in itertools.pairwise(active))
    w = exit_loss_weights(5, 0, curriculum="gradual", total_steps=80)
    assert w[3] > 0 and w[0] == w[1] == w[2] == 0


def test_calm_and_plain_weights():
    assert exit_loss_weights(4, 0, kind="calm") == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert exit_loss_weights(3, 7, kind="none") == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="curriculum"):
        exit_loss_weights(3, 0, curriculum="random")
    with pytest.raises(ValueError, match="exit loss"):
        exit_loss_weights(3, 0, kind="deep")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "opt"])
def test_early_exit_loss_equals_weighted_per_layer_ce(arch):
    model = tiny_model(arch, num_layers=3, hidden=32, heads=4, vocab=128)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    weights = [0.2, 0.3, 0.5]
    loss, per_layer = early_exit_loss(model, ids, weights)
    # direct: hidden_states[l + 1] is block l's output for l < L-1; the last layer is the model's logits
    lens = Lens.from_model(model)
    direct = []
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        for layer in range(3):
            logits = out.logits if layer == 2 else lens(out.hidden_states[layer + 1])
            direct.append(F.cross_entropy(logits[:, :-1].reshape(-1, 128).float(), ids[:, 1:].reshape(-1)))
    assert per_layer == pytest.approx([float(x) for x in direct], rel=1e-5)
    assert float(loss.detach()) == pytest.approx(sum(w * float(c) for w, c in zip(weights, direct)), rel=1e-5)
    # layers with weight 0 are not scored
    _, skipped = early_exit_loss(model, ids, [0.0, 0.0, 1.0])
    assert skipped[0] != skipped[0] and skipped[2] == pytest.approx(float(direct[2]), rel=1e-5)


def test_block_taps_no_dropout_in_eval_and_residual_path_in_training():
    model = tiny_model("llama", num_layers=3, hidden=32, heads=4, vocab=128)
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with BlockTaps(model, drop_probs=[0.99, 0.99, 0.99]) as taps:  # eval mode: nothing dropped
            logits = model(input_ids=ids).logits
        assert torch.allclose(logits, reference, atol=1e-6)
        assert all(d is None for d in taps.dropped)
        model.train()
        try:
            with BlockTaps(model, drop_probs=[1.0, 1.0, 1.0]) as taps:  # every block skipped
                skipped = model(input_ids=ids).logits
        finally:
            model.eval()
        embeds = model.get_input_embeddings()(ids)
        assert torch.allclose(skipped, Lens.from_model(model)(embeds), atol=1e-5)
        assert torch.equal(taps.outputs[2], embeds)
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in model.model.layers)
    with pytest.raises(ValueError, match="blocks"):
        BlockTaps(model, drop_probs=[0.1])


def test_block_taps_drop_per_sample():
    model = tiny_model("llama", num_layers=2, hidden=32, heads=4, vocab=128).train()
    ids = torch.randint(0, 128, (64, 4), generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), BlockTaps(model, drop_probs=[0.0, 0.5], generator=g) as taps:
        model(input_ids=ids)
    model.eval()
    dropped = taps.dropped[1]
    assert taps.dropped[0] is None and 10 < int(dropped.sum()) < 54


def test_recipe_validation():
    with pytest.raises(ValueError, match="curriculum"):
        LayerSkipRecipe(curriculum="sometimes")
    with pytest.raises(ValueError, match="exit-loss"):
        LayerSkipRecipe(exit_loss="deep")
    with pytest.raises(ValueError, match="p_max"):
        LayerSkipRecipe(p_max=1.5)
    with pytest.raises(ValueError, match="recipe"):
        get_recipe("distill")


@pytest.mark.parametrize("exit_loss", ["layerskip", "calm"])
def test_recipe_continues_a_non_llama_checkpoint(tmp_path, exit_loss):
    texts = [f"the river {i} was north of the city and the team played" for i in range(60)]
    data = tmp_path / "train.txt"
    data.write_text("\n".join(texts))
    tokenizer = fit_tokenizer(texts, vocab_size=300)
    model = tiny_model("gpt2", num_layers=3, hidden=32, heads=4, vocab=len(tokenizer), n_positions=32)
    save_model_dir(model, tokenizer, tmp_path / "init")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = LayerSkipRecipe(p_max=0.2, exit_loss=exit_loss, curriculum="all")
    report = train_reference(
        data,
        tmp_path / "out",
        init=tmp_path / "init",
        train=TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup=1, threads=1),
        recipe=recipe,
        context=16,
        progress=False,
    )
    assert report["recipe"]["exit_loss"] == exit_loss and report["init"] == str(tmp_path / "init")
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
