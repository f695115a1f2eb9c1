"""EarlyExit's defaults exit: the threshold follows the policy, and a threshold that cannot work is warned."""

from __future__ import annotations

import math

import pytest
import torch

from deltaexit.generation.early_exit import EarlyExit
from deltaexit.testing import ConstantScore, tiny_model


@pytest.mark.parametrize(("kv", "expected"), [("verify", -math.inf), ("propagate", 0.9), ("recompute", 0.9)])
def test_default_threshold_follows_the_policy(kv, expected):
    ee = EarlyExit(tiny_model("llama", num_layers=4), kv=kv)
    assert ee.measure.name == "softmax-max"
    assert ee.schedule.values(0, 4)[0] == expected


def test_defaults_exit_and_stay_lossless():
    model = tiny_model("llama", num_layers=4)
    ids = torch.tensor([[5, 6, 7, 5, 6]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = EarlyExit(model).generate(ids, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, model.generate(ids, **kw))
    assert out.stats.drafted > 0  # the default drafts (it does not run every token at full depth)


def test_a_lossy_policy_without_a_known_threshold_asks_for_one():
    with pytest.raises(ValueError, match="needs a threshold"):
        EarlyExit(tiny_model("llama", num_layers=4), ConstantScore(), kv="propagate")


def test_a_threshold_that_never_exits_is_warned_with_a_useful_value():
    with pytest.warns(UserWarning, match=r"never exits.*try e\.g\. -2"):
        EarlyExit(tiny_model("llama", num_layers=4), "delta-norm", 0.9)
