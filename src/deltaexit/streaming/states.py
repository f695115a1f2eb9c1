"""What one shard of a streamed collection holds, as measures read it: tensors, labels, layer states, checks.

- :func:`read_shard`: the tensors of one shard file (a clear :class:`ManifestError` naming the file otherwise).
- :func:`labels_from_topk`: the ``next`` / ``final`` / ``kept`` labels from the stored lens top-k.
- :func:`decision_layers`: the blocks whose states are scored for a label kind (as
  :meth:`deltaexit.features.StateSet.decision_layers`).
- :func:`layer_states`: one :class:`~deltaexit.measures.LayerState` per stored block of a batch; a state
  lacks only what was not collected, and reading that (``h_out`` of a delta-only collection) names the
  feature to add to ``--features``.
- :func:`measure_features`, :func:`check_collection`: which stored features a measure needs, and whether a
  collection fits a measure, a model or a lens (raised before any training).

Example:
    >>> ids = torch.tensor([[[5]], [[7]], [[7]]]).movedim(0, 1)   # 1 token, 3 layers, k=1: [tokens, L, k]
    >>> {k: v.tolist() for k, v in labels_from_topk(ids, ("next", "final", "kept")).items()}
    {'label_next': [[False, True]], 'label_final': [[False, True, True]], 'label_kept': [[False, True]]}
    >>> decision_layers("kept", 3), decision_layers("final", 3)
    ([1, 2], [0, 1])
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from deltaexit.measures.base import ConfidenceMeasure, LayerState
from deltaexit.saturation import LABELS, saturation_from_topk
from deltaexit.streaming.manifest import Manifest, ManifestError

__all__ = [
    "LABELS",
    "StoredLayerState",
    "check_collection",
    "decision_labels",
    "decision_layers",
    "labels_from_topk",
    "layer_labels",
    "layer_states",
    "measure_features",
    "read_shard",
    "reads_stored_topk",
]


def read_shard(path: str | os.PathLike[str], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of one shard file.

    Raises:
        ManifestError: The file is missing, not a readable safetensors shard (corrupt, cut short, a pickle
            renamed) or lacks one of ``names``; the message names the file and what to do.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "shard-r00000-00000.safetensors")
        >>> _ = open(path, "wb").write(b"not a shard")
        >>> try:
        ...     read_shard(path, ["token_id"])
        ... except ManifestError as exc:
        ...     print("shard-r00000-00000.safetensors" in str(exc), "verify=True" in str(exc))
        True True
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"shard {str(path)!r} is missing; re-collect with overwrite=True (deltaexit collect)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = set(handle.keys())
            missing = [name for name in names if name not in stored]
            if missing:
                raise ManifestError(
                    f"shard {str(path)!r} lacks {missing} (it holds {sorted(stored)}): it is not from this "
                    "collection; re-collect with overwrite=True (deltaexit collect --overwrite)"
                )
            return {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as exc:
        raise ManifestError(
            f"shard {str(path)!r} is not a readable safetensors file ({exc}); it is corrupt or was replaced: "
            "check the whole collection with ShardDataset(..., verify=True) and re-collect with overwrite=True "
            "(deltaexit collect --overwrite)"
        ) from None


def labels_from_topk(topk_ids: torch.Tensor, kinds: Iterable[str]) -> dict[str, torch.Tensor]:
    """Bool labels ``label_<kind>`` of ``[tokens, L, k]`` lens top-k ids (every block).

    ``label_next`` ``[tokens, L-1]``: column ``l`` = block ``l+1`` keeps the top-1 (decision after block ``l``).
    ``label_final`` ``[tokens, L]``: column ``l`` = the top-1 after block ``l`` is already final.
    ``label_kept`` ``[tokens, L-1]``: column ``i`` = block ``i+1`` left the top-1 unchanged (scored from block
    ``i+1``'s own state; the same values as ``next``, one block later).
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in LABELS]
    if bad:
        raise ValueError(f"unknown label kind(s) {bad}; choose from {list(LABELS)}")
    sat = saturation_from_topk(topk_ids.movedim(1, 0).long())  # [L, tokens, k]
    out = {}
    for kind in kinds:
        tensor = sat.saturated if kind == "final" else sat.stable
        out[f"label_{kind}"] = tensor.transpose(0, 1).contiguous()
    return out


def decision_layers(kind: str, num_layers: int) -> list[int]:
    """Blocks (0-based) scored for label ``kind``: ``0 .. L-2``, or ``1 .. L-1`` for ``kept``."""
    if kind not in LABELS:
        raise ValueError(f"label must be one of {list(LABELS)}, got {kind!r}")
    first = 1 if kind == "kept" else 0
    return list(range(first, first + num_layers - 1))


