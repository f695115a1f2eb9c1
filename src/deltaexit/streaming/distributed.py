"""Data-parallel collection on ``torch.distributed`` (launched by ``torchrun``).

Nothing home-made: ranks come from the process group ``torchrun`` sets up. Batch
``b`` of the deterministic window stream goes to rank ``b % world_size`` (see
:mod:`deltaexit.streaming.corpus`); each rank writes its own shards and manifest;
after a barrier rank 0 merges the manifests. The union equals a single-process run.

Example:
    $ torchrun --nproc_per_node 2 -m deltaexit collect --model DIR --data valid.txt --out out/

    >>> distributed_rank()   # no process group: one rank of one
    (0, 1)
    >>> barrier()            # a no-op without a process group
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["barrier", "distributed_rank", "init_distributed_from_env", "local_device"]


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment when there is one.

    Returns True if this call initialised it (so the caller should destroy it), False if no
    launcher variables are set or a group already exists. The backend defaults to ``nccl``
    with CUDA and ``gloo`` otherwise.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return True


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def barrier() -> None:
    """``dist.barrier()`` when a process group exists, else nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
