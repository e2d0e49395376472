"""Callbacks: side effects at fixed hooks (stopping, checkpoints, guards, progress). They read trainer
state and may set `trainer.should_stop`; they never own the math of the step.

Hooks run in ascending `order`: early stopping updates its state before the checkpoint saves it.
"""
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from lib.core.errors import TrainingError

log = logging.getLogger(__name__)


class Callback:
    order = 50

    def on_train_begin(self, trainer): pass
    def on_epoch_begin(self, trainer): pass
    def on_before_optimizer_step(self, trainer): pass
    def on_batch_end(self, trainer, logs: dict): pass
    def on_validation_end(self, trainer, metrics: dict): pass
    def on_epoch_end(self, trainer, metrics: dict): pass
    def on_train_end(self, trainer): pass
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: pass


class CallbackList:
    """Calls every callback's hook in order; saves and restores their states by class name."""

    def __init__(self, callbacks):
        self.callbacks = sorted(callbacks, key=lambda c: c.order)

    def __getattr__(self, hook):
        def call(*args, **kwargs):
            for cb in self.callbacks:
                getattr(cb, hook)(*args, **kwargs)
        return call

    def state_dict(self) -> dict:
        return {type(cb).__name__: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state: dict) -> None:
        for cb in self.callbacks:
            if type(cb).__name__ in state:
                cb.load_state_dict(state[type(cb).__name__])