def decision_labels(batch: dict[str, torch.Tensor], kind: str) -> list[torch.Tensor]:
    """``[tokens]`` labels aligned with :func:`decision_layers` (``final`` without the always-true last block)."""
    labels = layer_labels(batch, kind)
    return labels[:-1] if kind == "final" else labels


def layer_labels(batch: dict[str, torch.Tensor], kind: str) -> list[torch.Tensor]:
    """``[tokens]`` bool labels per column of ``label_<kind>`` (see :func:`labels_from_topk`)."""
    key = f"label_{kind}"
    if key not in batch:
        raise ManifestError(f"the batch has no {kind!r} labels; build the dataset with labels={kind!r}")
    return list(batch[key].unbind(dim=1))


def _collect_hint(manifest: Manifest, add: Iterable[str]) -> str:
    features = list(dict.fromkeys([*manifest.features, *add]))
    return f"deltaexit collect --features {','.join(features)} (collect_to_disk(..., features={tuple(features)!r}))"


class StoredLayerState(LayerState):
    """A :class:`~deltaexit.measures.LayerState` of a collection that may lack ``h_out``.

    Reading ``h_out`` when it was not collected raises :class:`ManifestError` naming the feature to collect
    (``h_in`` is None when not collected, as for any state; ``delta`` is the stored one, or ``h_out - h_in``).
    """

    def __init__(self, *args: Any, hint: str = "", **kwargs: Any) -> None:
        self.hint = hint
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def h_out(self) -> torch.Tensor:
        """The state after the block (raises :class:`ManifestError` if it was not collected)."""
        if self.stored_h_out is None:
            raise ManifestError(f"h_out was not collected: collect it with {self.hint}")
        return self.stored_h_out

    @h_out.setter
    def h_out(self, value: torch.Tensor | None) -> None:
        self.stored_h_out = value

    def __repr__(self) -> str:
        shape = None if self.stored_h_out is None else tuple(self.stored_h_out.shape)
        return f"StoredLayerState(layer={self.layer}, h_out={shape}, h_in={self.h_in is not None})"


def reads_stored_topk(measure: ConfidenceMeasure, manifest: Manifest) -> bool:
    """Whether ``measure`` scores from the stored lens top-k probabilities alone (a softmax response without a
    candidate set, on a collection with ``lens_topk`` of ``k >= 2``): it then needs neither ``h_out`` nor the lens."""
    return (
        measure.needs("lens")
        and not getattr(measure, "requires_fit", False)
        and getattr(measure, "candidates", None) is None
        and tuple(measure.inputs) == ("h_out",)
        and "lens_topk" in manifest.features
        and int(manifest.settings.get("topk", 0) or 0) >= 2
    )


def measure_features(measure: ConfidenceMeasure, stored: Iterable[str]) -> tuple[str, ...]:
    """The stored vector features ``measure`` reads: its :attr:`inputs`, ``delta`` from ``h_in``/``h_out``
    when only those were stored; ``()`` entries missing are left out (see :func:`check_collection`)."""
    stored = set(stored)
    names: list[str] = []
    for name in measure.inputs:
        if name == "delta" and "delta" not in stored and {"h_in", "h_out"} <= stored:
            names += ["h_in", "h_out"]
        elif name in stored:
            names.append(name)
    return tuple(dict.fromkeys(names))


def _missing_inputs(measure: ConfidenceMeasure, stored: set[str]) -> list[str]:
    missing = []
    for name in measure.inputs:
        if name == "delta":
            if "delta" not in stored and not {"h_in", "h_out"} <= stored:
                missing.append("delta")
        elif name not in stored:
            missing.append(name)
    return missing


def _model_checks(manifest: Manifest, model: Any, lens: Any) -> None:
    from deltaexit.streaming.writer import model_fingerprint
    from deltaexit.structure import find_structure

    info = manifest.settings.get("model", {})
    hidden = info.get("hidden_size")
    if model is not None:
        structure = find_structure(model, validate=False)
        if hidden is not None and structure.hidden_size != int(hidden):
            raise ManifestError(
                f"the collection in {str(manifest.root)!r} comes from a model of hidden size {hidden}; this model "
                f"has hidden size {structure.hidden_size}: collect this model's states (deltaexit collect --model ...)"
            )
        if info.get("fingerprint") and model_fingerprint(model) != info["fingerprint"]:
            raise ManifestError(
                f"the collection in {str(manifest.root)!r} was collected from another model "
                f"({info.get('name_or_path') or info.get('model_type')!r}, fingerprint {info['fingerprint'][:12]}): "
                "collect this model's states (deltaexit collect --model ...) or pass the model it came from"
            )
    lens_structure = getattr(lens, "structure", None)
    if lens_structure is not None and hidden is not None and lens_structure.hidden_size != int(hidden):
        raise ManifestError(
            f"the collection in {str(manifest.root)!r} has hidden size {hidden}, the lens "
            f"{lens_structure.hidden_size}: pass the lens of the model the collection came from"
        )


