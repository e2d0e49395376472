"""The batch-size finder: the largest training batch that fits in memory, found with real training steps
(doubling, then bisection) on one batch repeated to each size. The trainer is put back as it was.

Only an out-of-memory error counts as "does not fit"; any other error is a bug and propagates. That search
needs an accelerator: on CPU an allocation too large for the RAM ends in swapping or the kernel's OOM killer,
not in an exception, so there estimate_cpu_batch measures the memory a sample adds to a training step and
bounds the batch by the RAM available. lib.tune.sanity.check_batch_size turns either into a sanity check.
"""
import gc
from dataclasses import dataclass, field

import torch

from lib.tune.lr_finder import preserved_state


@dataclass
class BatchSearch:
    largest: int                  # the largest size that fits; 0 when one sample does not (CPU: the estimate)
    limit: int                    # sizes above it were not tried
    tried: list[int]              # in the order tried
    peak_mb: dict[int, float] = field(default_factory=dict)  # size -> peak MB: CUDA allocated, else process RSS
    per_sample_mb: float | None = None   # CPU: peak RSS a sample adds to a step (None: not measurable)
    available_mb: float | None = None    # CPU: RAM available when measured (/proc/meminfo MemAvailable)


def batch_count(batch: dict) -> int:
    """Samples in a batch (the leading dimension of its tensors)."""
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v))


def largest_fitting(fits, start: int = 1, limit: int = 4096) -> tuple[int, list[int]]:
    """Largest size in [start, limit] for which fits(size) is True, assuming it is monotone: doubling
    until a failure (or the limit), then bisection. Returns (size or 0, sizes tried in order)."""
    tried = []

    def attempt(size: int) -> bool:
        tried.append(size)
        return fits(size)

    if not attempt(start):
        return 0, tried
    good, bad = start, None
    while bad is None and good < limit:
        size = min(2 * good, limit)
        good, bad = (size, None) if attempt(size) else (good, size)
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if attempt(mid) else (good, mid)
    return good, tried


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or an allocator failure on another device (MPS, CPU)."""
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def try_batch(trainer, batch: dict, size: int) -> bool:
    """One real training step at `size` samples (the batch repeated); False on out-of-memory."""
    index = torch.arange(size) % batch_count(batch)
    big = {k: v[index.to(v.device)] for k, v in batch.items() if torch.is_tensor(v)}
    trainer.batch_in_epoch = trainer.accumulate - 1                 # this micro-batch steps the optimiser
    fits = True
    try:
        trainer.train_step(big)
    except RuntimeError as exc:                                    # torch.cuda.OutOfMemoryError included
        if not is_out_of_memory(exc):
            raise
        fits = False
    # Freed outside the except block: the caught exception's traceback holds the step's tensors.
    trainer.optimizer.zero_grad(set_to_none=True)
    del big
    if not fits and trainer.scaler.is_enabled():                   # an OOM inside step() leaves it half-way
        trainer.scaler = torch.amp.GradScaler("cuda", init_scale=trainer.scaler.get_scale())
    _free(trainer.device)
    return fits


def find_batch_size(trainer, batch: dict, limit: int) -> BatchSearch:
    """Largest batch whose training step fits in memory (up to `limit`), with the peak memory of each size."""
    from lib.train.monitor import process_memory_mb
    device, peak = trainer.device, {}

    def fits(size: int) -> bool:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ok = try_batch(trainer, batch, size)
        peak[size] = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
                      else process_memory_mb()["sys/rss_peak_mb"])      # MB
        return ok

    with preserved_state(trainer):
        best, tried = largest_fitting(fits, 1, limit)
    return BatchSearch(best, limit, tried, peak)


def available_memory_mb() -> float | None:
    """RAM available to new allocations (Linux MemAvailable), MB; None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return float(fields["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def estimate_cpu_batch(trainer, batch: dict, start: int, limit: int, headroom: float = 0.8) -> BatchSearch:
    """CPU: training steps at start, 2 x start, ... (up to `limit`) until the process's peak RSS grows twice
    in a row; the last growth per added sample is the per-sample memory, and the largest batch is the last
    size plus what `headroom` x the available RAM holds of such samples. An estimate: sizes above the last
    one are not tried. largest = 0 with per_sample_mb None when the peak did not grow (not measurable)."""
    from lib.train.monitor import process_memory_mb
    peak, size, grew = {}, start, 0
    with preserved_state(trainer):
        while size <= limit and grew < 2:
            if not try_batch(trainer, batch, size):
                break
            peak[size] = process_memory_mb()["sys/rss_peak_mb"]
            sizes = sorted(peak)
            grew = grew + 1 if len(sizes) > 1 and peak[sizes[-1]] > peak[sizes[-2]] else 0
            size *= 2
    sizes, available = sorted(peak), available_memory_mb()
    if grew < 2 or available is None:
        return BatchSearch(0, limit, sizes, peak, None, available)
    per_sample = (peak[sizes[-1]] - peak[sizes[-2]]) / (sizes[-1] - sizes[-2])
    largest = sizes[-1] + int(headroom * available / per_sample)
    return BatchSearch(largest, limit, sizes, peak, per_sample, available)
