"""CPU -> GPU copies of training batches: pageable vs pinned vs pinned + non_blocking (issue 8).

    python benchmarks/bench_transfer.py                   # batches of 16 x 256² tiles (dsm + 4 masks)
    python benchmarks/bench_transfer.py --batch-size 64 --repeats 50

Pinning is only worth it where measured: this times, per batch of a float32 DSM (B, 1, H, W) and
uint8 masks (B, 4, H, W), (1) a pageable .to(device), (2) pin_memory() then .to(device) (the pin
copy counted, as the DataLoader pays it in its pin thread), (3) an already pinned batch copied with
non_blocking=True while the host builds the next batch, then a matmul on the GPU, against the
same step with a blocking copy. Prints `case  ours  peer  ratio` in GB/s or steps/s (ratio > 1: the
first is faster). Skips with its reason, exit 0, where CUDA is not available.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe, row  # noqa: E402


def make_batch(batch: int, px: int, pin: bool) -> dict:
    """dsm (B, 1, H, W) float32 and masks (B, 4, H, W) uint8 on the CPU, pinned or pageable."""
    out = {"dsm": torch.rand(batch, 1, px, px),
           "masks": torch.randint(0, 2, (batch, 4, px, px), dtype=torch.uint8)}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


def nbytes(batch: dict) -> int:
    return sum(t.numel() * t.element_size() for t in batch.values())


def seconds_per_call(fn, repeats: int) -> float:
    """Median seconds of fn() with the GPU synchronised around each call (two warm-up calls first)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy(batch: dict, device, non_blocking: bool = False) -> dict:
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tile-px", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per case; the median is kept")
    args = parser.parse_args(argv)
    print(f"# {describe()}")
    if not torch.cuda.is_available():
        print("# skipped: torch.cuda.is_available() is False (no CUDA device or a CPU-only torch build)")
        return 0
    device = torch.device("cuda")
    pageable = make_batch(args.batch_size, args.tile_px, pin=False)
    pinned = make_batch(args.batch_size, args.tile_px, pin=True)
    gb = nbytes(pageable) / 1e9
    print(f"# batch {args.batch_size} x {args.tile_px}²: {gb * 1e3:.1f} MB; median of {args.repeats}")
    print(f"{'case':28s}{'ours':>10s}{'peer':>10s}{'ratio':>7s}")

    t_page = seconds_per_call(lambda: copy(pageable, device), args.repeats)
    t_pin = seconds_per_call(lambda: copy(pinned, device), args.repeats)
    t_pin_incl = seconds_per_call(lambda: copy({k: v.pin_memory() for k, v in pageable.items()}, device),
                                  args.repeats)
    print(row("pinned vs pageable (GB/s)", gb / t_pin, gb / t_page, "copy only, already pinned"))
    print(row("pin+copy vs pageable (GB/s)", gb / t_pin_incl, gb / t_page, "pin_memory() counted"))

    a = torch.randn(4096, 4096, device=device)  # stands in for the training step on the batch

    def step(non_blocking: bool):
        """Copy this batch, let the host build the next one (as a loader does), then compute on it."""
        on_gpu = copy(pinned, device, non_blocking)
        make_batch(args.batch_size, args.tile_px, pin=False)  # host work the copy can overlap
        return (a @ a).sum() + on_gpu["dsm"].sum()

    t_async = seconds_per_call(lambda: step(True), args.repeats)
    t_sync = seconds_per_call(lambda: step(False), args.repeats)
    print(row("non_blocking vs blocking", 1 / t_async, 1 / t_sync,
              "steps/s: pinned copy, host builds the next batch, 4096² matmul"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
