"""torch.distributed plumbing: process group from torchrun's environment, gradient and buffer averaging.

Methods never see DDP wrappers: the trainer's context averages gradients before every optimiser step
and BatchNorm buffers at the end of an epoch, so every method (DR-MGF's exit passes included) runs the
same code on one process and on many. One flattened all-reduce per call keeps the message count low.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from anytime.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Rank and world size as set by torchrun (WORLD_SIZE, RANK, LOCAL_RANK); one process otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"malformed torchrun environment (WORLD_SIZE/RANK/LOCAL_RANK): {exc}") from exc
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def init_distributed(info: DistInfo, device: torch.device) -> bool:
    """Start the process group (gloo on CPU, NCCL on CUDA) if needed; True when this call started it."""
    if not info.enabled or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    logger.info("process group: backend=%s rank=%d/%d", backend, info.rank, info.world_size)
    return True


def shutdown_distributed(started: bool) -> None:
    if started and dist.is_initialized():
        # A rank that tears gloo down while its peer still talks to it, or that leaves objects holding its
        # tensors to interpreter finalisation, can abort at exit ("terminate called without an active
        # exception", seen in CI and under load): collect what is unreachable now, then wait for every rank.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_tensors(tensors: list[torch.Tensor]) -> None:
    """In-place average of `tensors` over all ranks (same shapes and order on every rank)."""
    if not tensors or not _active():
        return
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    average_tensors([p.grad for p in params if p.grad is not None])


def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics); integer counters stay as they are."""
    average_tensors([b for b in module.buffers() if b.is_floating_point()])


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank `src`'s parameters and buffers."""
    if not _active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over ranks (a copy; `values` is unchanged on one process)."""
    out = values.clone()
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj, src: int = 0):
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _active():
        dist.barrier()
