"""Streaming collection to disk: sharded safetensors, a JSON manifest, bounded memory, resume.

:func:`collect_to_disk` runs the model window batch by window batch under
:func:`deltaexit.collect`, reduces what it captured to per-token features
(:mod:`~deltaexit.streaming.features`), and flushes a shard as soon as it holds
``shard_tokens`` tokens, so memory stays bounded whatever the corpus size. Every
file is written atomically; the per-rank manifest is rewritten after each shard
and records exactly which windows the shard covers, so an interrupted run resumes
from the last complete shard without losing or duplicating a token.

The settings form a :class:`CollectConfig` (the ``deltaexit collect`` flags build one); the
same fields work as keywords of :func:`collect_to_disk`.

Example:
    >>> import tempfile
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=64)
    >>> config = CollectConfig(features=("delta", "delta_norm"), subsample=0.5, context=16, progress=False)
    >>> with tempfile.TemporaryDirectory() as out:
    ...     manifest = collect_to_disk(model, [list(range(3, 60))], out, config, shard_tokens=16)
    ...     [p.name for p in manifest.shard_paths()][:1]
    ['shard-r00000-00000.safetensors']
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltaexit.collector import collect
from deltaexit.io import atomic_path
from deltaexit.streaming.corpus import Window, batch_windows, data_fingerprint, iter_documents, token_windows
from deltaexit.streaming.distributed import barrier, distributed_rank
from deltaexit.streaming.features import capture_for, parse_features, reduce_batch, refuse_nonfinite_batch
from deltaexit.streaming.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    file_sha256,
    merge_manifests,
    rank_manifest_path,
    shard_name,
)
from deltaexit.structure import ModelStructure, find_structure, input_device

__all__ = ["CollectConfig", "collect_to_disk", "model_fingerprint", "resume_message", "settings_differences"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """Write ``tensors`` as a safetensors file (byte-for-byte deterministic: names sorted, one pass).

    ``safetensors.torch.save_file`` creates a new ctypes type for every distinct tensor byte size
    and numpy caches them for good, so a long collection (thousands of shards) would grow
    without bound; this writer streams each tensor's bytes from a zero-copy view instead.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors shards are little-endian; this machine is big-endian")
    header: dict[str, object] = {"__metadata__": metadata}
    views = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"cannot store {name!r} of dtype {t.dtype} in a safetensors shard")
        raw = t.reshape(-1).view(torch.uint8).numpy()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + raw.nbytes]}  # fmt: skip
        offset += raw.nbytes
        views.append(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(head)))
        handle.write(head)
        for raw in views:
            handle.write(raw.data)


#: Config keys that ``save_pretrained`` / loading add or change without changing the model (parameter
#: dtypes are fingerprinted from the parameters themselves).
_UNFINGERPRINTED = frozenset({"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"})


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's config, parameter names/shapes/dtypes and a sample of its first weights.

    Cheap for any model size (offloaded, meta-device weights are skipped in the sample).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        fields = {k: v for k, v in config.to_dict().items() if k not in _UNFINGERPRINTED}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    sampled = False
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if not sampled and p.device.type != "meta" and p.numel():
            sample = p.detach().reshape(-1)[:4096].float().cpu().contiguous()
            digest.update(sample.numpy().tobytes())
            sampled = True
    return digest.hexdigest()


def _tokenizer_id(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    size = getattr(tokenizer, "vocab_size", None)
    if size is None and hasattr(tokenizer, "get_vocab_size"):
        size = tokenizer.get_vocab_size()
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{size}"


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)} (or a torch.dtype), got {dtype!r}")
    return _DTYPES[dtype]


def _subsample_keep(window: Window, subsample: float, seed: int) -> torch.Tensor:
    """Which tokens of ``window`` to keep: a draw that depends only on (seed, window index)."""
    n = len(window.ids)
    if subsample >= 1.0:
        return torch.ones(n, dtype=torch.bool)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + window.index * 7_919 + 12_345) % (2**63 - 1))
    return torch.rand(n, generator=generator) < subsample