def check_collection(
    manifest: Manifest,
    measure: ConfidenceMeasure | None = None,
    *,
    label: str | None = None,
    model: Any = None,
    lens: Any = None,
) -> None:
    """Raise :class:`ManifestError` (before any training or scoring) if the collection cannot serve.

    Checks: the measure's inputs were collected (the error names the feature and the ``deltaexit collect``
    to run); ``label`` needs ``lens_topk`` over every block; a measure reading the lens gets one; a fitted
    measure's hidden size and layers; ``model`` (its fingerprint and hidden size) and ``lens`` (its hidden
    size) match the manifest's model.
    """
    stored = set(manifest.features)
    if measure is not None and reads_stored_topk(measure, manifest):
        measure = None  # served by the stored top-k probabilities (passed on as LayerState.topk_probs)
    if measure is not None:
        missing = _missing_inputs(measure, stored)
        if missing:
            name = getattr(measure, "display_name", measure.name)
            raise ManifestError(
                f"{name} reads {missing}, which the collection in {str(manifest.root)!r} did not store (it holds "
                f"{sorted(stored)}): collect with {_collect_hint(manifest, missing)}"
            )
        if measure.needs("lens") and lens is None:
            raise ManifestError(f"{measure.name} reads the lens: pass lens=dx.Lens.from_model(model)")
        fitted_hidden = getattr(measure, "hidden_size_", None)
        hidden = manifest.settings.get("model", {}).get("hidden_size")
        if fitted_hidden is not None and hidden is not None and int(hidden) != int(fitted_hidden):
            raise ManifestError(
                f"{measure.name} was fitted on hidden size {fitted_hidden}; the collection in "
                f"{str(manifest.root)!r} has hidden size {hidden} (another model): fit it on this collection"
            )
    if label is not None:
        if "lens_topk" not in stored:
            raise ManifestError(
                f"labels need the lens top-k, which the collection in {str(manifest.root)!r} did not store: collect "
                f"with {_collect_hint(manifest, ['lens_topk'])}"
            )
        if list(manifest.layers) != list(range(manifest.num_layers)):
            raise ManifestError(
                f"labels need every block; this collection stored layers {list(manifest.layers)} of "
                f"{manifest.num_layers}: collect with --layers all"
            )
    _model_checks(manifest, model, lens)


def layer_states(
    batch: dict[str, torch.Tensor],
    manifest: Manifest,
    *,
    lens: object = None,
    measure: ConfidenceMeasure | None = None,
    layers: Iterable[int] | None = None,
) -> list[LayerState]:
    """One :class:`~deltaexit.measures.LayerState` per stored block (or per ``layers``) from a batch.

    The states are what confidence measures score and what trainable measures ``fit`` on. Vectors are
    converted to float32; ``h_in``, ``h_out``, ``delta`` and the lens top-k probabilities are passed on when
    stored. A state lacks only what was not collected: a delta-only collection gives states for measures that
    read the delta; reading its ``h_out`` raises :class:`ManifestError` naming the feature to collect. With
    ``measure``, what it reads is checked first (:func:`check_collection`).

    Example:
        >>> import tempfile
        >>> from deltaexit.measures import get_measure
        >>> from deltaexit.streaming import ShardDataset, collect_to_disk
        >>> from deltaexit.testing import tiny_model
        >>> out = tempfile.mkdtemp()
        >>> _ = collect_to_disk(tiny_model("llama", num_layers=2, hidden=32, vocab=64), [list(range(3, 40))], out,
        ...                     features="delta,lens_topk", topk=2, context=16, progress=False)
        >>> ds = ShardDataset(out, labels="final", batch_size=32)
        >>> batch = next(iter(ds))
        >>> states = layer_states(batch, ds.manifest, measure=get_measure("delta-norm"))
        >>> [s.layer for s in states], tuple(states[0].delta.shape), len(layer_labels(batch, "final"))
        ([0, 1], (32, 32), 2)
    """
    if measure is not None:
        check_collection(manifest, measure, lens=lens)
    hint = _collect_hint(manifest, ["h_out"])
    rows = {layer: row for row, layer in enumerate(manifest.layers)}
    wanted = list(manifest.layers) if layers is None else [int(layer) for layer in layers]
    states: list[LayerState] = []
    for layer in wanted:
        if layer not in rows:
            raise ManifestError(f"block {layer} was not collected (stored: {list(manifest.layers)})")
        row = rows[layer]

        def get(name: str, row: int = row) -> torch.Tensor | None:
            return batch[name][:, row].float() if name in batch else None

        state = StoredLayerState(
            layer, get("h_out"), get("h_in"), manifest.num_layers, lens, get("topk_probs"), delta=get("delta"),
            hint=hint,
        )  # fmt: skip
        states.append(state)
    return states
