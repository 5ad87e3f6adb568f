"""Data-parallel runs under torchrun: process-group set-up from torchrun's environment, and small helpers.

    torchrun --nproc-per-node 2 -m gatelab train --config experiments/dense-2k.json --out runs/dense-2k
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 --nproc-per-node 8 -m gatelab ...

Each rank computes its slice of the fixed global batch (`TrainConfig.batch_size` rows, whatever the number of
ranks); DistributedDataParallel averages the gradients, so one step equals one step of a single process on the
whole batch, up to the order of floating-point sums. Rank 0 alone writes checkpoints, metrics and progress.
Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gatelab.config import GatelabError
from gatelab.devices import resolve_device


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice | None:
        """This rank's rows of a global batch."""
        if self.world == 1:
            return None
        if batch_size % self.world:
            raise GatelabError(f"batch_size {batch_size} is not divisible by the {self.world} data-parallel ranks")
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over ranks (for logging)."""
        if self.world == 1:
            return value
        value = value.detach().float().clone()
        dist.all_reduce(value)
        return value / self.world

    def min(self, value: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value


def setup(device_name: str = "auto") -> Context:
    """Join torchrun's process group (once per process) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(device=resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name.startswith("cuda:"):
        raise GatelabError("under torchrun each rank takes cuda:LOCAL_RANK; set device=auto or cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise GatelabError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = resolve_device(device_name if device_name != "auto" else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