def _better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved for `patience` validations, is non-finite, or diverges."""

    order = 10

    def __init__(self, monitor: str, mode: str = "max", patience: int = 10, min_delta: float = 0.0,
                 divergence_threshold: float | None = None):
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.divergence_threshold = divergence_threshold
        self.best, self.wait = None, 0

    def on_validation_end(self, trainer, metrics):
        value = metrics.get(self.monitor)
        if value is None:
            raise TrainingError(f"train.monitor {self.monitor!r} is not among the validation metrics",
                                hint=f"choose one of {sorted(metrics)}")
        if not math.isfinite(value):
            trainer.request_stop(f"{self.monitor} is {value}")
            return
        if self.divergence_threshold is not None and (
                value < self.divergence_threshold if self.mode == "max" else value > self.divergence_threshold):
            trainer.request_stop(f"{self.monitor}={value:.4g} crossed the divergence threshold")
            return
        if _better(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.patience and self.wait >= self.patience:
                trainer.request_stop(f"no improvement of {self.monitor} for {self.wait} validations")

    def on_train_end(self, trainer):
        # Whatever stopped training, the returned model is the best one seen.
        trainer.restore_best()

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state["best"], state["wait"]


class ModelCheckpoint(Callback):
    """best.ckpt on the monitored metric (+ optional top-k), last.ckpt every epoch and every N steps."""

    order = 90

    def __init__(self, run_dir, monitor: str, mode: str = "max", every_steps: int = 0, top_k: int = 0):
        self.dir = Path(run_dir)
        self.monitor, self.mode, self.every_steps, self.top_k = monitor, mode, every_steps, top_k
        self.best = None
        self.top: list[tuple[float, str]] = []

    def on_batch_end(self, trainer, logs):
        if self.every_steps and logs.get("optimizer_step") and trainer.step % self.every_steps == 0:
            trainer.save_checkpoint(self.dir / "last.ckpt")

    def on_validation_end(self, trainer, metrics):
        value = metrics.get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        if _better(value, self.best, self.mode, 0.0):
            self.best = value
            trainer.save_checkpoint(self.dir / "best.ckpt", best=True)
        if self.top_k:
            self._keep_top_k(trainer, value)

    def _keep_top_k(self, trainer, value):
        name = f"epoch{trainer.epoch:03d}_{self.monitor.replace('/', '-')}{value:.4f}.ckpt"
        self.top.append((value, name))
        self.top.sort(key=lambda item: item[0], reverse=self.mode == "max")
        if name in [n for _, n in self.top[:self.top_k]]:
            trainer.save_checkpoint(self.dir / name)
        for _, old in self.top[self.top_k:]:
            (self.dir / old).unlink(missing_ok=True)
        self.top = self.top[:self.top_k]

    def on_epoch_end(self, trainer, metrics):
        trainer.save_checkpoint(self.dir / "last.ckpt")

    def state_dict(self):
        return {"best": self.best, "top": [[v, n] for v, n in self.top]}

    def load_state_dict(self, state):
        self.best, self.top = state["best"], [(v, n) for v, n in state["top"]]


class NonFiniteGuard(Callback):
    """The trainer skips steps with NaN/Inf loss or gradients; after `max_streak` in a row, stop with an error."""

    order = 5

    def __init__(self, max_streak: int = 5):
        self.max_streak = max_streak

    def on_batch_end(self, trainer, logs):
        if trainer.nonfinite_streak >= self.max_streak:
            raise TrainingError(
                f"{trainer.nonfinite_streak} optimiser steps in a row had a non-finite loss or gradient "
                f"(step {trainer.step}); the last good checkpoint is kept",
                hint="lower optim.lr, enable optim.grad_clip, or check the data for NaN")


class GradientMonitor(Callback):
    """Every N steps: per-layer gradient norms to TensorBoard; warns on vanishing or exploding ones.

    Parameters without a gradient (requires_grad off, e.g. the FiLM threshold weights of a model whose task
    feeds no threshold: lib.models.build) are not checked: they cannot receive one by design.
    """

    def __init__(self, every_steps: int = 10, vanishing: float = 1e-7, exploding: float = 100.0):
        self.every_steps, self.vanishing, self.exploding = every_steps, vanishing, exploding

    def on_before_optimizer_step(self, trainer):
        # Step 0 is skipped: identity-initialised FiLM layers have exactly zero gradient there by design.
        if trainer.step % self.every_steps or trainer.step == 0:
            return
        names, norms = [], []
        for name, p in trainer.raw_model.named_parameters():
            if p.grad is not None:
                names.append(name)
                norms.append(torch.linalg.vector_norm(p.grad.detach().float()))
        if not norms:
            return
        values = torch.stack(norms).cpu().tolist()  # one host sync every N steps, not per layer
        if trainer.monitor:
            trainer.monitor.log_scalars({f"grad_norm/{n}": v for n, v in zip(names, values)}, trainer.step)
        small = [n for n, v in zip(names, values) if v < self.vanishing]
        big = [n for n, v in zip(names, values) if v > self.exploding]
        if small:
            log.warning("vanishing gradients (< %g) in %d layer(s), e.g. %s", self.vanishing, len(small), small[:3])
        if big:
            log.warning("exploding gradients (> %g) in %d layer(s), e.g. %s", self.exploding, len(big), big[:3])


class ProgressBar(Callback):
    """Hand-written progress: ETA, samples/s, running loss, main metric; a line per N steps off a TTY."""

    order = 95

    def __init__(self, every_steps: int = 20, stream=None):
        self.every_steps = every_steps
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.running, self.last_metric = None, ""

    def on_epoch_begin(self, trainer):
        self.start, self.samples = time.time(), 0

    def on_batch_end(self, trainer, logs):
        self.samples += logs.get("batch_size", 0)
        if "loss" in logs and math.isfinite(logs["loss"]):
            self.running = logs["loss"] if self.running is None else 0.9 * self.running + 0.1 * logs["loss"]
        if not logs.get("optimizer_step") or (not self.tty and trainer.step % self.every_steps):
            return
        elapsed = time.time() - self.start
        done, total = trainer.batch_in_epoch, trainer.batches_per_epoch
        eta = elapsed / max(done, 1) * max(total - done, 0) if total else 0
        loss = f"{self.running:.4f}" if self.running is not None else "-"
        line = (f"epoch {trainer.epoch + 1}/{trainer.epochs} [{done}/{total or '?'}] step {trainer.step} "
                f"loss {loss} lr {logs.get('lr', 0):.2e} {self.samples / max(elapsed, 1e-9):.1f} samples/s "
                f"ETA {eta:.0f}s {self.last_metric}")
        self.stream.write(("\r" + line[:150].ljust(150)) if self.tty else line + "\n")
        self.stream.flush()

    def on_validation_end(self, trainer, metrics):
        self.last_metric = f"{trainer.cfg.train.monitor} {metrics.get(trainer.cfg.train.monitor, float('nan')):.4f}"
        if self.tty:
            self.stream.write("\n")


class Profiler(Callback):
    """PyTorch profiler over the first `steps` optimiser steps; writes trace.json (chrome://tracing,
    Perfetto) and summary.txt (top operators) into `folder`."""

    order = 1

    def __init__(self, folder, steps: int):
        self.folder, self.steps = Path(folder), steps
        self.prof, self.done = None, 0

    def on_train_begin(self, trainer):
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=True)
        self.prof.start()

    def on_batch_end(self, trainer, logs):
        if self.prof is not None and logs.get("optimizer_step"):
            self.done += 1
            if self.done >= self.steps:
                self._finish(trainer)

    def on_train_end(self, trainer):
        self._finish(trainer)

    def _finish(self, trainer):
        if self.prof is None:
            return
        self.prof.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
        tmp = self.folder / ".trace.json.tmp"  # same folder, then rename: never a half-written trace
        self.prof.export_chrome_trace(str(tmp))
        os.replace(tmp, self.folder / "trace.json")
        tmp = self.folder / ".summary.txt.tmp"
        tmp.write_text(self.prof.key_averages().table(sort_by=sort, row_limit=30))
        os.replace(tmp, self.folder / "summary.txt")
        log.info("profiled %d optimiser step(s): %s", self.done, self.folder / "trace.json")
        self.prof = None
