"""Training-step throughput of the default model (configs/config.json): samples/s and achieved FLOP/s of
forward + loss + backward + optimiser step, next to this machine's measured matmul FLOP/s.

    python benchmarks/bench_train_step.py                            # CPU: batch 4 of 128 px (say --full)
    python benchmarks/bench_train_step.py --full --cases eager,channels_last,compile
    python benchmarks/bench_train_step.py --device cuda              # adds AMP (bf16, or fp16 + GradScaler)

FLOPs per step are counted once by torch's FlopCounterMode over one whole step (convolutions and
matmuls, 2 per multiply-add, forward and backward; element-wise ops not counted, so achieved FLOP/s is
a lower bound). The peer is a square matmul of the same dtype: roughly the best this device does.
Rows: `case  ours  peer  ratio` with ours = achieved GFLOP/s, peer = matmul GFLOP/s, ratio = the
fraction of matmul speed reached; samples/s in the note. Last row: compile against eager (samples/s).
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe, row  # noqa: E402
from lib.core.config import load_config  # noqa: E402
from lib.train.losses import build_loss  # noqa: E402
from lib.models import build_model  # noqa: E402
from lib.train.optimizers import build_optimizer  # noqa: E402

CASES = ("eager", "channels_last", "compile", "amp")


def matmul_gflops(device, dtype, n: int, reps: int) -> float:
    """Best-of-3 GFLOP/s of an (n x n) @ (n x n) matmul: 2 n^3 FLOPs each."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 * reps / best / 1e9


class Step:
    """One training step of the default model: forward under autocast, focal+Dice loss, backward, AdamW."""

    def __init__(self, cfg, device, batch: int, tile: int, case: str):
        self.device, self.case = device, case
        self.raw = build_model(cfg.model, batch_size=batch).to(device)
        self.criterion = build_loss(cfg.loss, num_thresholds=len(cfg.data.thresholds_m)).to(device)
        self.optimizer = build_optimizer(cfg.optim, self.raw)
        self.dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if case == "amp" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        memory = torch.channels_last if case == "channels_last" else torch.contiguous_format
        self.raw = self.raw.to(memory_format=memory)
        self.model = torch.compile(self.raw) if case == "compile" else self.raw
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 1, tile, tile, generator=g).to(device).contiguous(memory_format=memory)
        self.t = torch.rand(batch, generator=g).to(device)
        self.y = (torch.rand(batch, 1, tile, tile, generator=g) < 0.2).to(torch.uint8).to(device)

    def __call__(self) -> None:
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with autocast:
            logits = self.model(self.x, self.t)
        loss = self.criterion(logits.float(), self.y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def step_flops(step: Step) -> int:
    """FLOPs of one eager step (the count does not depend on memory format or compilation)."""
    model, step.model = step.model, step.raw
    with FlopCounterMode(display=False) as counter:
        step()
    step.model = model
    return counter.get_total_flops()


def time_step(step: Step, reps: int, warmup: int) -> float:
    """Best-of-3 seconds per step, after `warmup` steps (compilation happens there)."""
    sync = torch.cuda.synchronize if step.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            step()
        sync()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def run_device(cfg, device, batch: int, tile: int, cases, reps: int) -> None:
    peak = {None: matmul_gflops(device, torch.float32, 2048 if device.type == "cpu" else 8192, reps)}
    flops, rates = None, {}
    for case in cases:
        name = f"{device.type}_b{batch}_{tile}px_{case}"
        if case == "amp" and device.type != "cuda":
            print(f"# {name} skipped: AMP trains in fp32 on CPU (lib.train.trainer.autocast_dtype)")
            continue
        try:
            step = Step(cfg, device, batch, tile, case)
            flops = flops or step_flops(step)
            seconds = time_step(step, reps, warmup=3 if case == "compile" else 1)
        except Exception as exc:  # e.g. compile without a C++ compiler: report and go on
            print(f"# {name} skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
            continue
        if step.dtype not in peak:
            peak[step.dtype] = matmul_gflops(device, step.dtype, 8192, reps)
        rates[case] = batch / seconds
        note = f"{rates[case]:.2f} samples/s, {flops / 1e9:.2f} GFLOP/step, matmul {step.dtype or torch.float32}"
        print(row(name, flops / seconds / 1e9, peak[step.dtype], note))
    if "compile" in rates and "eager" in rates:
        print(row(f"{device.type}_compile_vs_eager", rates["compile"], rates["eager"], "samples/s"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/config.json", help="whose model, loss and optimiser")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--cases", default="eager,channels_last,compile,amp",
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--full", action="store_true",
                        help="on CPU too, the config's batch size and tile size (slow on a few cores)")
    parser.add_argument("--reps", type=int, default=3, help="steps per timed round (best of 3 rounds)")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; valid: {', '.join(CASES)}")
    cfg = load_config(args.config)
    print(f"# {describe()}")
    print(f"# model {cfg.model.name} base {cfg.model.base_channels} depth {cfg.model.depth}, loss {cfg.loss.name}, "
          f"optimiser {cfg.optim.name}; ours = achieved GFLOP/s, peer = matmul GFLOP/s")
    if args.device in ("all", "cpu"):
        batch, tile = (cfg.train.batch_size, cfg.data.tile_px) if args.full else (4, 128)
        run_device(cfg, torch.device("cpu"), batch, tile, cases, args.reps)
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            run_device(cfg, torch.device("cuda"), cfg.train.batch_size, cfg.data.tile_px, cases, args.reps * 10)
        else:
            print("# cuda skipped: torch.cuda.is_available() is False on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
