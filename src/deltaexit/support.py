"""The architecture support matrix over every causal LM type of the installed ``transformers``.

Each cell is *measured* on a tiny random model of that type (shrunk from its default config by
:func:`deltaexit.shrink.shrink_config`), not looked up. A cell reads ``ok``, ``MISMATCH`` (ran, but the output
differs from the model's own), ``refused (Error: message)`` (a deltaexit error class, raised on purpose:
``StructureError``, ``UnsupportedCacheError`` ...) or ``FAIL (Error: message)`` (any other exception: a bug).

Example:
    >>> row = check_architecture("llama")
    >>> row["build"], row["collect"], row["lens_exact"], row["generate"]
    ('ok', 'ok', 'ok', 'verify:ok, propagate:ok, recompute:ok, verify-lossless:ok')
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from deltaexit.collector import collect
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.lens import Lens
from deltaexit.shrink import TINY, tiny_model_for
from deltaexit.structure import find_structure
from deltaexit.testing import ARCHITECTURES, random_batch

__all__ = [
    "ARCHITECTURES",
    "GENERATE_CELLS",
    "causal_lm_types",
    "cell_status",
    "check_architecture",
    "support_matrix",
    "support_matrix_markdown",
    "support_summary",
]

#: The generation cells: never-exit reproduction under each KV policy, and lossless ``verify`` with always-exit.
GENERATE_CELLS: tuple[str, ...] = ("verify", "propagate", "recompute", "verify-lossless")
_TOL = 1e-4
_NEW_TOKENS = 6
_PROMPT = 8
_MSG = 300


def causal_lm_types() -> list[str]:
    """Every model type of the installed ``transformers``' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _message(exc: BaseException) -> str:
    """``Class: message`` on one line, cut to a readable length."""
    msg = " ".join(str(exc).split())
    msg = msg if len(msg) <= _MSG else msg[: _MSG - 3] + "..."
    return f"{type(exc).__name__}: {msg}"


def _describe(exc: BaseException) -> str:
    """``refused (Class: message)`` for a deltaexit error class, else ``FAIL (Class: message)``."""
    kind = "refused" if type(exc).__module__.startswith("deltaexit") else "FAIL"
    return f"{kind} ({_message(exc)})"


def cell_status(cell: Any) -> str:
    """The status word of a cell: ``ok``, ``MISMATCH``, ``refused``, ``FAIL``, ``n/a`` or ``-`` (not reached).

    Example:
        >>> cell_status("refused (UnsupportedCacheError: ...)"), cell_status("ok"), cell_status(None)
        ('refused', 'ok', '-')
    """
    if not isinstance(cell, str) or not cell:
        return "-"
    return cell.split(" ", 1)[0]


