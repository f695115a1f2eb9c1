"""Scale-out: streaming collection to sharded files, lazy datasets, out-of-core fits, data-parallel runs.

Example:
    >>> import tempfile
    >>> from deltaexit.testing import tiny_model
    >>> model = tiny_model("llama", num_layers=2, hidden=32, vocab=64)
    >>> out = tempfile.mkdtemp()
    >>> _ = collect_to_disk(model, [list(range(3, 40))], out, features="delta_norm,lens_topk", topk=2,
    ...                     context=16, progress=False)
    >>> batch = next(iter(ShardDataset(out, labels="final", batch_size=8)))
    >>> tuple(batch["delta_norm"].shape), tuple(batch["label_final"].shape)   # [tokens, layers]
    ((8, 2), (8, 2))
"""

from deltaexit.streaming.corpus import Window, batch_windows, iter_documents, read_documents, token_windows
from deltaexit.streaming.dataset import (
    LABELS,
    META_FIELDS,
    ShardDataset,
    iter_batches,
    layer_labels,
    layer_states,
    load_features,
)
from deltaexit.streaming.distributed import distributed_rank, init_distributed_from_env
from deltaexit.streaming.features import STREAM_FEATURES, parse_features
from deltaexit.streaming.fit import ShardFitSource
from deltaexit.streaming.manifest import FORMAT_VERSION, Manifest, ManifestError, merge_manifests
from deltaexit.streaming.states import (
    StoredLayerState,
    check_collection,
    decision_labels,
    decision_layers,
    labels_from_topk,
)
from deltaexit.streaming.writer import CollectConfig, collect_to_disk, model_fingerprint

__all__ = [
    "FORMAT_VERSION",
    "LABELS",
    "META_FIELDS",
    "STREAM_FEATURES",
    "CollectConfig",
    "Manifest",
    "ManifestError",
    "ShardDataset",
    "ShardFitSource",
    "StoredLayerState",
    "Window",
    "batch_windows",
    "check_collection",
    "collect_to_disk",
    "decision_labels",
    "decision_layers",
    "distributed_rank",
    "init_distributed_from_env",
    "iter_batches",
    "iter_documents",
    "labels_from_topk",
    "layer_labels",
    "layer_states",
    "load_features",
    "merge_manifests",
    "model_fingerprint",
    "parse_features",
    "read_documents",
    "token_windows",
]
