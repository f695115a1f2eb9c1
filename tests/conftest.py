"""Shared fixtures: tiny random models built offline, cached per session."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "deltaexit",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("deltaexit")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*past_key_values.*")


@pytest.fixture
def llama():
    from deltaexit.testing import cached_tiny_model

    return cached_tiny_model("llama")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run much faster on one torch thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
