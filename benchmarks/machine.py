"""What every benchmark prints first and how it times: the machine in one line, best-of-N timing.

Figures from a machine shared with other jobs are only comparable within one run: the load average
goes into the header so a reader can tell, and timings keep the best of N (other load only slows).
"""
import os
import platform
import time


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line: CPU, cores usable by this process, load average, python/numpy/torch, GPU if any."""
    import numpy as np
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}, "
            f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def best_of(fn, repeats: int) -> tuple[float, float, object]:
    """Best wall seconds, best CPU (process) seconds over `repeats` calls of fn(), and its last result."""
    walls, cpus, result = [], [], None
    for _ in range(max(1, repeats)):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def row(case: str, ours: float | None, peer: float | None, note: str = "") -> str:
    """The `case  ours  peer  ratio` line; ratio = ours / peer (rates: > 1 means ours is faster)."""
    fmt = lambda v: f"{v:10.2f}" if v is not None else f"{'n/a':>10s}"  # noqa: E731
    ratio = f"{ours / peer:7.2f}" if ours is not None and peer else f"{'n/a':>7s}"
    return f"{case:28s}{fmt(ours)}{fmt(peer)}{ratio}" + (f"   {note}" if note else "")