def _window_ranges(windows: Iterable[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for w in sorted(windows):
        if ranges and ranges[-1][1] == w:
            ranges[-1][1] = w + 1
        else:
            ranges.append([w, w + 1])
    return ranges


class _ShardWriter:
    """Buffers per-batch features of one rank and flushes them as shards (+ manifest update)."""

    def __init__(self, manifest: Manifest, rank: int, on_shard: Callable[[dict[str, Any]], None] | None) -> None:
        self.manifest = manifest
        self.rank = rank
        self.on_shard = on_shard
        self.parts: list[dict[str, torch.Tensor]] = []
        self.batches: list[int] = []
        self.windows: list[Window] = []
        self.tokens = 0

    def add(self, batch_index: int, windows: list[Window], tensors: dict[str, torch.Tensor]) -> None:
        self.parts.append(tensors)
        self.batches.append(batch_index)
        self.windows.extend(windows)
        self.tokens += int(tensors["token_id"].shape[0])

    def flush(self) -> None:
        if not self.batches:
            return
        index = len(self.manifest.shards)
        name = shard_name(self.rank, index)
        tensors = {key: torch.cat([p[key] for p in self.parts]).contiguous() for key in self.parts[0]}
        # One metadata key: safetensors writes several in arbitrary order, which would change the sha256.
        metadata = {"deltaexit-stream": json.dumps({"rank": self.rank, "index": index})}
        with atomic_path(self.manifest.root / name) as tmp:
            save_safetensors(tensors, tmp, metadata)
            sha = file_sha256(tmp)
            size = tmp.stat().st_size
        entry = {
            "file": name,
            "rank": self.rank,
            "index": index,
            "tokens": self.tokens,
            "batches": [self.batches[0], self.batches[-1]],
            "windows": _window_ranges(w.index for w in self.windows),
            "docs": [self.windows[0].doc, self.windows[-1].doc],
            "sha256": sha,
            "bytes": size,
        }
        self.manifest.shards.append(entry)
        self.manifest.save()
        self.parts, self.batches, self.windows, self.tokens = [], [], [], 0
        if self.on_shard is not None:
            self.on_shard(entry)


def settings_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every setting that differs (nested dicts by dotted key), sorted.

    Example:
        >>> old, new = {"topk": 5, "model": {"fingerprint": "a1"}}, {"topk": 2, "model": {"fingerprint": "b2"}}
        >>> settings_differences(old, new)
        ["model.fingerprint: 'a1' -> 'b2'", 'topk: 5 -> 2']
    """
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_differences(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _resume(manifest_path: Path, settings: dict[str, Any], out_dir: Path, rank: int) -> Manifest:
    """This rank's manifest to continue from: the verified prefix of the previous run's shards."""
    fresh = Manifest(root=out_dir, settings=settings, rank=rank)
    if manifest_path.is_file():
        previous = Manifest.read(manifest_path)
        if previous.settings != settings:
            changed = "; ".join(settings_differences(previous.settings, settings))
            raise ManifestError(
                f"{str(out_dir)!r} holds a collection made with other settings ({changed}); "
                "use another output directory or pass overwrite=True (--overwrite)."
            )
        fresh.complete = previous.complete
        for shard in previous.shards:
            path = out_dir / shard["file"]
            if not path.is_file() or file_sha256(path) != shard["sha256"]:
                warnings.warn(f"shard {shard['file']} is missing or corrupt; collecting again from there", stacklevel=3)
                fresh.complete = False
                break
            fresh.shards.append(shard)
    # Shards (and temporary files) written after the last manifest update are redone.
    kept = {s["file"] for s in fresh.shards}
    for path in out_dir.glob(f"shard-r{rank:05d}-*.safetensors"):
        if path.name not in kept:
            path.unlink()
    for path in out_dir.glob(f".shard-r{rank:05d}-*"):
        path.unlink(missing_ok=True)
    return fresh


def _clear(out_dir: Path, rank: int) -> None:
    rank_manifest_path(out_dir, rank).unlink(missing_ok=True)
    for path in [*out_dir.glob(f"shard-r{rank:05d}-*.safetensors"), *out_dir.glob(f".shard-r{rank:05d}-*")]:
        path.unlink(missing_ok=True)
    if rank == 0:
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)


@dataclass(frozen=True)
class CollectConfig:
    """Settings of :func:`collect_to_disk` (the ``deltaexit collect`` flags build one).

    Args:
        layers: Blocks to store (0-based; default all). Labels need all blocks.
        features: Any of ``h_in``, ``h_out``, ``delta``, ``h_in_norm``, ``h_out_norm``,
            ``delta_norm``, ``lens_topk`` (a tuple or a comma-separated string; stored as a tuple).
        topk: ``k`` of ``lens_topk``.
        positions: ``"all"`` tokens of each window, or only its ``"last"`` one.
        subsample: Fraction of tokens kept, drawn per window from ``seed`` (1.0 keeps all).
        seed: Seed of the subsample.
        context: Tokens per window (one model row).
        batch_size: Windows per forward.
        shard_tokens: A shard is written once it holds at least this many (kept) tokens.
        max_tokens: Stop after this many corpus tokens (before subsampling); default all.
        dtype: Storage dtype of vector features (``"float16"``, ``"bfloat16"``, ``"float32"``;
            None keeps the captured dtype).
        pad_token_id: Id used to pad short windows (masked out, never stored).
        resume: Continue a previous run with the same settings in ``out_dir`` (default).
        overwrite: Delete this rank's previous output first (wins over ``resume``).
        rank, world_size: Default to the ``torch.distributed`` group (or 0 and 1). Passing them
            without a process group runs one part of an independent multi-job collection;
            the last part to finish merges the manifests.
        progress: Show a tqdm bar (rank 0).

    Raises:
        ValueError: A setting is out of range; the message names it.

    Example:
        >>> config = CollectConfig(features="delta_norm,lens_topk", subsample=0.5)
        >>> config.features, config.capture
        (('delta_norm', 'lens_topk'), ('delta',))
        >>> CollectConfig(subsample=0.0)
        Traceback (most recent call last):
        ...
        ValueError: subsample must be in (0, 1], got 0.0
    """

    layers: Iterable[int] | None = None
    features: Iterable[str] | str = ("delta", "delta_norm", "lens_topk")
    topk: int = 5
    positions: str = "all"
    subsample: float = 1.0
    seed: int = 0
    context: int = 128
    batch_size: int = 8
    shard_tokens: int = 65_536
    max_tokens: int | None = None
    dtype: torch.dtype | str | None = "float16"
    pad_token_id: int = 0
    resume: bool = True
    overwrite: bool = False
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", parse_features(self.features))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        _parse_dtype(self.dtype)
        if not 0.0 < float(self.subsample) <= 1.0:
            raise ValueError(f"subsample must be in (0, 1], got {self.subsample}")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
        if self.positions not in ("all", "last"):
            raise ValueError(f"positions must be 'all' or 'last', got {self.positions!r}")
        if "lens_topk" in self.features and self.topk < 1:
            raise ValueError("lens_topk needs topk >= 1")

    @property
    def capture(self) -> tuple[str, ...]:
        """What the collector must capture to compute :attr:`features`."""
        return capture_for(parse_features(self.features))

    @property
    def store_dtype(self) -> torch.dtype | None:
        """:attr:`dtype` as a ``torch.dtype`` (None keeps the captured dtype)."""
        return _parse_dtype(self.dtype)

    @classmethod
    def build(cls, config: CollectConfig | None = None, **overrides: Any) -> CollectConfig:
        """``config`` (default: the defaults) with ``overrides`` applied, unknown names refused.

        Example:
            >>> CollectConfig.build(CollectConfig(context=64), batch_size=2).context
            64
        """
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(
                f"unknown collect_to_disk setting(s) {unknown}; choose from {[f.name for f in fields(cls)]}"
            )
        return replace(config if config is not None else cls(), **overrides)


def collect_to_disk(
    model: nn.Module,
    data: Any,
    out_dir: str | os.PathLike[str],
    config: CollectConfig | None = None,
    *,
    tokenizer: Any = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> Manifest:
    """Collect per-token residual-stream features of a corpus into safetensors shards.

    Args:
        model: A ``transformers`` causal LM (any device placement, ``device_map`` and offload included).
        data: A text file (one document a line; needs ``tokenizer``), token ids (a 1-D/2-D
            tensor, or sequences of ids, one per document) or strings (need ``tokenizer``);
            see :func:`~deltaexit.streaming.corpus.iter_documents`.
        out_dir: Output directory (created).
        config: The settings (:class:`CollectConfig`; default: its defaults).
        tokenizer: Turns text into ids.
        on_shard: Called with each shard's manifest entry after it is safely on disk.
        **overrides: Any :class:`CollectConfig` field by name, applied over ``config``
            (e.g. ``features="delta_norm", shard_tokens=4096``).

    Returns:
        The merged :class:`~deltaexit.streaming.manifest.Manifest` (this rank's while other
        independent parts are still running).

    Example:
        >>> import tempfile
        >>> from deltaexit.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=64)
        >>> docs = [list(range(3, 40)), list(range(5, 30))]
        >>> with tempfile.TemporaryDirectory() as out:
        ...     manifest = collect_to_disk(model, docs, out, features="delta_norm,lens_topk", topk=2,
        ...                                context=16, batch_size=2, shard_tokens=32, progress=False)
        ...     manifest.num_tokens, len(manifest.shards), manifest.complete
        (62, 2, True)
    """
    cfg = CollectConfig.build(config, **overrides)
    group_rank, group_size = distributed_rank()
    rank = group_rank if cfg.rank is None else int(cfg.rank)
    world_size = group_size if cfg.world_size is None else int(cfg.world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    structure = find_structure(model)
    chosen = range(structure.num_layers) if cfg.layers is None else cfg.layers
    layer_ids = sorted({structure.check_layer(int(layer)) for layer in chosen})
    if not layer_ids:
        raise ValueError("layers is empty: choose at least one block")
    settings = _settings(model, structure, data, tokenizer, cfg, layer_ids, world_size)

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    if not cfg.resume or cfg.overwrite:
        _clear(root, rank)
    manifest = _resume(rank_manifest_path(root, rank), settings, root, rank)
    if cfg.progress and rank == 0 and manifest.shards:
        print(resume_message(root, manifest), file=sys.stderr)
    if not manifest.complete:
        progress = cfg.progress and rank == 0
        _collect_rank(model, structure, data, tokenizer, manifest, cfg, on_shard, progress=progress)
        manifest.complete = True
        manifest.save()
    return _merged(root, manifest, world_size, group_size)


def resume_message(root: Path, manifest: Manifest) -> str:
    """What a re-run finds in ``root``: a finished collection, or how much of an interrupted one it keeps."""
    if manifest.complete:
        return (
            f"collect: {root} already holds this collection ({manifest.num_tokens} tokens in {len(manifest.shards)} "
            "shards, same settings); nothing to do (overwrite=True / --overwrite collects it again)"
        )
    next_batch = manifest.shards[-1]["batches"][1] + 1
    return (
        f"collect: resuming in {root}: {len(manifest.shards)} shards ({manifest.num_tokens} tokens) are already "
        f"written and verified; continuing from batch {next_batch}"
    )


def _settings(
    model: nn.Module,
    structure: ModelStructure,
    data: Any,
    tokenizer: Any,
    cfg: CollectConfig,
    layer_ids: list[int],
    world_size: int,
) -> dict[str, Any]:
    """The manifest's ``settings``: everything the shards depend on, in JSON-normal form."""
    config = getattr(model, "config", None)
    store_dtype = cfg.store_dtype
    settings: dict[str, Any] = {
        "model": {
            "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
            "model_type": getattr(config, "model_type", None),
            "num_layers": structure.num_layers,
            "hidden_size": getattr(config, "hidden_size", None),
            "vocab_size": getattr(config, "vocab_size", None),
            "fingerprint": model_fingerprint(model),
        },
        "data": {"fingerprint": data_fingerprint(data), "tokenizer": _tokenizer_id(tokenizer)},
        "layers": layer_ids,
        "features": list(cfg.features),
        "topk": int(cfg.topk) if "lens_topk" in cfg.features else 0,
        "positions": cfg.positions,
        "subsample": float(cfg.subsample),
        "seed": int(cfg.seed),
        "context": int(cfg.context),
        "batch_size": int(cfg.batch_size),
        "shard_tokens": int(cfg.shard_tokens),
        "max_tokens": None if cfg.max_tokens is None else int(cfg.max_tokens),
        "dtype": None if store_dtype is None else str(store_dtype).removeprefix("torch."),
        "pad_token_id": int(cfg.pad_token_id),
        "world_size": world_size,
    }
    return json.loads(json.dumps(settings))  # JSON-normal form, comparable with a read manifest


def _merged(root: Path, manifest: Manifest, world_size: int, group_size: int) -> Manifest:
    """The merged manifest once every part is done (this rank's while independent parts still run)."""
    if group_size > 1 and world_size == group_size:
        barrier()
        if manifest.rank == 0:
            merge_manifests(root, world_size)
        barrier()
        return Manifest.load(root)
    try:
        return merge_manifests(root, world_size)
    except ManifestError:
        if world_size == 1:
            raise
        return manifest  # other independent parts still running; the last one merges


def _collect_rank(
    model: nn.Module,
    structure: ModelStructure,
    data: Any,
    tokenizer: Any,
    manifest: Manifest,
    cfg: CollectConfig,
    on_shard: Callable[[dict[str, Any]], None] | None,
    *,
    progress: bool,
) -> None:
    """Run this rank's batches (from where the manifest stops) and write their shards."""
    from tqdm.auto import tqdm

    s = manifest.settings
    rank, world = int(manifest.rank or 0), int(s["world_size"])
    start_batch = manifest.shards[-1]["batches"][1] + 1 if manifest.shards else 0
    writer = _ShardWriter(manifest, rank, on_shard)
    device = input_device(model)
    windows = token_windows(iter_documents(data, tokenizer), s["context"], s["max_tokens"])
    was_training = model.training
    model.eval()
    desc = f"collect rank {rank}" + (" (resumed)" if start_batch else "")
    # The bar counts corpus tokens of every batch (other ranks' and resumed ones too), so it reaches its total.
    bar = tqdm(total=s["max_tokens"], unit="tok", desc=desc, disable=not progress)
    try:
        seen = 0
        for b, batch in enumerate(batch_windows(windows, s["batch_size"])):
            seen += len(batch)
            if b % world != rank or b < start_batch:
                bar.update(sum(len(w.ids) for w in batch))
                continue
            ids, mask, keep = _batch_inputs(batch, s)
            with (
                torch.no_grad(),
                collect(
                    model, cfg.capture, layers=s["layers"], positions="all", topk=s["topk"], structure=structure
                ) as trace,
            ):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            tensors = reduce_batch(trace, parse_features(cfg.features), keep, cfg.store_dtype)
            tensors.update(_token_meta(batch, ids, keep))
            refuse_nonfinite_batch(tensors, s["layers"], cfg.store_dtype)
            writer.add(b, batch, tensors)
            bar.update(int(mask.sum()))
            if writer.tokens >= s["shard_tokens"]:
                writer.flush()
        writer.flush()
        if bar.total is not None and bar.n < bar.total:  # the corpus ended before the token budget
            bar.total = bar.n
            bar.refresh()
    finally:
        bar.close()
        model.train(was_training)
    if seen == 0:
        raise ValueError("the data holds no tokens (empty file or only empty documents)")


def _batch_inputs(batch: list[Window], s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention mask, kept tokens)`` of one batch of windows, right-padded to its longest."""
    seq = max(len(w.ids) for w in batch)
    ids = torch.full((len(batch), seq), s["pad_token_id"], dtype=torch.long)
    mask = torch.zeros(len(batch), seq, dtype=torch.long)
    keep = torch.zeros(len(batch), seq, dtype=torch.bool)
    for row, w in enumerate(batch):
        ids[row, : len(w.ids)] = torch.tensor(w.ids)
        mask[row, : len(w.ids)] = 1
        keep[row, : len(w.ids)] = _subsample_keep(w, s["subsample"], s["seed"])
        if s["positions"] == "last":
            keep[row, : len(w.ids) - 1] = False
    return ids, mask, keep


def _token_meta(batch: list[Window], ids: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per kept token: its id, window, document and position in the document."""
    rows, cols = keep.nonzero(as_tuple=True)
    return {
        "token_id": ids[rows, cols],
        "window": torch.tensor([w.index for w in batch], dtype=torch.long)[rows],
        "doc": torch.tensor([w.doc for w in batch], dtype=torch.long)[rows],
        "doc_position": torch.tensor([w.start for w in batch], dtype=torch.long)[rows] + cols,
    }
