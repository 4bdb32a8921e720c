"""Processes and devices: one process per device under torchrun, gradients averaged across them.

torchrun --nproc-per-node 2 -m trainer train ...          # data-parallel, same arguments
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """One process per device; torchrun's environment says how many (WORLD_SIZE, RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def all_reduce_mean_(tensors: Sequence[torch.Tensor], d: Dist) -> None:
    """Average in place across processes, as one flat buffer (one collective, not hundreds)."""
    if d.world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= d.world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum_(tensor: torch.Tensor, d: Dist) -> None:
    if d.world > 1:
        dist.all_reduce(tensor)
