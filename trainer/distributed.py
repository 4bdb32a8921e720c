"""Processes and devices: one process per device under torchrun, gradients averaged across them.

torchrun --nproc-per-node 2 -m trainer train ...          # data-parallel, same arguments
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

DISTRIBUTED = ("ddp", "fsdp2")


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device
    fsdp: bool = False  # parameters sharded with FSDP2: collectives in every forward

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(layout: str = "ddp") -> Dist:
    """One process per device; torchrun's environment says how many (WORLD_SIZE, RANK).
    ``layout`` is ``ddp`` or ``fsdp2`` (sharding only where there are several processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, device, fsdp=layout == "fsdp2" and world > 1)


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


def shard_fsdp2(model: torch.nn.Module, d: Dist) -> None:
    """``fully_shard`` each decoder layer, then the decoder (embeddings, final norm), then the
    root (an untied LM head). A tied LM head is the input embedding: that one weight stays
    whole on every process (small models tie; 8B and 70B Llamas do not)."""
    from torch.distributed.fsdp import fully_shard

    lm = model.get_base_model()
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    embedding = lm.get_input_embeddings()
    tied = head.weight is embedding.weight
    if tied:
        embedding.to(d.device)
    whole = {embedding.weight} if tied else None
    for layer in decoder.layers:
        fully_shard(layer)
    fully_shard(decoder, ignored_params=whole)
    # The root reshards after forward too, so the LM head is a sharded DTensor whenever the
    # log-prob path (trainer.logps) reads it, and gathered there for one pass.
    fully_shard(model, reshard_after_forward=True, ignored_params=whole)
    # FSDP2 takes the first module to run forward as the root of every later pass; the log-prob
    # path calls the decoder directly, so the real root runs once first.
    with torch.no_grad():
        model(input_ids=torch.ones((1, 1), dtype=torch.long, device=d.device), use_cache=False)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process when FSDP2 shards it (a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights, whole and on the CPU; every process must call it."""
    return {
        n: full_tensor(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def load_trainable_state_(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole (CPU) tensors into the trainable parameters, each process keeping its shard."""
    from torch.distributed.tensor import distribute_tensor

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params.keys() == state.keys(), "checkpoint is for another adapter shape"
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if isinstance(p, DTensor):
                value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
            p.copy_(value)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> Any:
    """What a checkpoint keeps of the optimizer: whole tensors under FSDP2 too (collective)."""
    if not d.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Any, d: Dist
) -> None:
    if not d.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_optimizer_state_dict(model, optimizer, state, options=options)
