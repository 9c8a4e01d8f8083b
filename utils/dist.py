"""torchrun helpers: one process per device, DDP over nccl (CUDA) or gloo (CPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_SETUP_GROUP = None  # the process group of setup's waits (caches): gloo, with its own timeout


def init_distributed(device_name: str, setup_timeout_minutes: Optional[float] = None) -> DistInfo:
    """Reads torchrun's environment; a plain `python script.py` run is rank 0 of 1.

    Training's collectives keep the process group's default timeout (a hang is found in
    minutes); setup's waits (one rank encoding its share of the latent or text cache while
    another has finished its own) use a second, gloo group with `setup_timeout_minutes`
    (`setup=True` in `barrier`, `gather_dicts`, `gather_objects`)."""
    global _SETUP_GROUP
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if setup_timeout_minutes is not None:
        _SETUP_GROUP = torch_dist.new_group(backend="gloo", timeout=timedelta(minutes=setup_timeout_minutes))
    return DistInfo(rank, world_size, local_rank)


def _group(setup: bool):
    return _SETUP_GROUP if setup else None


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Under torchrun each process takes the CUDA device of its local rank."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    t = t.clone()
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t / info.world_size


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    t = t.clone()
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Elementwise max over ranks (a flag set on any rank is set on all; -x gives a min)."""
    if not info.enabled:
        return t
    t = t.clone()
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t


def gather_dicts(part: dict, info: DistInfo, setup: bool = False) -> dict:
    """Union of every rank's dict (small, picklable values), available on all ranks."""
    if not info.enabled:
        return dict(part)
    parts: list = [None] * info.world_size
    torch_dist.all_gather_object(parts, part, group=_group(setup))
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged


def barrier(info: DistInfo, setup: bool = False) -> None:
    if info.enabled:
        torch_dist.barrier(group=_group(setup))


def any_rank(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """Each flag True on every rank if it is True on any rank (stop requests): one all-reduce."""
    if not info.enabled:
        return list(flags)
    t = all_reduce_max(torch.tensor([1.0 if f else 0.0 for f in flags], device=device), info)
    return [bool(x) for x in t.tolist()]


def single_process_group(device: torch.device) -> None:
    """A process group of one for a run that is not under torchrun but needs one (FSDP and its
    sharded checkpoints); `cleanup` destroys it. A no-op when a group exists."""
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)


def cleanup(info: DistInfo) -> None:
    global _SETUP_GROUP
    if torch_dist.is_initialized():  # torchrun's, or a one-process run's `single_process_group`
        torch_dist.destroy_process_group()
    _SETUP_GROUP = None


def gather_objects(obj, info: DistInfo, setup: bool = False) -> list:
    """Every rank's `obj` (small, picklable), as a list indexed by rank, on all ranks."""
    if not info.enabled:
        return [obj]
    parts: list = [None] * info.world_size
    torch_dist.all_gather_object(parts, obj, group=_group(setup))
    return parts



def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t`: the local shard of a DTensor (FSDP's sharded parameters,
    their gradients, AdamW moments and EMA), `t` itself otherwise. No communication; a view, so
    in-place writes (under no_grad) change the DTensor."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def copy_shard_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst` <- `src`, each process its own part, without communication: `dst` a DTensor (or a
    plain tensor), `src` a whole tensor (its slice is taken) or a DTensor placed like `dst`."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(dst, DTensor) and not isinstance(src, DTensor):
        src = distribute_tensor(src.detach().to(dst.device, dst.dtype), dst.device_mesh, dst.placements,
                                src_data_rank=None)  # None: every process slices its own copy
    with torch.no_grad():
        local_tensor(dst).copy_(local_tensor(src))
