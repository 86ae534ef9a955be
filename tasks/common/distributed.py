"""Process-group set-up for ``torchrun`` (NCCL on GPU, gloo on CPU) and the few collectives the engine needs.

A single process (no ``torchrun``) is a world of size 1 and every helper here is then a no-op, so the same code
runs on a laptop and on a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` is this rank's GPU when CUDA is available, else the CPU; ``cpu`` / ``cuda`` force one."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch.cuda.is_available() is False; use device=cpu")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_world(device: str = "auto", backend: str | None = None) -> World:
    """Join the process group ``torchrun`` describes through RANK / WORLD_SIZE / LOCAL_RANK, if any.

    The backend is NCCL for CUDA and gloo for the CPU unless ``backend`` names one. Under SLURM (Hydra's submitit
    launcher, ``hydra/launcher=slurm``) with several tasks, submitit derives the same variables from SLURM's.
    """
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        try:
            from submitit.helpers import TorchDistributedEnvironment
        except ImportError as error:
            raise RuntimeError("a multi-task SLURM job needs submitit: pip install -e '.[slurm]'") from error
        TorchDistributedEnvironment().export()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if chosen.type == "cuda" else "gloo"))
    return World(rank, world_size, local_rank, chosen)


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor (returned, input untouched); the tensor itself in a single process."""
    if not dist.is_initialized():
        return values
    total = values.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: object) -> list[object]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` in a single process)."""
    if not dist.is_initialized():
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_module(module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Overwrite ``module``'s parameters (unless ``buffers_only``) and buffers with rank 0's, in place; a no-op in a
    single process. What ``DistributedDataParallel`` does at construction (and, for buffers, before every forward)."""
    if not dist.is_initialized():
        return
    tensors = [] if buffers_only else [p.data for p in module.parameters()]
    tensors += [b for b in module.buffers()]
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over ranks (a missing gradient counts as zeros), in one
    all-reduce per dtype and device; a no-op in a single process. This is the synchronisation
    ``DistributedDataParallel`` performs during ``backward``, for models that are not called through it (the
    inpainting GAN steps its generator and discriminator separately)."""
    if not dist.is_initialized():
        return
    world_size = dist.get_world_size()
    groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for params in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for p in params:
            count = p.grad.numel()
            p.grad.copy_(flat[offset:offset + count].view_as(p.grad))
            offset += count
