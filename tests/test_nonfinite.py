"""NaN states are refused with an error naming the layer and position (issue 16, item 4).

One embedding row set to NaN: every place that computes labels or features from the states (saturation,
collect_states, collect_to_disk) raises NonFiniteError instead of returning garbage labels (saturation
layer 1 for every token) or writing NaN features.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaexit.collector import NonFiniteError, collect
from deltaexit.features import collect_states
from deltaexit.lens import Lens
from deltaexit.saturation import saturation
from deltaexit.streaming import collect_to_disk
from deltaexit.testing import tiny_model

BAD = 7  # the token whose embedding row is NaN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nan_model():
    model = tiny_model("llama", num_layers=3, hidden=32, vocab=64, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[BAD] = float("nan")
    return model


def _ids(n: int, bad_at: int | None) -> torch.Tensor:
    ids = (torch.arange(n) % 50) + 10
    if bad_at is not None:
        ids[bad_at] = BAD
    return ids


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 12), data=st.data(), topk=st.sampled_from([0, 2]))
def test_saturation_refuses_a_nan_token_and_names_its_position(nan_model, n, data, topk):
    bad_at = data.draw(st.integers(0, n - 1))
    capture = ("h_out",) if topk == 0 else ()
    with torch.no_grad(), collect(nan_model, capture, positions="all", topk=topk) as trace:
        nan_model(input_ids=_ids(n, bad_at)[None])
    with pytest.raises(
        NonFiniteError, match=r"after block 0 \(layer 1\) is NaN or inf at batch row 0, position"
    ) as err:
        saturation(trace, Lens.from_model(nan_model), k=1)
    # NaN keys and values reach earlier positions too (NaN times a 0 attention weight is NaN): the first is named.
    assert int(re.search(r"position (\d+) ", str(err.value)).group(1)) <= bad_at
    assert "model.parameters()" in str(err.value)


def test_saturation_of_finite_states_is_unchanged(nan_model):
    with torch.no_grad(), collect(nan_model, (), positions="all", topk=2) as trace:
        nan_model(input_ids=_ids(10, None)[None])
    assert saturation(trace).num_tokens == 10


def test_saturation_with_mask_positions_names_row_and_position(nan_model):
    ids = torch.stack([_ids(6, None), _ids(6, 4)])
    mask = torch.ones_like(ids)
    with torch.no_grad(), collect(nan_model, (), positions="mask", topk=2) as trace:
        nan_model(input_ids=ids, attention_mask=mask)
    with pytest.raises(NonFiniteError, match="batch row 1, position 0 "):
        saturation(trace)


@pytest.mark.parametrize("bad_at", [0, 37])
def test_collect_states_refuses_nan_states(nan_model, bad_at):
    with pytest.raises(
        NonFiniteError,
        match=f"h_in of block 0 \\(layer 1\\) is NaN or inf at text position {bad_at} \\(token id {BAD};",
    ):
        collect_states(nan_model, _ids(60, bad_at), window=16, batch_size=2)


def test_collect_to_disk_refuses_to_write_nan_features(nan_model, tmp_path):
    docs = [_ids(20, None).tolist(), _ids(20, 5).tolist()]
    with pytest.raises(
        NonFiniteError, match="delta_norm of block 0 \\(layer 1\\) is NaN or inf at document 1, position 0 "
    ):
        collect_to_disk(nan_model, docs, tmp_path / "o", features="delta_norm", context=8, progress=False)
    with pytest.raises(NonFiniteError, match="nothing of this batch was written"):
        collect_to_disk(nan_model, docs, tmp_path / "p", features="lens_topk", topk=2, context=8, progress=False)
