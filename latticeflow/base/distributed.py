"""Multi-process runs under ``torchrun``: the process group, per-rank devices, seeds and shards.

``torchrun --nproc_per_node=K -m latticeflow.cli train RECIPE`` (or ``sample``) starts K copies
of the command. Each finds its rank in the environment that torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins one process group:
NCCL when the rank runs on a GPU, gloo on the CPU. A rank runs on ``cuda:LOCAL_RANK`` when the
requested device is ``auto`` (and CUDA is available), ``cuda`` or ``cuda:N`` (the index is
replaced by the local rank), and on the CPU when it is ``cpu``. Without those variables, or with
``WORLD_SIZE = 1``, commands run as a single process and nothing here is used.

Seeds: rank 0 keeps the single-process seed, rank r ≥ 1 gets an independent 63-bit seed derived
from (seed, r) with :class:`numpy.random.SeedSequence` (:func:`rank_seed`); ``seed + r`` is
avoided on purpose, because it would make rank 1 of a run with seed s repeat rank 0 of a run with
seed s + 1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from latticeflow.base.device import select_device
from latticeflow.base.errors import LatticeflowError

log = logging.getLogger("latticeflow")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a multi-process run and the device it works on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes shared outputs (checkpoints, metrics, plots, joined files)."""
        return self.rank == 0


def torchrun_ranks() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment; None for a single process
    (variables absent, or ``WORLD_SIZE = 1``)."""
    if not all(name in os.environ for name in _ENV):
        return None
    try:
        rank, world, local = (int(os.environ[name]) for name in _ENV[:3])
    except ValueError:
        raise LatticeflowError("RANK, WORLD_SIZE and LOCAL_RANK must be integers "
                               "(set by torchrun)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LatticeflowError(f"inconsistent torchrun environment: RANK={rank}, "
                               f"WORLD_SIZE={world}, LOCAL_RANK={local}")
    return None if world == 1 else (rank, world, local)


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` for a requested device ``name`` (see module
    docstring): ``cuda:LOCAL_RANK`` for auto-with-CUDA, ``cuda`` and ``cuda:N``; else the CPU."""
    device = select_device(name)
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise LatticeflowError(f"local rank {local_rank} has no GPU (this node has "
                               f"{torch.cuda.device_count()}); start at most that many "
                               f"processes per node")
    return torch.device("cuda", local_rank)


@contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistributedContext | None]:
    """Join torchrun's process group for the duration of the block; yields None when this is a
    single-process run. A group that is already initialised is used and left open."""
    ranks = torchrun_ranks()
    if ranks is None:
        yield None
        return
    rank, world, local = ranks
    target = rank_device(device, local)
    owned = not dist.is_initialized()
    if owned:
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", rank=rank,
                                world_size=world,
                                device_id=target if target.type == "cuda" else None)
    try:
        yield DistributedContext(rank, world, local, target)
    finally:
        if owned:
            dist.destroy_process_group()


def label_logs(context: DistributedContext) -> None:
    """Prefix this process's log lines with ``[rank r/K]``."""
    formatter = logging.Formatter(f"[rank {context.rank}/{context.world_size}] %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``: ``seed`` itself for rank 0, an independent 63-bit seed derived
    from (seed, rank) otherwise (it fits the int64 ``seed`` attribute of an ensemble)."""
    if rank == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def shard_path(path: str | os.PathLike, rank: int) -> Path:
    """The shard file of ``rank`` next to the joined file: ``FILE.h5`` → ``FILE.rank<r>.h5``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def split_rows(n: int, world_size: int) -> list[int]:
    """``n`` rows over ``world_size`` ranks as evenly as possible (the first ranks get one more)."""
    base, extra = divmod(n, world_size)
    return [base + (r < extra) for r in range(world_size)]


# ------------------------------------------------------------------------------------------
# Collectives (every rank must call them, in the same order)
# ------------------------------------------------------------------------------------------


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on all ranks) stacked along a new first axis."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Wait until every rank gets here."""
    dist.barrier()


__all__ = ["DistributedContext", "barrier", "distributed_session", "gather_objects",
           "gather_rows", "label_logs", "rank_device", "rank_seed", "shard_path", "split_rows",
           "torchrun_ranks"]
