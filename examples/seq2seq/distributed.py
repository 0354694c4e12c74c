"""Single-process or DistributedDataParallel training, decided by the env vars torchrun sets."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: rank 0 of 1 unless started by torchrun."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def setup(device: str) -> DistributedContext:
    """Joins the process group when launched by torchrun: NCCL for CUDA, gloo for CPU.

    `device` is "cpu", "cuda" or "auto" (CUDA when available). Under torchrun each process
    takes the GPU of its LOCAL_RANK.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but torch sees no CUDA device")
    if not launched_by_torchrun():
        return DistributedContext(0, 1, torch.device("cuda" if use_cuda else "cpu"))

    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        the_device = torch.device("cuda", local_rank)
    else:
        the_device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), the_device)


def teardown(context: DistributedContext) -> None:
    if context.distributed:
        # Every rank reaches this point before any tears down: a rank that destroys its group
        # (and exits) while another still talks to the store sometimes aborted at exit.
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], context: DistributedContext) -> list[float]:
    """Sums numbers over all processes (identity in a single process)."""
    if not context.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.tolist()
