"""The architecture support matrix: collect / lens-exact / generate per model type.

Each cell is *measured* on a tiny random model of that type, not looked up.

Example:
    >>> rows = support_matrix(["llama"])
    >>> rows[0]["collect"], rows[0]["lens_exact"], rows[0]["generate"]
    ('ok', 'ok', 'verify:ok, propagate:ok, recompute:ok, tolerant:ok')
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from deltaexit.collector import collect
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.policy import KV_POLICIES
from deltaexit.lens import Lens
from deltaexit.structure import find_structure
from deltaexit.testing import ARCHITECTURES, random_batch, tiny_model

__all__ = ["check_architecture", "support_matrix", "support_matrix_markdown"]


def _check_generate(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> str:
    full = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    results = []
    for kv in KV_POLICIES:
        try:
            ee = EarlyExit(model, measure="softmax-max", threshold=float("inf"), kv=kv)
            out = ee.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            seq = out.sequences if hasattr(out, "sequences") else out
            results.append(f"{kv}:{'ok' if torch.equal(seq, full) else 'MISMATCH'}")
        except Exception as exc:  # the matrix reports failures, it does not hide them
            results.append(f"{kv}:unsupported ({type(exc).__name__})")
    return ", ".join(results)


def check_architecture(model_type: str) -> dict[str, Any]:
    """Measure collect, lens exactness and generate on a tiny random ``model_type`` model."""
    row: dict[str, Any] = {"model_type": model_type}
    try:
        model = tiny_model(model_type, num_layers=3, hidden=32, heads=4, vocab=128)
        structure = find_structure(model)
    except Exception as exc:
        row.update(collect=f"FAIL ({exc})", lens_exact="-", generate="-")
        return row
    row["blocks"] = structure.block_path
    row["final_norm"] = structure.describe()["final_norm"]
    ids, mask = random_batch(128, 2, 6, pad="left")
    try:
        with torch.no_grad(), collect(model, ("h_in", "h_out", "delta")) as trace:
            logits = model(input_ids=ids, attention_mask=mask).logits
        telescope = (trace.h_in[0] + trace.delta.sum(0) - trace.h_out[-1]).abs().max().item()
        row["collect"] = "ok" if telescope < 1e-4 else f"FAIL (telescope error {telescope:.1e})"
        lens_err = (Lens(structure)(trace.h_out[-1]) - logits).abs().max().item()
        row["lens_max_abs_err"] = lens_err
        row["lens_exact"] = "ok" if lens_err < 1e-4 else f"FAIL ({lens_err:.1e})"
    except Exception as exc:
        row.update(collect=f"FAIL ({type(exc).__name__}: {exc})", lens_exact="-")
    try:
        row["generate"] = _check_generate(model, ids, mask)
    except Exception as exc:
        row["generate"] = f"FAIL ({type(exc).__name__}: {exc})"
    return row


def support_matrix(model_types: Iterable[str] = ARCHITECTURES, *, progress: bool = False) -> list[dict[str, Any]]:
    """One row per model type (see :func:`check_architecture`).

    Args:
        model_types: The ``transformers`` model types to check.
        progress: A tqdm bar, one step per model type (the whole matrix takes about a minute).
    """
    from tqdm.auto import tqdm

    types = list(model_types)
    return [check_architecture(t) for t in tqdm(types, desc="support matrix", unit="arch", disable=not progress)]


def support_matrix_markdown(
    model_types: Iterable[str] = ARCHITECTURES, *, out: str | None = None, progress: bool = False
) -> str:
    """The support matrix as a markdown document, with the library versions it was measured on.

    Args:
        model_types: The model types to check.
        out: The file the document is written to, named in its header (None: printed, said so).
        progress: A tqdm bar over the model types.

    Example:
        >>> support_matrix_markdown(["llama"], out="matrix.md").splitlines()[2][:60]
        'Measured with `deltaexit support-matrix --out matrix.md` on '
    """
    import transformers

    from deltaexit._version import __version__

    rows = support_matrix(model_types, progress=progress)
    command = "deltaexit support-matrix" + (f" --out {out}" if out else "")
    lines = [
        "# Architecture support matrix",
        "",
        f"Measured with `{command}` on deltaexit {__version__}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}, each on a tiny random model "
        "(3 blocks, hidden 32) built offline from `AutoConfig.for_model`.",
        "",
        "- **collect**: hooks capture `h_in`, `h_out`, `delta`; deltas telescope "
        "(`h_in[0] + sum(delta) == h_out[-1]`).",
        "- **lens exact**: the lens on the last block's output reproduces the model's logits (max abs error shown).",
        "- **generate**: early-exit `generate()` with a never-exit threshold reproduces "
        "`model.generate` greedy, per KV policy.",
        "",
        "| model type | blocks | final norm | collect | lens exact (max abs err) | generate |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = r.get("lens_max_abs_err")
        lens = f"{r.get('lens_exact', '-')} ({err:.1e})" if isinstance(err, float) else r.get("lens_exact", "-")
        lines.append(
            f"| {r['model_type']} | `{r.get('blocks', '-')}` | `{r.get('final_norm', '-')}` | "
            f"{r['collect']} | {lens} | {r.get('generate', '-')} |"
        )
    return "\n".join(lines) + "\n"
