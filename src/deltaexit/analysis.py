"""``dx.analyze``: collect a text's states, fit the trainable measures, evaluate every measure.

Split protocol (all parts disjoint, cut at window boundaries):

- **test**: the first ``tokens`` tokens of ``text``; every reported figure is on these.
- **fit**: ``fit_tokens`` further tokens: those right after the test tokens in ``text``, or
  the start of ``fit_text`` when given. The fit part is cut into whole windows:
  ``train`` (the first ``1 - select_fraction``; the trainable measures fit there, holding out
  the tail of it for early stopping) and ``select`` (the rest; the F1 threshold of every
  measure, trainable or not, is chosen there).

Example:
    >>> from importlib.resources import files
    >>> from deltaexit.reference import load_reference
    >>> model, tokenizer = load_reference("v1")
    >>> text = (files("deltaexit") / "assets/sample/wikitext-2-test-tail.txt").read_text()
    >>> config = AnalyzeConfig(tokens=256, window=32, measures=["delta-norm", "linear"], fit_kwargs={"max_epochs": 2})
    >>> result = analyze(model, tokenizer, text, config)
    >>> 0.0 <= result["labels"]["next"]["summary"]["linear"]["mean_f1"] <= 1.0
    True
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltaexit._version import __version__
from deltaexit.evaluation import evaluate_measures, layer_delta_stats
from deltaexit.features import LABELS, StateSet, collect_states, model_context_length, tokenize_text
from deltaexit.io import safe_name
from deltaexit.jsonable import json_clean
from deltaexit.measures.base import ConfidenceMeasure, available_measures, get_measure
from deltaexit.measures.candidates import check_candidates
from deltaexit.measures.cost import block_flops_per_token, measure_cost
from deltaexit.measures.trainable import TrainableMeasure
from deltaexit.saturation import READS_KEPT_REASON, reads_label
from deltaexit.structure import find_structure

__all__ = [
    "DEFAULT_MEASURES",
    "AnalyzeConfig",
    "analyze",
    "build_measures",
    "format_report",
    "with_candidates",
    "write_plots",
]

#: Display name -> (registry name, keyword arguments) of the measures ``analyze`` evaluates.
DEFAULT_MEASURES: dict[str, tuple[str, dict[str, Any]]] = {
    "softmax-max": ("softmax-max", {}),
    "softmax-gap": ("softmax-gap", {}),
    "state-cosine": ("state-cosine", {}),
    "delta-norm": ("delta-norm", {}),
    "delta-ratio": ("delta-ratio", {}),
    "linear": ("linear", {"features": "delta"}),
    "linear(h)": ("linear", {"features": "h"}),
    "delta-mlp": ("delta-mlp", {}),
    "delta-mlp/per-layer": ("delta-mlp", {"per_layer": True}),
    "hdelta-mlp": ("hdelta-mlp", {}),
    "hdelta-mlp/per-layer": ("hdelta-mlp", {"per_layer": True}),
    "lens-mlp": ("lens-mlp", {}),
}
#: Measures that read only the delta (and ``h_in`` for the ratio): the thesis's family.
DELTA_BASED = ("delta-norm", "delta-ratio", "linear", "delta-mlp", "delta-mlp/per-layer")


def build_measures(
    names: Sequence[str] | None = None, *, label: str = "next", seed: int = 0, **fit_kwargs: Any
) -> dict[str, ConfidenceMeasure]:
    """Unfitted measures by display name (default: all of :data:`DEFAULT_MEASURES`).

    A display name is a key of :data:`DEFAULT_MEASURES` or any registered measure name.
    """
    names = list(names) if names is not None else list(DEFAULT_MEASURES)
    out: dict[str, ConfidenceMeasure] = {}
    for name in names:
        registry, kwargs = _registry_entry(name)
        if registry not in available_measures():
            raise ValueError(
                f"unknown measure {name!r}; choose from {sorted(set(DEFAULT_MEASURES) | set(available_measures()))}"
            )
        measure_cls = type(get_measure(registry, **kwargs))
        if issubclass(measure_cls, TrainableMeasure):
            kwargs = {**kwargs, "label": label, "seed": seed, **fit_kwargs}
        out[name] = get_measure(registry, **kwargs)
    return out


def _registry_entry(name: str) -> tuple[str, dict[str, Any]]:
    """``(registry name, keyword arguments)`` of a display name; ``NAME@K`` adds ``candidates=K``."""
    base, at, k = name.rpartition("@") if "@" in name else (name, "", "")
    registry, kwargs = DEFAULT_MEASURES.get(base, (base, {}))
    if at:
        if not k.isdigit():
            raise ValueError(f"{name!r}: write a candidate set as NAME@K with an integer K, e.g. 'softmax-max@64'")
        kwargs = {**kwargs, "candidates": int(k)}
    return registry, kwargs


def with_candidates(names: Sequence[str] | None, candidates: int | Sequence[int] | None) -> list[str] | None:
    """``names`` (default: :data:`DEFAULT_MEASURES`) plus ``NAME@K`` for each measure that takes ``candidates``.

    Example:
        >>> with_candidates(["softmax-max", "delta-norm"], [64])
        ['softmax-max', 'delta-norm', 'softmax-max@64']
    """
    if isinstance(candidates, int):
        candidates = (candidates,)
    if not candidates:
        return list(names) if names is not None else None
    base = list(names) if names is not None else list(DEFAULT_MEASURES)
    extra = [
        f"{name}@{k}"
        for k in candidates
        for name in base
        if "@" not in name and _takes_candidates(_registry_entry(name)[0])
    ]
    return base + [name for name in extra if name not in base]


def _takes_candidates(registry: str) -> bool:
    if registry not in available_measures():
        return False  # build_measures says what is wrong with the name
    return "candidates" in inspect.signature(type(get_measure(registry)).__init__).parameters


def _fit_all(measures: dict[str, ConfidenceMeasure], train: StateSet, label: str, progress: bool) -> dict[str, float]:
    from tqdm.auto import tqdm

    seconds = {}
    states = train.decision_states(label)
    labels = list(train.labels(label))
    todo = [(n, m) for n, m in measures.items() if isinstance(m, TrainableMeasure)]
    for name, measure in tqdm(todo, desc=f"fit ({label})", disable=not progress, unit="measure"):
        start = time.perf_counter()
        measure.fit(states, labels)
        seconds[name] = time.perf_counter() - start
    return seconds


@dataclass(frozen=True)
class AnalyzeConfig:
    """Settings of :func:`analyze` (the ``deltaexit analyze`` flags build one).

    Args:
        tokens: Number of test tokens (the first ``tokens`` tokens of the text).
        fit_tokens: Number of fit tokens (default: ``tokens``).
        labels: Label kinds to evaluate (``"next"``, ``"final"``, ``"kept"``).
        measures: Display names (default: :data:`DEFAULT_MEASURES`).
        window: Tokens per window (default ``min(256, context length)``).
        batch_size: Windows per forward.
        select_fraction: Share of the fit windows used to choose thresholds.
        seed: Seed of every trainable measure.
        progress: tqdm bars.
        fit_kwargs: Extra keyword arguments for the trainable measures (e.g. ``max_epochs``).
        save_measures: Directory to save every fitted measure into, as ``DIR/<label>/<name>``
            (:meth:`~deltaexit.measures.TrainableMeasure.save`; load with ``dx.load_measure``).
        candidates: Candidate-set sizes ``K`` (one int or several): each measure that takes ``candidates``
            (``softmax-max``, ``softmax-gap``, ``lens-mlp``) is also evaluated as ``NAME@K``.

    Raises:
        ValueError: An unknown label or fewer than 2 test tokens.

    Example:
        >>> AnalyzeConfig(tokens=512, labels=["next", "final"]).labels
        ('next', 'final')
        >>> AnalyzeConfig(labels=("later",))
        Traceback (most recent call last):
        ...
        ValueError: label must be one of ['next', 'final', 'kept'], got 'later'
    """

    tokens: int = 65536
    fit_tokens: int | None = None
    labels: Sequence[str] = ("next",)
    measures: Sequence[str] | None = None
    window: int | None = None
    batch_size: int = 16
    select_fraction: float = 0.2
    seed: int = 0
    progress: bool = False
    fit_kwargs: dict[str, Any] | None = None
    save_measures: str | os.PathLike[str] | None = None
    candidates: int | Sequence[int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        ks = (
            ()
            if self.candidates is None
            else (self.candidates,)
            if isinstance(self.candidates, int)
            else self.candidates
        )
        for k in ks:
            check_candidates(k, minimum=2)
        object.__setattr__(self, "candidates", tuple(ks))
        if self.measures is not None:
            object.__setattr__(self, "measures", tuple(self.measures))
        for kind in self.labels:
            if kind not in LABELS:
                raise ValueError(f"label must be one of {list(LABELS)}, got {kind!r}")
        if self.tokens < 2:
            raise ValueError(f"tokens must be >= 2, got {self.tokens}")

    @classmethod
    def build(cls, config: AnalyzeConfig | None = None, **overrides: Any) -> AnalyzeConfig:
        """``config`` (default: the defaults) with ``overrides`` applied, unknown names refused.

        Example:
            >>> AnalyzeConfig.build(AnalyzeConfig(tokens=512), seed=3).tokens
            512
        """
        names = [f.name for f in fields(cls)]
        if "threads" in overrides:
            raise TypeError(
                "analyze no longer changes torch's thread count; wrap the call in "
                "deltaexit.threads.torch_threads(n) instead of passing threads=n"
            )
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"unknown analyze setting(s) {unknown}; choose from {names}")
        return replace(config if config is not None else cls(), **overrides)


def analyze(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    config: AnalyzeConfig | None = None,
    *,
    fit_text: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Collect, fit and evaluate every measure on a text; returns all figures as a JSON-ready dict.

    The run does not change torch's thread count; wrap it in :func:`deltaexit.threads.torch_threads`
    for that (``deltaexit analyze --threads N`` does).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (``AutoTokenizer``).
        text: The evaluation text; its first ``tokens`` tokens are the test tokens.
        config: The settings (:class:`AnalyzeConfig`; default: its defaults).
        fit_text: Text for the fit tokens (default: ``text`` after the test tokens).
        **overrides: Any :class:`AnalyzeConfig` field by name, applied over ``config``
            (e.g. ``tokens=512, labels=("next", "final")``).

    Returns:
        ``{"config", "tokens", "layers", "oracle", "cost", "labels": {label: evaluation}, "timing"}``.

    Example:
        >>> from importlib.resources import files
        >>> from deltaexit.reference import load_reference
        >>> model, tokenizer = load_reference("v1")
        >>> text = (files("deltaexit") / "assets/sample/wikitext-2-test-tail.txt").read_text()
        >>> result = analyze(model, tokenizer, text, tokens=256, window=32,
        ...                  measures=["softmax-max", "delta-norm"])
        >>> result["tokens"]["test"], sorted(result["labels"]["next"]["summary"])
        (256, ['delta-norm', 'softmax-max'])
    """
    cfg = AnalyzeConfig.build(config, **overrides)
    cost_measures = build_measures(with_candidates(cfg.measures, cfg.candidates), seed=cfg.seed)  # names checked
    structure = find_structure(model, validate=False)
    for measure in cost_measures.values():
        measure.check_sizes(structure.hidden_size, structure.vocab_size)  # e.g. candidates >= vocab: before any work
    window = cfg.window or min(256, model_context_length(model))
    timing: dict[str, Any] = {}
    start = time.perf_counter()
    test_ids, fit_ids, fit_source = _split_tokens(tokenizer, text, fit_text, cfg, window)
    timing["tokenize_s"] = time.perf_counter() - start

    start = time.perf_counter()
    test, fit = (
        collect_states(model, ids, window=window, batch_size=cfg.batch_size, progress=cfg.progress, desc=desc)
        for ids, desc in ((test_ids, "collect test"), (fit_ids, "collect fit"))
    )
    timing["collect_s"] = time.perf_counter() - start
    train, select = fit.split_windows([1.0 - cfg.select_fraction, cfg.select_fraction])

    cost = {
        "context": window,
        "block_flops_per_token": block_flops_per_token(model, context=window),
        "measures": {n: measure_cost(m, model, context=window) for n, m in cost_measures.items()},
    }
    results = _fit_and_evaluate(cfg, train, select, test, timing)
    return json_clean(
        {
            "deltaexit_version": __version__,
            "config": {
                "model_type": getattr(structure.text_config, "model_type", None),
                "hidden_size": structure.hidden_size,
                "num_layers": test.num_layers,
                "vocab_size": structure.vocab_size,
                "window": window,
                "seed": cfg.seed,
                "select_fraction": cfg.select_fraction,
                "fit_source": fit_source,
            },
            "tokens": {
                "test": test.num_tokens,
                "fit": fit.num_tokens,
                "train": train.num_tokens,
                "select": select.num_tokens,
            },
            "layers": layer_delta_stats(test),
            "oracle": test.saturation.summary(),
            "cost": cost,
            "labels": results,
            "timing": timing,
        }
    )