def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, ee: EarlyExit | None) -> torch.Tensor:
    kwargs = {"attention_mask": mask, "max_new_tokens": _NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
    if ee is None:
        return model.generate(ids, **kwargs)
    out = ee.generate(ids, **kwargs)
    return out.sequences if hasattr(out, "sequences") else out


def _reference(model: Any, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch of two and ``model.generate``'s greedy output (one unpadded row if that fails)."""
    ids, mask = random_batch(vocab, 2, _PROMPT, pad="left")
    try:
        return ids, mask, _generate(model, ids, mask, None)
    except Exception:  # some models do not take padded batches: one row, no padding
        ids, mask = ids[:1], torch.ones_like(ids[:1])
        return ids, mask, _generate(model, ids, mask, None)


def _check_generate(model: Any, vocab: int) -> dict[str, str]:
    try:
        ids, mask, full = _reference(model, vocab)
    except Exception as exc:
        return dict.fromkeys(GENERATE_CELLS, f"n/a (model.generate: {_describe(exc)})")
    cells = {}
    for cell in GENERATE_CELLS:
        kv = cell.split("-")[0]
        threshold = float("-inf") if cell == "verify-lossless" else float("inf")
        try:
            ee = EarlyExit(model, "softmax-max", threshold, kv, min_exit_layer=1, backoff=False)
            seq = _generate(model, ids, mask, ee)
            cells[cell] = "ok" if torch.equal(seq, full) else "MISMATCH (differs from model.generate)"
        except Exception as exc:  # the matrix reports failures, it does not hide them
            cells[cell] = _describe(exc)
    return cells


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """The model's own forward; without a cache if it fails with one (some hybrid models at default settings)."""
    try:
        return model(input_ids=ids, attention_mask=mask).logits
    except Exception:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _check_collect(model: Any, structure: Any, vocab: int) -> dict[str, Any]:
    ids, mask = random_batch(vocab, 2, _PROMPT, pad="left")
    try:
        with torch.no_grad():
            _forward(model, ids, mask)
    except Exception as exc:
        return {"collect": f"n/a (model forward: {_describe(exc)})", "lens_exact": "-"}
    row: dict[str, Any] = {"lens_exact": "-"}
    try:
        with torch.no_grad(), collect(model, ("h_in", "h_out", "delta")) as trace:
            logits = _forward(model, ids, mask)
        telescope = (trace.h_in[0] + trace.delta.sum(0) - trace.h_out[-1]).abs().max().item()
        # float32 rounding of each delta grows with the states' size: the tolerance is relative to it
        scale = max(1.0, trace.h_in.abs().max().item(), trace.h_out.abs().max().item())
    except Exception as exc:
        row["collect"] = _describe(exc)
        return row
    row["telescope_err"] = telescope
    ok = telescope < _TOL * scale
    row["collect"] = "ok" if ok else f"MISMATCH (telescope error {telescope:.1e} at |h| {scale:.0f})"
    try:
        lens_err = (Lens(structure)(trace.h_out[-1]) - logits).abs().max().item()
    except Exception as exc:
        row["lens_exact"] = _describe(exc)
        return row
    row["lens_max_abs_err"] = lens_err
    row["lens_exact"] = "ok" if lens_err < _TOL else f"MISMATCH (max abs error {lens_err:.1e})"
    return row


def _default_builds(model_type: str) -> str:
    """Whether the *default* config builds (on the meta device: no memory): tells a shrink problem from the type's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type)
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        return f"the default config fails too: {_message(exc)}"
    return "the default config builds: a shrink problem"


def check_architecture(model_type: str) -> dict[str, Any]:
    """Measure build, structure, collect, lens exactness and each generation cell on a tiny ``model_type``."""
    row: dict[str, Any] = {"model_type": model_type}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = tiny_model_for(model_type)
        except Exception as exc:
            row["build"] = f"FAIL ({_message(exc)})"
            row["default_build"] = _default_builds(model_type)
            return row
        try:  # a model that does not run on input ids alone (a drafter needing its target's states) is not built
            with torch.no_grad():
                _forward(model, *random_batch(TINY.vocab, 1, _PROMPT))
        except Exception as exc:
            row["build"] = f"FAIL (its own forward on input ids fails: {_message(exc)})"
            return row
        row["build"] = "ok"
        row["params"] = sum(p.numel() for p in model.parameters())
        try:
            structure = find_structure(model)
        except Exception as exc:
            row.update(structure=_describe(exc), collect="-", lens_exact="-")
            return row
        row.update(structure="ok", blocks=structure.block_path, num_layers=structure.num_layers)
        row["final_norm"] = structure.describe()["final_norm"]
        vocab = min(int(structure.vocab_size), TINY.vocab)
        row.update(_check_collect(model, structure, vocab))
        cells = _check_generate(model, vocab)
    row.update(cells)
    row["generate"] = ", ".join(f"{c}:{cell_status(cells[c])}" for c in GENERATE_CELLS)
    return row


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ``TimeoutError`` after ``seconds`` (main thread on POSIX only; elsewhere no limit)."""
    usable = seconds and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, float(seconds or 0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _isolated(model_type: str, timeout: float | None) -> dict[str, Any]:
    """One row; a crash or a hang becomes a ``FAIL`` row instead of ending the sweep."""
    try:
        with _time_limit(timeout):
            return check_architecture(model_type)
    except Exception as exc:
        return {"model_type": model_type, "build": f"FAIL ({_message(exc)})"}


def support_matrix(
    model_types: Iterable[str] | None = None, *, progress: bool = False, timeout: float | None = 120.0
) -> list[dict[str, Any]]:
    """One row per model type (see :func:`check_architecture`), each measured in isolation.

    Args:
        model_types: The ``transformers`` model types to check (None: :func:`causal_lm_types`, the whole mapping).
        progress: A tqdm bar on stderr, one step per model type.
        timeout: Seconds one type may take before its row reads ``FAIL (TimeoutError ...)`` (None: no limit).
    """
    from tqdm.auto import tqdm

    types = causal_lm_types() if model_types is None else list(model_types)
    _check_types(types)
    return [_isolated(t, timeout) for t in tqdm(types, desc="support matrix", unit="arch", disable=not progress)]


def _check_types(types: list[str]) -> None:
    """``ValueError`` before anything runs for a name that is no ``transformers`` model type."""
    from transformers import CONFIG_MAPPING

    unknown = [t for t in types if t not in CONFIG_MAPPING]
    if unknown:
        raise ValueError(
            f"unknown model type(s) {unknown}: pass names from transformers' CONFIG_MAPPING, e.g. "
            f"{causal_lm_types()[:5]} (the whole causal-LM mapping is the default)"
        )


def _ok(row: dict[str, Any], *cells: str) -> bool:
    return all(cell_status(row.get(c)) == "ok" for c in cells)


def support_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's target figures over ``rows``: shares of the types that build tiny, and the failure lists.

    ``collect_lens``: collect and lens-exact ok; ``verify``: never-exit and lossless ``verify`` both reproduce
    ``model.generate``; ``propagate``/``recompute``: never-exit reproduces it. Generation shares leave out the
    types whose own ``model.generate`` fails on the test prompt (``n/a``).

    Example:
        >>> s = support_summary([{"model_type": "a", "build": "ok", "collect": "ok", "lens_exact": "ok"}])
        >>> s["built"], s["collect_lens"]["percent"]
        (1, 100.0)
    """
    built = [r for r in rows if r.get("build", "ok") == "ok"]
    gen = [r for r in built if cell_status(r.get("verify")) != "n/a"]

    def share(pool: list[dict[str, Any]], *cells: str) -> dict[str, Any]:
        n = sum(_ok(r, *cells) for r in pool)
        return {"ok": n, "of": len(pool), "percent": round(100.0 * n / len(pool), 1) if pool else 0.0}

    failures, refusals = [], []
    for r in built:
        for c in ("structure", "collect", "lens_exact", *GENERATE_CELLS):
            status = cell_status(r.get(c))
            if status in ("FAIL", "MISMATCH"):
                failures.append({"model_type": r["model_type"], "cell": c, "error": r[c]})
            elif status == "refused":
                refusals.append({"model_type": r["model_type"], "cell": c, "error": r[c]})
    return {
        "types": len(rows),
        "built": len(built),
        "not_built": {
            r["model_type"]: f"{r.get('build')}; {r.get('default_build', '')}".rstrip("; ")
            for r in rows
            if r.get("build", "ok") != "ok"
        },
        "generate_na": {r["model_type"]: r.get("verify") for r in built if r not in gen},
        "collect_lens": share(built, "collect", "lens_exact"),
        "verify": share(gen, "verify", "verify-lossless"),
        "propagate": share(gen, "propagate"),
        "recompute": share(gen, "recompute"),
        "failures": failures,
        "refusals": refusals,
    }


def _cell(text: Any, width: int = 160) -> str:
    s = "-" if text is None else " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= width else s[: width - 3] + "..."


def _procedure() -> list[str]:
    """The shrink procedure, from :mod:`deltaexit.shrink`'s docstring (its one source)."""
    import deltaexit.shrink as shrink

    doc = (shrink.__doc__ or "").split("Example:")[0].strip().splitlines()
    return ["## How each model is shrunk", "", *[line.rstrip() for line in doc[1:]][1:], ""]


def _grouped(items: list[dict[str, Any]]) -> list[str]:
    """One bullet per kind of error (its text up to the first number, list, dict or repr: the part that names the
    problem, not the instance), the types it hits with their cells, most types first; full texts are in the table
    and the JSON."""
    groups: dict[str, dict[str, list[str]]] = {}
    for item in items:
        error = item["error"]
        head = re.split(r"[\d\[{<]", error, maxsplit=1)[0]
        key = error if head == error else head.rstrip(" (=:,") + " ...)"
        groups.setdefault(key, {}).setdefault(item["model_type"], []).append(item["cell"])
    order = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    return [
        f"- {_cell(error, 300)}: " + ", ".join(f"`{t}` ({', '.join(cells)})" for t, cells in types.items())
        for error, types in order
    ]


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    def fig(key: str) -> str:
        s = summary[key]
        return f"{s['percent']:.1f}% ({s['ok']}/{s['of']})"

    lines = [
        f"{summary['built']} of {summary['types']} causal-LM types build tiny; "
        f"{len(summary['generate_na'])} of those fail in their own `model.generate` on the test prompt and are "
        "left out of the generation shares.",
        "",
        "| figure | target | measured |",
        "|---|---|---|",
        f"| collect + exact lens | >= 97% | {fig('collect_lens')} |",
        f"| `verify` never-exit and lossless (always-exit) reproduce `model.generate` | >= 95% | {fig('verify')} |",
        f"| `propagate` never-exit reproduces `model.generate` | >= 90% | {fig('propagate')} |",
        f"| `recompute` never-exit reproduces `model.generate` | >= 90% | {fig('recompute')} |",
        f"| cells that fail other than by a named refusal | 0 | {len(summary['failures'])} |",
        "",
    ]
    for title, key in (("Failures (not a named refusal)", "failures"), ("Named refusals", "refusals")):
        lines += [
            f"## {title}",
            "",
            "By kind of error; each type with its cells (full messages: the matrix).",
            "",
        ]
        lines += _grouped(summary[key]) or ["- none"]
        lines.append("")
    lines += ["## Not built tiny", ""]
    lines += [f"- `{t}`: {_cell(why, 500)}" for t, why in summary["not_built"].items()] or ["- none"]
    lines += [""] + [f"- `{t}` (generation n/a): {_cell(why, 400)}" for t, why in summary["generate_na"].items()]
    return lines


_COLUMNS = ("build", "blocks", "final_norm", "collect", "lens_exact", *GENERATE_CELLS)


def _table_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model type | " + " | ".join(c.replace("_", " ") for c in _COLUMNS) + " |",
        "|" + "---|" * (len(_COLUMNS) + 1),
    ]
    for r in rows:
        cells = []
        for c in _COLUMNS:
            value = r.get(c, r.get("structure") if c == "blocks" else None)
            if c == "lens_exact" and isinstance(r.get("lens_max_abs_err"), float):
                value = f"{value} ({r['lens_max_abs_err']:.1e})"
            if c in ("blocks", "final_norm") and value is not None and cell_status(value) not in ("refused", "FAIL"):
                value = f"`{value}`"
            cells.append(_cell(value, 60 if c == "build" else 160))
        lines.append(f"| {r['model_type']} | " + " | ".join(cells) + " |")
    return lines


def support_matrix_markdown(
    model_types: Iterable[str] | None = None,
    *,
    out: str | None = None,
    json_out: str | None = None,
    progress: bool = False,
    timeout: float | None = 120.0,
) -> str:
    """The support matrix as a markdown document, with the versions and the command it was measured with.

    Args:
        model_types: The model types to check (None: the whole causal-LM mapping).
        out: The file the document is written to, named in its header (None: printed, said so).
        json_out: Also write the rows and :func:`support_summary` there as JSON.
        progress: A tqdm bar over the model types.
        timeout: Seconds per type (see :func:`support_matrix`).

    Example:
        >>> support_matrix_markdown(["llama"], out="matrix.md").splitlines()[2][:60]
        'Measured with `deltaexit support-matrix --types llama --out '
    """
    import transformers

    from deltaexit._version import __version__

    types = None if model_types is None else list(model_types)
    rows = support_matrix(types, progress=progress, timeout=timeout)
    summary = support_summary(rows)
    if json_out:
        from deltaexit.io import atomic_write_json

        atomic_write_json(json_out, {"summary": summary, "rows": rows})
    command = "deltaexit support-matrix" + (f" --types {','.join(types)}" if types is not None else "")
    command += (f" --out {out}" if out else "") + (f" --json {json_out}" if json_out else "")
    lines = [
        "# Architecture support matrix",
        "",
        f"Measured with `{command}` on deltaexit {__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}: every model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` asked for, each on a "
        f"tiny random model shrunk from its default config (below), prompt of {_PROMPT} tokens in a left-padded "
        f"batch of two, {_NEW_TOKENS} new greedy tokens.",
        "",
        "- **build**: the shrunk config builds with `AutoModelForCausalLM.from_config`, offline, and the model's own "
        "forward runs on input ids alone.",
        "- **blocks / final norm**: what structure discovery found (or its `StructureError`).",
        "- **collect**: hooks capture `h_in`, `h_out`, `delta`; the deltas telescope (to 1e-4 of max(1, |h|)) "
        "(`h_in[0] + sum(delta) == h_out[-1]`).",
        "- **lens exact**: the lens on the last block's output reproduces the model's logits (max abs error).",
        "- **verify / propagate / recompute**: `EarlyExit(..., threshold=inf, kv=...)` (never exit) reproduces "
        "`model.generate` greedy token for token; **verify-lossless**: `threshold=-inf` under `verify` (every "
        "token drafted from block 1) does too.",
        "- A cell is `ok`, `MISMATCH` (ran, output differs), `refused (Error: message)` (a deltaexit error "
        "class, raised on purpose) or `FAIL (Error: message)` (any other exception).",
        "",
        *_summary_lines(summary),
        "",
        *_procedure(),
        "## Matrix",
        "",
        *_table_lines(rows),
    ]
    return "\n".join(lines) + "\n"
