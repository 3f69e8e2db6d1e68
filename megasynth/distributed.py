"""Process-group setup for torchrun (or a single plain process): device, backend, and the named (dp, tp) mesh.

    dist_info = init_distributed(tp=2)          # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    ...
    destroy_distributed()

NCCL on CUDA, gloo on CPU, chosen from the device. A single process without torchrun's variables gets a 1x1
mesh and no process group at all, so plain `python -m megasynth.train` needs no launcher.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megasynth.config import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # named dims ("dp", "tp"); None for a single process
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(tp: int = 1, device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise the process group (when launched by torchrun) and the (dp, tp) device mesh."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if tp < 1 or world_size % tp != 0:
        raise ConfigError(f"parallel.tp={tp} does not divide the world size {world_size} (WORLD_SIZE from torchrun: "
                          "nodes x processes per node); the data-parallel degree is world_size / tp")
    if world_size == 1 and tp == 1:
        return DistInfo(0, 1, 0, dev, None, 0, 1, 0, 1)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
    mesh = init_device_mesh(dev.type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    if 1 < tp < world_size:
        # A flattened ("dp", "tp") view lets DTensor reduce a value sharded or partial over both dims (the
        # gradient norm under FSDP + TP) with one collective instead of one per dim (torchtitan does the same;
        # `_flatten` is the mesh API for it, still underscored).
        mesh["dp", "tp"]._flatten("dp_tp")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, mesh=mesh,
                    dp_rank=mesh["dp"].get_local_rank(), dp_size=mesh["dp"].size(),
                    tp_rank=mesh["tp"].get_local_rank(), tp_size=tp)


def is_distributed() -> bool:
    """Whether this process is one rank of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (every rank must call it); [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (every rank must call it); `obj` itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, info: DistInfo, group: str | None = None) -> torch.Tensor:
    """Sum a tensor over all ranks (or over one mesh dim); a no-op in a single process."""
    if info.mesh is None:
        return value
    pg = info.mesh[group].get_group() if group else None
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=pg)
    return value


def rank0_first(info: DistInfo, fn):
    """Run fn on rank 0 first (it builds caches), then on the other ranks (they read them)."""
    if info.world_size == 1:
        return fn()
    result, error = None, None
    if info.rank == 0:
        try:
            result = fn()
        except Exception as e:  # still reach the barrier, so the other ranks do not hang
            error = e
    dist.barrier()
    if error is not None:
        raise error
    return fn() if info.rank != 0 else result


def on_rank0(make, *, main: bool, distributed: bool, error_type: type[Exception],
             catch: tuple[type[Exception], ...], convert: bool = False):
    """make() on rank 0 (`main`; None on the other ranks). Its refusal (an exception of a `catch` type) reaches
    every rank, so that all stop together with its one line instead of waiting for rank 0 in a collective: rank 0
    raises the refusal itself (`convert`: error_type(its message)), the others error_type(its message). With
    `distributed` it is also a barrier (every rank must call it)."""
    made, refusal = None, None
    if main:
        try:
            made = make()
        except catch as e:
            refusal = error_type(str(e)) if convert else e
    if distributed:
        message = broadcast_object(None if refusal is None else str(refusal))
        if refusal is None and message is not None:
            refusal = error_type(message)
    if refusal is not None:
        raise refusal
    return made
