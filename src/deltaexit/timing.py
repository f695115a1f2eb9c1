"""Speed figures that hold: rows timed in alternation in one process, reported as median ratios with their spread.

A *row* is a callable ``row(input, streamer)`` that generates for one input (e.g. a prompt's token ids);
``streamer`` is a :class:`FirstTokenClock` to pass on to ``generate`` so the decode steps can be timed apart from
the prompt's forward. :func:`alternated` warms every row up on every input, then runs ``repeats`` rounds; in each
round every input runs every row, in an order rotated per round and input, so the slow phases of a shared machine
hit all rows alike. A row that raises during warm-up is dropped and its error text kept (``Timing.errors``), so a
peer that fails on some model (transformers' ``assistant_early_exit`` on GPT-NeoX caches) becomes a row with an
error instead of a crash.

:meth:`Timing.speed` is a row's speed as a ratio to a base row: per round, the base's total time over the row's,
then the median over rounds with its spread (:func:`spread`: min, max and interquartile range).
:func:`generate_row`, :func:`layerskip_row` and :func:`peer_rows` build rows for ``model.generate`` and
transformers' built-in alternatives (LayerSkip's ``assistant_early_exit``, prompt-lookup decoding);
:func:`token_agreement` compares outputs.

Example:
    >>> import torch
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> rows = peer_rows(model, {"max_new_tokens": 4, "do_sample": False}, layerskip=[(1, 2)])
    >>> list(rows)
    ['model.generate', 'assistant_early_exit 1:2', 'prompt_lookup 3']
    >>> timing = alternated(rows, [torch.tensor([[5, 6, 7, 8]])], repeats=3)
    >>> sorted(timing.speed("prompt_lookup 3"))
    ['iqr', 'max', 'median', 'min', 'repeats']
    >>> token_agreement(timing.outputs["prompt_lookup 3"][0], timing.outputs["model.generate"][0], 4)
    1.0
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

__all__ = [
    "FirstTokenClock",
    "Row",
    "Timing",
    "alternated",
    "error_text",
    "generate_row",
    "layerskip_row",
    "peer_rows",
    "spread",
    "token_agreement",
]

#: ``row(input, streamer) -> output``: one generation call, timed by :func:`alternated`.
Row = Callable[[Any, BaseStreamer], Any]


class FirstTokenClock(BaseStreamer):
    """A streamer that notes when the first generated token arrives (the prompt's forward is done)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt, the second the token from the prompt's forward
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median of ``values`` with its spread: ``{"median", "min", "max", "iqr": [q1, q3], "repeats"}``.

    Example:
        >>> spread([1.0, 2.0, 4.0, 3.0])
        {'median': 2.5, 'min': 1.0, 'max': 4.0, 'iqr': [1.75, 3.25], 'repeats': 4}
    """
    values = [float(v) for v in values if not math.isnan(v)]
    if not values:
        nan = float("nan")
        return {"median": nan, "min": nan, "max": nan, "iqr": [nan, nan], "repeats": 0}
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values), "iqr": [q1, q3], "repeats": len(values)}


def error_text(exc: BaseException) -> str:
    """``"TypeName: message"``, the form the benchmarks record a failed row's error in."""
    return f"{type(exc).__name__}: {exc}".strip()


@dataclass
class Timing:
    """What :func:`alternated` measured.

    Attributes:
        seconds: Row name -> ``[round][input]`` wall-clock seconds of the whole call.
        decode_seconds: The same from the first generated token on (NaN where no token came).
        outputs: Row name -> its output on each input (from the warm-up call).
        errors: Row name -> error text, for rows that raised (they are not timed).
    """

    seconds: dict[str, list[list[float]]] = field(default_factory=dict)
    decode_seconds: dict[str, list[list[float]]] = field(default_factory=dict)
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def speed(self, row: str, base: str = "model.generate", decode: bool = False) -> dict[str, Any]:
        """``row``'s speed against ``base`` (base time / row time, summed over inputs per round): :func:`spread`.

        Args:
            row: A timed row.
            base: The row to compare with.
            decode: Time from the first generated token on instead of the whole call.

        Raises:
            KeyError: ``row`` or ``base`` was not timed (it failed: see ``errors``, or it was never a row).
        """
        table = self.decode_seconds if decode else self.seconds
        for name in (row, base):
            if name not in table:
                raise KeyError(f"row {name!r} was not timed: {self.errors.get(name, 'no such row')}")
        return spread([sum(b) / sum(r) for b, r in zip(table[base], table[row], strict=True)])

    def per_input_speed(self, row: str, base: str = "model.generate") -> list[float]:
        """Per input: the median over rounds of ``base`` time / ``row`` time."""
        rounds = list(zip(self.seconds[base], self.seconds[row], strict=True))
        return [statistics.median(b[i] / r[i] for b, r in rounds) for i in range(len(rounds[0][0]))]


def _call(row: Row, x: Any) -> tuple[float, float, Any]:
    clock = FirstTokenClock()
    start = time.perf_counter()
    out = row(x, clock)
    end = time.perf_counter()
    return end - start, (end - clock.first) if clock.first is not None else float("nan"), out


def alternated(rows: Mapping[str, Row], inputs: Sequence[Any], repeats: int = 5) -> Timing:
    """Time ``rows`` on ``inputs``: one warm-up call each (failures recorded), then ``repeats`` rotated rounds.

    Runs under ``torch.no_grad()``; the thread count is the caller's (wrap in ``deltaexit.threads.torch_threads``).

    Raises:
        ValueError: No rows, no inputs, or ``repeats < 1``.
    """
    if not rows or not inputs or repeats < 1:
        raise ValueError(f"need rows, inputs and repeats >= 1 (got {len(rows)} rows, {len(inputs)} inputs, {repeats})")
    timing = Timing()
    with torch.no_grad():
        for name, row in rows.items():
            try:
                timing.outputs[name] = [row(x, FirstTokenClock()) for x in inputs]
            except Exception as exc:  # a peer that does not run on this model: keep its error, time the rest
                timing.errors[name] = error_text(exc)
        live = [name for name in rows if name in timing.outputs]
        timing.seconds = {name: [] for name in live}
        timing.decode_seconds = {name: [] for name in live}
        for r in range(repeats):
            whole: dict[str, list[float]] = {name: [] for name in live}
            decode: dict[str, list[float]] = {name: [] for name in live}
            for i, x in enumerate(inputs):
                shift = (r + i) % len(live)
                for name in live[shift:] + live[:shift]:
                    seconds, decode_s, _ = _call(rows[name], x)
                    whole[name].append(seconds)
                    decode[name].append(decode_s)
            for name in live:
                timing.seconds[name].append(whole[name])
                timing.decode_seconds[name].append(decode[name])
    return timing


def generate_row(model: Any, generate_kwargs: Mapping[str, Any]) -> Row:
    """A row that calls ``model.generate(input_ids, streamer=..., **generate_kwargs)``.

    ``model`` is anything with a transformers-style ``generate``: a HF model, or an ``EarlyExit`` (pass
    ``return_dict_in_generate=True`` to get its stats back in ``Timing.outputs``).
    """
    kwargs = dict(generate_kwargs)
    return lambda ids, streamer: model.generate(ids, streamer=streamer, **kwargs)


def layerskip_row(model: Any, generate_kwargs: Mapping[str, Any], exit_layer: int, tokens: int = 4) -> Row:
    """transformers' LayerSkip, ``model.generate(..., assistant_early_exit=exit_layer, num_assistant_tokens=tokens)``.

    transformers drafts by setting ``config.num_hidden_layers`` to ``exit_layer`` and back; where drafting raises
    (e.g. ``IndexError`` in GPT-NeoX caches) it leaves the smaller value behind, and every later ``generate`` of
    the model fails. This row puts the value back, so the other rows keep timing the whole model.
    """
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    configs = list({id(c): c for c in (model.config, getattr(base, "config", model.config))}.values())
    kwargs = {**generate_kwargs, "assistant_early_exit": exit_layer, "num_assistant_tokens": tokens}

    def row(ids: Any, streamer: BaseStreamer) -> Any:
        saved = [(c, c.num_hidden_layers) for c in configs]
        try:
            return model.generate(ids, streamer=streamer, **kwargs)
        finally:
            for config, layers in saved:
                config.num_hidden_layers = layers

    return row


def peer_rows(
    model: Any,
    generate_kwargs: Mapping[str, Any],
    *,
    layerskip: Sequence[tuple[int, int]] = (),
    prompt_lookup: int | None = 3,
) -> dict[str, Row]:
    """``model.generate`` and transformers' own alternatives to early exit, as rows.

    Args:
        model: A HF causal LM.
        generate_kwargs: The common ``generate`` settings (e.g. ``max_new_tokens``, ``do_sample=False``).
        layerskip: ``(E, k)`` pairs: ``model.generate(..., assistant_early_exit=E, num_assistant_tokens=k)``
            (LayerSkip self-speculation), one row ``"assistant_early_exit E:k"`` each.
        prompt_lookup: ``prompt_lookup_num_tokens`` for a ``"prompt_lookup N"`` row (None: no such row).

    Returns:
        Rows by name, ``"model.generate"`` first. Batch 1: transformers' assisted generation takes one prompt.
    """
    rows = {"model.generate": generate_row(model, generate_kwargs)}
    for exit_layer, tokens in layerskip:
        rows[f"assistant_early_exit {exit_layer}:{tokens}"] = layerskip_row(model, generate_kwargs, exit_layer, tokens)
    if prompt_lookup is not None:
        extra = {"prompt_lookup_num_tokens": prompt_lookup}
        rows[f"prompt_lookup {prompt_lookup}"] = generate_row(model, {**generate_kwargs, **extra})
    return rows


def token_agreement(sequences: torch.Tensor, reference: torch.Tensor, prompt_len: int) -> float:
    """Share of ``reference``'s generated tokens (after ``prompt_len``) that ``sequences`` matches position-wise.

    Tokens missing from a shorter ``sequences`` count as disagreements.

    Example:
        >>> token_agreement(torch.tensor([[1, 2, 3, 9]]), torch.tensor([[1, 2, 3, 4]]), prompt_len=2)
        0.5
    """
    ref = reference[..., prompt_len:]
    got = sequences[..., prompt_len : prompt_len + ref.shape[-1]]
    if ref.numel() == 0:
        return 1.0
    same = (got == ref[..., : got.shape[-1]]).sum()
    return float(same) / ref.numel()
