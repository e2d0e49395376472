"""Where we run (Colab, Kaggle, SLURM, local), on which device, with how many loader workers.

One place every script asks; torch is imported lazily so a config error never waits for CUDA.
"""
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Environment:
    name: str          # colab | kaggle | slurm | local
    cpu_count: int     # CPUs this process may use
    max_workers: int   # cap on DataLoader workers here


def detect_environment() -> Environment:
    """Identify the platform from modules and environment variables it sets."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
        # Colab's shared-memory limit makes more than 2 workers crash or thrash.
        return Environment("colab", cpus, min(2, cpus))
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
        return Environment("kaggle", cpus, min(4, cpus))
    if "SLURM_JOB_ID" in os.environ:
        slurm_cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", cpus))
        return Environment("slurm", slurm_cpus, max(0, min(slurm_cpus - 1, 16)))
    return Environment("local", cpus, max(0, min(cpus - 1, 8)))


def default_workers(requested: int = -1, env: Environment | None = None) -> int:
    """Loader workers: the request capped by the environment; -1 means pick for me."""
    env = env or detect_environment()
    if requested < 0:
        return env.max_workers
    return min(requested, max(env.max_workers, 0)) if env.name == "colab" else requested


def select_device(requested: str = "auto"):
    """torch.device from 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; clear error when unavailable."""
    import torch

    from lib.core.errors import ConfigError

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={requested!r} but CUDA is not available",
                          hint="use --run.device=cpu or install a CUDA build of torch")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device={requested!r} but MPS is not available", hint="use --run.device=cpu")
    return device


def distributed_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables; (0, 0, 1) when not distributed."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))
