"""deltaexit worker: ``dx.collect`` + ``dx.Lens`` on every tiny family (see ``benchmarks/peers_tracing.py``)."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

SNIPPET = """\
import deltaexit as dx
with dx.collect(model, capture=("h_in", "h_out")) as trace:
    model(input_ids=ids)
lens = dx.Lens.from_model(model)
logits = lens(trace.h_out)  # [layers, batch, seq, vocab]
"""


def version() -> str:
    import deltaexit as dx

    return str(dx.__version__)


@torch.no_grad()
def family(model: Any, sizes: dict[str, int]) -> dict[str, Any]:
    import deltaexit as dx

    ids = common.input_ids(sizes["vocab"])
    logits, ref_in, ref_out = common.reference(model, ids)
    with dx.collect(model, capture=("h_in", "h_out")) as trace:
        model(input_ids=ids)
    lens = dx.Lens.from_model(model)
    lens_logits = lens(trace.h_out)
    capture = common.capture_check(list(trace.h_out), list(trace.h_in), ref_in, ref_out)
    return {"capture": capture, "lens_error": common.lens_error(lens_logits[-1], logits)}


def timing(spec: dict[str, Any]) -> dict[str, Any]:
    import deltaexit as dx

    model, ids, settings = common.timing_setup(spec)
    gen = common.generate_kwargs(settings)

    def traced_forward() -> None:
        with dx.collect(model, capture=("h_out",)):
            model(input_ids=ids)

    def traced_generate() -> None:
        with dx.collect(model, capture=("h_out",)) as trace:
            model.generate(ids, **gen)
        assert len(trace) == settings["new_tokens"], len(trace)

    return common.time_both(
        lambda: model(input_ids=ids), traced_forward, lambda: model.generate(ids, **gen), traced_generate, settings
    )


if __name__ == "__main__":
    common.run_worker("deltaexit", version, family, timing, SNIPPET)
