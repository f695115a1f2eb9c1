"""``deltaexit collect``: stream per-token features of a corpus into sharded safetensors files.

Example:
    $ deltaexit collect --model DIR --data valid.txt --out feats/ --features delta_norm,lens_topk
    $ torchrun --nproc_per_node 2 -m deltaexit collect --model DIR --data valid.txt --out feats/
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltaexit.streaming.writer import CollectConfig


def _layers(text: str) -> list[int] | None:
    if text.strip().lower() == "all":
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes 'all' or comma-separated ints, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "collect",
        help="stream residual-stream features of a corpus to sharded files (resumable, torchrun-aware)",
        description="Collect per-token features (deltas, norms, lens top-k) of a text corpus into "
        "safetensors shards with a JSON manifest. Re-running the same command resumes an interrupted "
        "run; under torchrun each rank writes its own shards and rank 0 merges the manifests.",
    )
    parser.add_argument(
        "--model", required=True, help="HF model directory (from_pretrained) or a shipped reference name (v1, v2)"
    )
    parser.add_argument("--data", required=True, help="UTF-8 text file, one document a line")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    parser.add_argument("--layers", type=_layers, default=None, help="'all' (default) or e.g. 0,3,7")
    parser.add_argument(
        "--features",
        default="delta,delta_norm,lens_topk",
        help="comma-separated: h_in,h_out,delta,h_in_norm,h_out_norm,delta_norm,lens_topk",
    )
    parser.add_argument("--topk", type=int, default=5, help="k of lens_topk (default 5)")
    parser.add_argument(
        "--positions", default="all", choices=["all", "last"], help="all tokens, or the last of each window"
    )
    parser.add_argument("--subsample", type=float, default=1.0, help="fraction of tokens kept (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=None, help="stop after this many corpus tokens")
    parser.add_argument("--shard-tokens", type=int, default=65_536, help="tokens per shard (default 65536)")
    parser.add_argument("--context", type=int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="storage dtype of vector features (default float16)",
    )
    parser.add_argument("--device", default="auto", help="'auto' (cuda:LOCAL_RANK if available), 'cpu', ...")
    parser.add_argument("--device-map", default=None, help="e.g. 'auto': split the model with accelerate")
    parser.add_argument("--offload-folder", default=None, help="folder for disk-offloaded weights")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run in --out")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace, pad_token_id: int) -> CollectConfig:
    """The :class:`~deltaexit.streaming.writer.CollectConfig` the flags ask for."""
    from deltaexit.streaming.writer import CollectConfig

    return CollectConfig(
        layers=args.layers,
        features=args.features,
        topk=args.topk,
        positions=args.positions,
        subsample=args.subsample,
        seed=args.seed,
        context=args.context,
        batch_size=args.batch_size,
        shard_tokens=args.shard_tokens,
        max_tokens=args.tokens,
        dtype=args.dtype,
        pad_token_id=pad_token_id,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def _load_model(args: argparse.Namespace):
    import torch

    from deltaexit.commands.common import load_model, model_path
    from deltaexit.streaming.distributed import local_device

    kwargs = {}
    if args.device_map is not None:
        kwargs["device_map"] = args.device_map
        if args.offload_folder is not None:
            kwargs["offload_folder"] = args.offload_folder
    model: torch.nn.Module = load_model(model_path(args.model), **kwargs)
    if args.device_map is None:
        device = local_device() if args.device == "auto" else torch.device(args.device)
        model.to(device)
    return model


def run(args: argparse.Namespace) -> int:
    from deltaexit.commands.common import load_tokenizer, model_path
    from deltaexit.streaming.distributed import init_distributed_from_env
    from deltaexit.streaming.writer import collect_to_disk

    created = init_distributed_from_env()
    try:
        model = _load_model(args)
        tokenizer = load_tokenizer(args.tokenizer or model_path(args.model))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        manifest = collect_to_disk(model, args.data, args.out, build_config(args, int(pad)), tokenizer=tokenizer)
        if manifest.rank is None or manifest.rank == 0:
            summary = {
                "out": str(args.out),
                "tokens": manifest.num_tokens,
                "shards": len(manifest.shards),
                "complete": manifest.complete,
                "features": list(manifest.features),
                "layers": list(manifest.layers),
            }
            print(json.dumps(summary))
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
