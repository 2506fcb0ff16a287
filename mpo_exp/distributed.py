"""Rank-aware helpers for running the pipeline under several processes (torchrun / DDP).

Every function here is a no-op (or the identity) when ``torch.distributed`` is not initialised,
so the single-process path neither changes numerically nor pays for any of it. Sharding is
contiguous and gathers concatenate in rank order, so ``gather_cat(f(shard(rows)))`` equals
``f(rows)`` row for row whenever ``f`` works row by row.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# the variables torchrun sets (and Lightning's TorchElasticEnvironment reads)
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _dist():
    import torch.distributed as dist

    return dist


def initialized() -> bool:
    """Whether a process group is up; never imports torch (no group without it)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    return _dist().get_rank() if initialized() else 0


def world_size() -> int:
    return _dist().get_world_size() if initialized() else 1


def is_main() -> bool:
    """Whether this process writes results, logs and artifacts (rank 0, or the only process)."""
    return rank() == 0


def launched_world_size() -> int:
    """The world size a launcher (torchrun) announced in ``WORLD_SIZE``; 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(accelerator: str = "auto") -> bool:
    """Join the process group a launcher (torchrun) described in the environment.

    Done before the first stage, not left to Lightning's first ``fit``, because the artifact
    cache and MPO's scoring need the ranks before any training. Lightning then finds the group
    initialised and reuses it. Returns whether a group (of more than one process) is up.
    """
    if initialized():
        return world_size() > 1
    if launched_world_size() <= 1:
        return False
    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE>1 but the launcher did not set {missing}: launch with torchrun")
    import torch

    dist = _dist()
    use_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if use_cuda:  # NCCL's object collectives use the current device
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    log.info("rank %d of %d joined the process group (%s)", rank(), world_size(), dist.get_backend())
    return True


def shard_bounds(n: int, world: int | None = None, at: int | None = None) -> tuple[int, int]:
    """[start, end) of rank ``at``'s contiguous share of ``n`` rows (sizes differ by at most one)."""
    world = world_size() if world is None else world
    at = rank() if at is None else at
    return at * n // world, (at + 1) * n // world


def shard(seq: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of ``seq`` (all of it in one process)."""
    if world_size() == 1:
        return seq
    start, end = shard_bounds(len(seq))
    return seq[start:end]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order ([obj] in one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (lengths along ``dim`` may differ) in rank order.

    Goes through CPU objects: meant for results (scores, rewards), not for gradients.
    """
    if world_size() == 1:
        return tensor
    import torch

    device = tensor.device
    parts = gather_objects(tensor.detach().cpu())
    return torch.cat(parts, dim=dim).to(device)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        _dist().barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks (a new tensor; ``tensor`` itself in one process)."""
    if world_size() == 1:
        return tensor
    dist = _dist()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def ddp_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` of the global batch, returned as this rank's share of DDP's gradient average.

    ``total`` is this rank's (differentiable) sum, ``count`` its number of terms (tokens). DDP
    averages the ranks' gradients, so dividing by the rank's own count would weigh a token on a
    rank with few tokens more than one on a rank with many. Dividing by the count summed over
    ranks, times the world size that DDP's average divides out again, makes the average over
    ranks (of the values and of the gradients) the single-process ``total / count``.
    """
    world = world_size()
    if world > 1:
        return total * world / all_reduce_sum(count.detach()).clamp(min=1)
    return total / count.clamp(min=1)


def seed_rank_stream() -> None:
    """Offset torch's seed by the rank, so ranks sampling their shards draw distinct streams.

    Rank 0 (and a single process) keeps the stream it was seeded with.
    """
    if rank() > 0:
        import torch

        torch.manual_seed(torch.initial_seed() + 7919 * rank())
