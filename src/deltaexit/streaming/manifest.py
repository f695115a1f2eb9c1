"""The JSON manifest of a streamed collection: settings, and which windows each shard covers.

Layout of an output directory::

    out/
      manifest.json                     # merged, written last (rank 0); complete=True when done
      manifest.rank00000.json           # one per rank, rewritten atomically after every shard
      shard-r00000-00000.safetensors    # rank 0's first shard, ...

Example:
    >>> import tempfile
    >>> from deltaexit.streaming import collect_to_disk
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=64)
    >>> out = tempfile.mkdtemp()
    >>> _ = collect_to_disk(model, [list(range(3, 40))], out, features="delta_norm", context=16, progress=False)
    >>> m = Manifest.load(out)
    >>> m.num_tokens, m.features, m.layers
    (37, ('delta_norm',), (0, 1))
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaexit.io import atomic_write_json, file_sha256

__all__ = ["FORMAT", "FORMAT_VERSION", "Manifest", "ManifestError", "file_sha256", "rank_manifest_path"]

FORMAT = "deltaexit-stream"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest or shard is missing, corrupt, incomplete or from other settings."""


def rank_manifest_path(out_dir: str | os.PathLike[str], rank: int) -> Path:
    """Path of rank ``rank``'s own manifest."""
    return Path(out_dir) / f"manifest.rank{rank:05d}.json"


def shard_name(rank: int, index: int) -> str:
    """File name of shard ``index`` of rank ``rank``."""
    return f"shard-r{rank:05d}-{index:05d}.safetensors"


@dataclass
class Manifest:
    """What a streamed collection wrote.

    Attributes:
        root: Directory holding the manifest and shards.
        settings: Everything that determines the content (model and data fingerprints,
            layers, features, top-k, subsample, seed, context, batch size, shard size,
            token budget, dtype, world size).
        shards: One dict per shard: ``file``, ``rank``, ``index``, ``tokens``, ``batches``
            (first and last global batch), ``windows`` (``[start, stop)`` ranges of global
            window ids), ``docs`` (first and last document id), ``sha256``, ``bytes``.
        complete: Whether the run finished (all ranks, merged).
        rank: The rank of a per-rank manifest (None for the merged one).
    """

    root: Path
    settings: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    rank: int | None = None

    # -- reading ---------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Tokens stored over all shards."""
        return sum(int(s["tokens"]) for s in self.shards)

    @property
    def features(self) -> tuple[str, ...]:
        """Feature names (see :mod:`deltaexit.streaming.features`)."""
        return tuple(self.settings["features"])

    @property
    def layers(self) -> tuple[int, ...]:
        """0-based block ids stored, in order."""
        return tuple(self.settings["layers"])

    @property
    def num_layers(self) -> int:
        """Number of blocks of the model (not only the stored ones)."""
        return int(self.settings["model"]["num_layers"])

    def shard_paths(self) -> list[Path]:
        """Absolute paths of the shards, in manifest order."""
        return [self.root / s["file"] for s in self.shards]

    def window_id_end(self) -> int:
        """One past the largest global window id the shards cover (0 for none): the size of a per-window table."""
        return max((stop for s in self.shards for _, stop in s["windows"]), default=0)

    def window_ids(self) -> list[int]:
        """Every global window id the shards cover, sorted (each exactly once in a sound collection)."""
        ids = [w for s in self.shards for start, stop in s["windows"] for w in range(start, stop)]
        return sorted(ids)

    def verify(self, *, quick: bool = False) -> None:
        """Check that every shard exists with its recorded sha256; raise :class:`ManifestError` otherwise.

        Args:
            quick: Check only that each shard exists with its recorded size (a ``stat`` per shard, no reading);
                :class:`~deltaexit.streaming.dataset.ShardDataset` does this before it yields anything.
        """
        for shard in self.shards:
            path = self.root / shard["file"]
            if not path.is_file():
                raise ManifestError(f"shard {str(path)!r} listed in the manifest is missing; re-collect it")
            size = path.stat().st_size
            if "bytes" in shard and size != int(shard["bytes"]):
                raise ManifestError(
                    f"shard {str(path)!r} is corrupt: {size} bytes, the manifest recorded {shard['bytes']}; "
                    "re-collect with overwrite=True (deltaexit collect --overwrite)"
                )
            if not quick and file_sha256(path) != shard["sha256"]:
                raise ManifestError(
                    f"shard {str(path)!r} is corrupt (sha256 differs from the manifest); re-collect with "
                    "overwrite=True (deltaexit collect --overwrite)"
                )

    # -- writing ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (format, format version, settings, shards, totals)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "complete": self.complete,
            "rank": self.rank,
            "num_tokens": self.num_tokens,
            "num_shards": len(self.shards),
            "settings": self.settings,
            "shards": self.shards,
        }

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write atomically to ``path`` (default: the merged or this rank's manifest path)."""
        if path is None:
            path = self.root / MANIFEST_NAME if self.rank is None else rank_manifest_path(self.root, self.rank)
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read a manifest file (merged or per-rank); raise :class:`ManifestError` if unreadable."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise ManifestError(
                f"manifest {str(path)!r} is not valid JSON ({exc}); delete the output directory or pass overwrite=True"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{str(path)!r} is not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"{str(path)!r} has format version {data.get('format_version')}; this deltaexit reads "
                f"version {FORMAT_VERSION}. Re-collect with this version."
            )
        return cls(
            root=path.parent,
            settings=data["settings"],
            shards=list(data["shards"]),
            complete=bool(data["complete"]),
            rank=data.get("rank"),
        )

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str], *, require_complete: bool = True) -> Manifest:
        """Read the merged manifest of ``out_dir``.

        Raises:
            FileNotFoundError: No manifest (the collection never finished: resume it).
            ManifestError: Corrupt, or incomplete while ``require_complete``.
        """
        path = Path(out_dir) / MANIFEST_NAME
        if not Path(out_dir).is_dir():
            raise FileNotFoundError(
                f"no collection at {str(out_dir)!r}: the directory does not exist; pass the output directory of "
                "collect_to_disk / deltaexit collect --out"
            )
        if not path.is_file():
            if not any(Path(out_dir).glob("manifest.rank*.json")):
                raise FileNotFoundError(
                    f"{str(out_dir)!r} is not a collection (no {MANIFEST_NAME} and no per-rank manifests); pass the "
                    "output directory of collect_to_disk / deltaexit collect --out"
                )
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} in {str(out_dir)!r}: the collection did not finish; run it again with "
                "the same arguments to resume"
            )
        manifest = cls.read(path)
        if require_complete and not manifest.complete:
            raise ManifestError(f"the collection in {str(out_dir)!r} is incomplete; resume it")
        return manifest


