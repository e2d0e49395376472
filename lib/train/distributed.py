"""DDP set-up driven by torchrun's environment variables; rank 0 alone prints and writes."""
import os

import torch
import torch.distributed as dist

from lib.core.env import distributed_info


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Start the process group under torchrun (NCCL on CUDA, gloo otherwise); (rank, world)."""
    rank, local_rank, world = distributed_info()
    if world > 1 and not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return rank, world


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM across ranks (a no-op when not distributed)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_flag(flag: bool, device) -> bool:
    """Rank 0's decision (e.g. stop training) for every rank, so no rank waits forever."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so all ranks evaluate one model."""
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)