def _split_tokens(
    tokenizer: Any, text: str, fit_text: str | None, cfg: AnalyzeConfig, window: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(test ids, fit ids, where the fit ids come from)``, checked to be long enough."""
    fit_tokens = cfg.tokens if cfg.fit_tokens is None else cfg.fit_tokens
    if fit_text is None:
        ids = tokenize_text(tokenizer, text, max_tokens=cfg.tokens + fit_tokens)
        test_ids, fit_ids = ids[: cfg.tokens], ids[cfg.tokens :]
        fit_source = "text after the test tokens"
    else:
        test_ids = tokenize_text(tokenizer, text, max_tokens=cfg.tokens)
        fit_ids = tokenize_text(tokenizer, fit_text, max_tokens=fit_tokens)
        fit_source = "fit_text"
    if test_ids.numel() < cfg.tokens:
        warnings.warn(f"the text has only {test_ids.numel()} tokens; evaluating on all of them", stacklevel=3)
    min_fit = 4 * window
    if fit_ids.numel() < min_fit:
        raise ValueError(
            f"only {fit_ids.numel()} tokens are left to fit the measures on (need >= {min_fit}, 4 windows "
            f"of {window}); pass a longer text, fewer --tokens, or a separate fit text (--fit-data)"
        )
    if fit_ids.numel() < fit_tokens:
        warnings.warn(f"fitting on {fit_ids.numel()} tokens (fewer than {fit_tokens} asked)", stacklevel=3)
    return test_ids, fit_ids, fit_source


def _fit_and_evaluate(
    cfg: AnalyzeConfig, train: StateSet, select: StateSet, test: StateSet, timing: dict[str, Any]
) -> dict[str, Any]:
    """Per label: fit fresh measures on ``train``, save them if asked, evaluate on ``select``/``test``."""
    results: dict[str, Any] = {}
    timing["fit_s"] = {}
    timing["evaluate_s"] = {}
    for kind in cfg.labels:
        chosen = build_measures(
            with_candidates(cfg.measures, cfg.candidates), label=kind, seed=cfg.seed, **(cfg.fit_kwargs or {})
        )
        # A measure that reads what the label is computed from is never scored on it (lens-mlp on kept).
        left_out = {n: READS_KEPT_REASON for n, m in chosen.items() if reads_label(m, kind)}
        chosen = {n: m for n, m in chosen.items() if n not in left_out}
        timing["fit_s"][kind] = _fit_all(chosen, train, kind, cfg.progress)
        saved: dict[str, str] = {}  # display name -> the directory it was saved in (names made shell-safe)
        if cfg.save_measures is not None:
            for name, m in chosen.items():
                if isinstance(m, TrainableMeasure):
                    saved[name] = str(m.save(Path(cfg.save_measures) / kind / safe_name(name)))
        start = time.perf_counter()
        results[kind] = evaluate_measures(chosen, select, test, label=kind)
        results[kind]["left_out"] = left_out
        if saved:
            results[kind]["saved_measures"] = saved
        timing["evaluate_s"][kind] = time.perf_counter() - start
        results[kind]["fitted"] = {
            name: {"best_epoch": m.best_epoch_, "epochs_run": len(m.history_) - 1}
            for name, m in chosen.items()
            if isinstance(m, TrainableMeasure)
        }
    return results


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def _num(x: float | None, width: int) -> str:
    """``x`` to 3 decimals in ``width`` characters; ``-`` when unknown (e.g. a norm a collection did not store)."""
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.3f}"


def format_report(result: dict[str, Any]) -> str:
    """The tables of an :func:`analyze` result as plain text."""
    lines: list[str] = []
    cfg, tok = result["config"], result["tokens"]
    lines.append(
        f"model: {cfg['model_type']}, {cfg['num_layers']} layers, hidden {cfg['hidden_size']}; "
        f"test {tok['test']} tokens, fit {tok['train']} + select {tok['select']} tokens "
        f"({cfg['fit_source']}), window {cfg['window']}"
    )
    lines.append("")
    lines.append("per layer (test tokens):")
    lines.append(f"{'layer':>5} {'|delta|':>8} {'|delta|/|h_in|':>15} {'saturated':>10}")
    sat_rows = result["oracle"]["per_layer"]
    for row, srow in zip(result["layers"], sat_rows):
        norms = f"{_num(row['delta_norm'], 8)} {_num(row['delta_ratio'], 15)}"
        lines.append(f"{row['layer']:>5} {norms} {_pct(srow['saturated']):>10}")
    o = result["oracle"]
    lines.append(
        f"oracle: mean saturation layer {o['oracle_mean_layer']:.2f}/{o['num_layers']}; a perfect free "
        f"predictor saves {_pct(o['oracle_compute_saved']).strip()} of block compute"
    )
    for kind, ev in result["labels"].items():
        lines += _label_tables(kind, ev)
    cost = result["cost"]
    if cost is None:
        lines += ["", "cost table: needs the model (pass --model)"]
        return "\n".join(lines)
    lines.append("")
    lines.append(
        f"cost per decision as a fraction of one block ({cost['block_flops_per_token']:.0f} FLOPs/token "
        f"at context {cost['context']}):"
    )
    for name, c in cost["measures"].items():
        lines.append(f"  {name:<22} {c['flops_per_decision']:>12.0f} FLOPs  {c['fraction_of_block']:>8.4f}")
    return "\n".join(lines)


def _label_tables(kind: str, ev: dict[str, Any]) -> list[str]:
    """The F1 and AUROC tables of one label; columns as wide as the longest measure name (at least 8)."""
    names = list(ev["summary"])
    w = max([8, *(len(n) for n in names)])
    lines = ["", f"label '{kind}' — F1 at the threshold chosen on the select split (test tokens):"]
    lines.append(
        f"{'trans':>5} {'pos':>6} {'change':>6} {'r':>6} {'trivial':>7} " + " ".join(f"{n:>{w}}" for n in names)
    )
    for t in ev["transitions"]:
        r = t["r_delta_change"]
        cells = " ".join(f"{_pct(t['measures'][n]['f1']):>{w}}" for n in names)
        lines.append(
            f"{t['transition']:>5} {_pct(t['positive_rate'])} {_pct(t['change_rate'])} "
            f"{(f'{r:.3f}' if r is not None else '-'):>6} {_pct(t['trivial_f1']):>7} {cells}"
        )
    mean_cells = " ".join(f"{_pct(ev['summary'][n]['mean_f1']):>{w}}" for n in names)
    triv = ev["summary"][names[0]]["mean_trivial_f1"] if names else None
    lines.append(f"{'mean':>5} {'':>6} {'':>6} {'':>6} {_pct(triv):>7} {mean_cells}")
    beats = " ".join(
        f"{str(ev['summary'][n]['beats_trivial']) + '/' + str(ev['summary'][n]['transitions']):>{w}}" for n in names
    )
    lines.append(f"{'>triv':>5} {'':>6} {'':>6} {'':>6} {'':>7} {beats}")
    lines += ["", f"label '{kind}' — AUROC (threshold-free; 0.5 = chance):"]
    lines.append(f"{'trans':>5} " + " ".join(f"{n:>{w}}" for n in names))
    for t in ev["transitions"]:
        cells = " ".join(
            f"{t['measures'][n]['auroc']:>{w}.3f}" if t["measures"][n]["auroc"] is not None else f"{'-':>{w}}"
            for n in names
        )
        lines.append(f"{t['transition']:>5} {cells}")
    means = [ev["summary"][n]["mean_auroc"] for n in names]
    lines.append(f"{'mean':>5} " + " ".join(f"{m:>{w}.3f}" if m is not None else f"{'-':>{w}}" for m in means))
    bounds = [ev["summary"][n].get("max_auroc_error_bound") for n in names]
    if any(b is not None for b in bounds):  # streamed (analyze --shards): scores were binned
        lines.append(
            f"{'bound':>5} "
            + " ".join(f"{b:>{w}.4f}" if b is not None else f"{'-':>{w}}" for b in bounds)
            + "   (largest AUROC error bound over the rows: scores binned; --histogram-bits 23 is exact)"
        )
    for name, why in ev.get("left_out", {}).items():
        lines.append(f"left out of label '{kind}': {name} ({why}; see docs/reproduction.md)")
    return lines


def plot_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A distinct (colour, line style, marker) per measure: 10 tab10 colours times 4 line styles.

    Example:
        >>> styles = plot_styles([f"m{i}" for i in range(12)])
        >>> len({(s["color"], s["linestyle"]) for s in styles.values()})
        12
    """
    colours = [f"C{i}" for i in range(10)]
    dashes = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D"]
    return {
        name: {"color": colours[i % 10], "linestyle": dashes[(i // 10) % 4], "marker": markers[(i // 10) % 4]}
        for i, name in enumerate(names)
    }


def write_plots(result: dict[str, Any], directory: str, *, log: Callable[[str], None] | None = None) -> list[str]:
    """Write PNGs: saturation per layer, F1/AUROC per transition per measure, ‖delta‖ per layer.

    Needs matplotlib (the ``plot`` extra). Returns the written paths.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("plots need matplotlib: pip install 'deltaexit[plot]'") from exc
    from pathlib import Path

    from deltaexit.io import atomic_path

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        plt.close(fig)
        written.append(str(path))
        if log:
            log(str(path))

    rows = result["oracle"]["per_layer"]
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, [r["saturated"] for r in rows], marker="o", label="saturated (top-1 final)")
    ax.plot(layers[:-1], [1 - r["change_rate"] for r in rows[:-1]], marker="s", label="stable to next layer")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of tokens")
    ax.set_ylim(0, 1)
    ax.set_title("saturation per layer")
    ax.legend()
    save(fig, "saturation.png")

    stats = result["layers"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([s["layer"] for s in stats], [s["delta_norm"] for s in stats], color="tab:blue")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean ‖delta‖", color="tab:blue")
    twin = ax.twinx()
    twin.plot([s["layer"] for s in stats], [s["delta_ratio"] for s in stats], color="tab:red", marker="o")
    twin.set_ylabel("mean ‖delta‖ / ‖h_in‖", color="tab:red")
    ax.set_title("residual update per layer")
    save(fig, "delta_norm.png")

    for kind, ev in result["labels"].items():
        names = list(ev["summary"])
        styles = plot_styles(list(DEFAULT_MEASURES) + [n for n in names if n not in DEFAULT_MEASURES])
        xs = [t["layer"] for t in ev["transitions"]]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for name in names:  # one colour per measure name, the same in every label's plot
            axes[0].plot(xs, [t["measures"][name]["f1"] for t in ev["transitions"]], label=name, **styles[name])
            axes[1].plot(xs, [t["measures"][name]["auroc"] for t in ev["transitions"]], label=name, **styles[name])
        if ev.get("left_out"):
            fig.text(0.01, -0.02, "left out (reads the label's inputs): " + ", ".join(ev["left_out"]), fontsize=8)
        axes[0].plot(xs, [t["trivial_f1"] for t in ev["transitions"]], "k--", label="all positive")
        axes[1].axhline(0.5, color="k", linestyle="--", label="chance")
        axes[0].set_title(f"F1 per transition (label {kind})")
        axes[1].set_title(f"AUROC per transition (label {kind})")
        for a in axes:
            a.set_xlabel("exit after layer")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        save(fig, f"measures_{kind}.png")
    return written