def merge_manifests(out_dir: str | os.PathLike[str], world_size: int) -> Manifest:
    """Merge the per-rank manifests of ``out_dir`` into ``manifest.json`` (written atomically).

    Every rank must be complete and share the same settings. Shards are ordered by their
    first global batch, so the merged order is the corpus order whatever the world size.

    Example:
        >>> import tempfile
        >>> from deltaexit.streaming import collect_to_disk
        >>> from deltaexit.testing import tiny_model
        >>> model, out = tiny_model("llama", num_layers=2, hidden=32, vocab=64), tempfile.mkdtemp()
        >>> for rank in (0, 1):  # two independent jobs, one part each
        ...     _ = collect_to_disk(model, [list(range(3, 40))], out, features="delta_norm", context=8, batch_size=1,
        ...                         rank=rank, world_size=2, progress=False)
        >>> merge_manifests(out, world_size=2).num_tokens
        37
    """
    parts = []
    for rank in range(world_size):
        path = rank_manifest_path(out_dir, rank)
        if not path.is_file():
            raise ManifestError(f"rank {rank} wrote no manifest ({str(path)!r}); run that rank (again)")
        part = Manifest.read(path)
        if not part.complete:
            raise ManifestError(f"rank {rank} did not finish ({str(path)!r}); resume the run")
        parts.append(part)
    settings = parts[0].settings
    for rank, part in enumerate(parts[1:], start=1):
        if part.settings != settings:
            raise ManifestError(f"rank {rank} was collected with other settings than rank 0; re-run it")
    shards = sorted((s for p in parts for s in p.shards), key=lambda s: (s["batches"][0], s["rank"]))
    merged = Manifest(root=Path(out_dir), settings=settings, shards=shards, complete=True, rank=None)
    merged.save()
    return merged
