"""LR range test (Smith, 2015): raise the LR exponentially over N real training steps, watch the loss.

The sweep runs the Trainer's own `train_step` (AMP, accumulation, clipping, augmentation), with the
schedule swapped for the exponential sweep, and puts every piece of trainer state back afterwards
(`preserved_state`), so a later `fit()` runs exactly as if the test never happened.

The stop rule uses a causal, bias-corrected EMA of the loss. An EMA lags a falling curve by about
beta / (1 - beta) steps, which would push every suggestion to a larger LR; suggestions are therefore
read from a zero-lag curve (the same EMA run forward then backward), against log10(LR).
"""
import contextlib
import copy
import math

import numpy as np
import torch

from lib.core.errors import ConfigError, DataError

SUGGESTIONS = ("valley", "steepest", "minimum")
MARKS = {"steepest": "s", "valley": "v", "minimum": "m"}


def _cpu_copy(obj):
    """Deep copy with every tensor cloned to the CPU (the snapshot must not hold device memory)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


@contextlib.contextmanager
def preserved_state(trainer):
    """Snapshot what a checkpoint holds (weights, optimiser, EMA, RNGs, cursors) plus the schedule, the
    model mode and the loader's generator; put all of it back on exit, whatever happened inside."""
    state = _cpu_copy(trainer.state_dict())
    schedule, training = trainer.schedule, trainer.model.training
    generator = getattr(trainer.train_loader_fn(trainer.epoch), "generator", None)
    generator_state = generator.get_state() if generator is not None else None
    try:
        yield
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.load_state_dict(state)
        trainer.schedule, trainer.nonfinite_streak = schedule, 0
        trainer.should_stop, trainer.stop_reason = False, None
        trainer.model.train(training)
        if generator is not None:
            generator.set_state(generator_state)


def endless_batches(trainer):
    """Training batches epoch after epoch (the sweep may need more steps than one epoch holds)."""
    epoch = trainer.epoch
    while True:
        n = 0
        for batch in trainer.train_loader_fn(epoch):
            n += 1
            yield batch
        if n == 0:
            raise DataError(f"{trainer.cfg.data.root}: the train split gives no full batch of "
                            f"{trainer.cfg.train.batch_size} samples", hint="lower train.batch_size")
        epoch += 1


def ema(values, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (fastai's smoothing): causal, lags by ~beta/(1-beta)."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def zero_lag(values, beta: float) -> np.ndarray:
    """The EMA forward then backward: a symmetric smoothing that does not shift the curve."""
    return ema(ema(values, beta)[::-1], beta)[::-1]


def lr_range_test(trainer, lr_min: float = 1e-6, lr_max: float = 1.0, steps: int = 200, beta: float = 0.9,
                  diverge: float = 4.0) -> dict:
    """Sweep lr_min -> lr_max over `steps` optimiser steps; stop when the EMA loss passes diverge x its best.

    Returns {"lr", "loss", "ema"} (one entry per optimiser step with a finite loss), "stop" (why it
    ended) and the settings. The trainer's state is restored afterwards.
    """
    if not 0 < lr_min < lr_max:
        raise ConfigError(f"LR range must satisfy 0 < lr_min < lr_max, found {lr_min} and {lr_max}")
    if steps < 2:
        raise ConfigError(f"the sweep needs at least 2 steps, found {steps}")
    start = trainer.step
    growth = (lr_max / lr_min) ** (1 / (steps - 1))
    lrs, losses, smooth = [], [], []
    avg, best, stop = 0.0, math.inf, f"reached lr_max after {steps} steps"
    with preserved_state(trainer):
        trainer.schedule = lambda step: lr_min * growth ** (step - start)
        trainer.model.train()
        for batch in endless_batches(trainer):
            logs = trainer.train_step(batch)
            trainer.batch_in_epoch += 1
            if not logs.get("optimizer_step"):
                continue
            if not math.isfinite(logs["loss"]):
                stop = f"non-finite loss at lr {logs['lr']:.2e}"
                break
            lrs.append(logs["lr"])
            losses.append(logs["loss"])
            avg = beta * avg + (1 - beta) * logs["loss"]
            smooth.append(avg / (1 - beta ** len(losses)))
            best = min(best, smooth[-1])
            if smooth[-1] > diverge * best:
                stop = f"diverged at lr {logs['lr']:.2e} (smoothed loss above {diverge:g}x its best)"
                break
            if trainer.step - start >= steps:
                break
    return {"lr": lrs, "loss": losses, "ema": smooth, "stop": stop, "beta": beta,
            "lr_min": lr_min, "lr_max": lr_max, "steps": steps}


def _longest_fall(y: np.ndarray) -> tuple[int, int] | None:
    """(first, last) index of the longest run over which y strictly falls; None when it never does."""
    falling = np.diff(y) < 0                                   # (n-1,) step i -> i+1 falls
    if not falling.any():
        return None
    edges = np.diff(np.concatenate([[0], falling.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # runs [start, end) of steps
    k = int(np.argmax(ends - starts))                          # first longest run on ties
    return int(starts[k]), int(ends[k])


def suggest(lrs, smoothed, skip: int = 0) -> dict:
    """LR suggestions read against log10(LR) on a smoothed curve; a value is None when undefined.

    steepest: where d(loss)/d(log LR) is most negative between point `skip` (the smoothing's warm-up)
    and the minimum; valley: the geometric middle of the longest stretch where the loss keeps falling;
    minimum: the LR of the lowest loss, / 10.
    """
    lr, y = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    if lr.size < 3:
        return {name: None for name in SUGGESTIONS}
    x = np.log10(lr)
    low = int(np.argmin(y))
    first = min(skip, max(low - 2, 0))
    slope = np.gradient(y[first:low + 1], x[first:low + 1]) if low - first >= 2 else np.zeros(1)
    fall = _longest_fall(y)
    return {
        "steepest": float(lr[first + int(np.argmin(slope))]) if slope.min() < 0 else None,
        "valley": float(10 ** ((x[fall[0]] + x[fall[1]]) / 2)) if fall else None,
        "minimum": float(lr[low] / 10),
    }


def warmup_points(beta: float, n: int) -> int:
    """Points at the start of the curve that the smoothing has not settled on: ~1/(1-beta), at most n/10."""
    return min(int(round(1 / (1 - beta))), n // 10)


def diagnose(result: dict, smoothed, min_points: int = 20) -> list[str]:
    """Reasons not to trust the curve: too short, flat, noisy, or still falling at lr_max."""
    y, loss = np.asarray(smoothed), np.asarray(result["loss"])
    n = len(y)
    if n < min_points:
        return [f"the sweep has only {n} points ({result['stop']}); suggestions need about {min_points}: "
                f"lower --lr-min or raise --steps"]
    warnings = []
    low = int(np.argmin(y))
    drop = y[0] - y[low]
    if drop <= 0.05 * abs(y[0]):
        warnings.append(f"the curve is flat: the smoothed loss fell by only {100 * drop / abs(y[0]):.1f}% "
                        f"over the sweep; raise --lr-max, or check that the model learns (sanity_check.py)")
    noise = float(np.std(loss[:low + 1] - y[:low + 1]))
    if noise > 0.5 * drop:
        warnings.append(f"the curve is noisy: the loss scatters by {noise:.3g} around a fall of {max(drop, 0):.3g}; "
                        f"use more steps, a larger batch or a larger --beta")
    if low >= n - 3 and not result["stop"].startswith(("diverged", "non-finite")):
        warnings.append("the loss was still falling at lr_max: raise --lr-max (minimum/10 is then too low)")
    return warnings


def choose(suggestions: dict, prefer: str = "valley") -> tuple[str, float | None]:
    """The preferred suggestion, else the first defined one in SUGGESTIONS order."""
    for name in (prefer, *SUGGESTIONS):
        if suggestions.get(name) is not None:
            return name, suggestions[name]
    return prefer, None


def describe(suggestions: dict, warnings: list[str], prefer: str = "valley") -> str:
    """Plain words: every suggestion, how far apart they are, which to use and why not to trust it."""
    s = suggestions
    parts = []
    if s["steepest"] is not None:
        parts.append(f"the loss fell fastest at {s['steepest']:.1e}")
    parts.append(f"the valley suggests {s['valley']:.1e}" if s["valley"] is not None
                 else "there is no valley (the loss never fell)")
    parts.append(f"minimum/10 gives {s['minimum']:.1e}" if s["minimum"] is not None else "no minimum")
    defined = [v for v in s.values() if v is not None]
    name, lr = choose(s, prefer)
    text = "; ".join(parts)
    text = text[:1].upper() + text[1:] + ". "
    if len(defined) >= 2:
        spread = max(defined) / min(defined)
        if spread <= 2:
            text += f"These agree within {spread:.1f}x: "
        else:
            text += f"These are {spread:.1f}x apart{' (an ambiguous curve)' if spread > 10 else ''}: "
    text += f"use {lr:.1e} ({name})." if lr is not None else "no LR can be suggested."
    return text + "".join(f"\nwarning: {w}" for w in warnings)


def analyse(result: dict, prefer: str = "valley") -> dict:
    """A sweep's zero-lag curve, suggestions, warnings, the chosen LR and the plain-words summary."""
    smoothed = zero_lag(result["loss"], result["beta"])
    suggestions = suggest(result["lr"], smoothed, warmup_points(result["beta"], len(smoothed)))
    warnings = diagnose(result, smoothed)
    name, lr = choose(suggestions, prefer)
    return {"smoothed": smoothed, "suggestions": suggestions, "warnings": warnings, "chosen": name, "lr": lr,
            "summary": describe(suggestions, warnings, prefer)}


def chart(result: dict, smoothed, suggestions: dict) -> str:
    """ASCII plot of the smoothed loss against log LR, suggestions marked, the divergent tail clipped."""
    from lib.tune.asciiplot import plot
    y = np.asarray(smoothed)
    if y.size == 0:
        return "(no point to plot: the sweep stopped at its first step)"
    top = min(float(y.max()), float(y[0]) + 0.5 * abs(float(y[0])))
    marks = {MARKS[k]: v for k, v in suggestions.items() if v is not None}
    return (plot(result["lr"], y, logx=True, marks=marks, ylim=(float(y.min()), top), xlabel="LR",
                 ylabel="smoothed loss") + "\n" + "s = steepest fall, v = valley, m = minimum/10")


def to_csv(result: dict, smoothed) -> str:
    """lr, loss, ema_loss (causal, what the stop rule saw), smoothed_loss (zero-lag, what suggestions use)."""
    rows = ["lr,loss,ema_loss,smoothed_loss"]
    rows += [f"{a:.6e},{b:.6g},{c:.6g},{d:.6g}" for a, b, c, d in
             zip(result["lr"], result["loss"], result["ema"], smoothed)]
    return "\n".join(rows) + "\n"


def log_tensorboard(folder, result: dict, smoothed, summary: str) -> None:
    """The curve per sweep step (loss, smoothed loss, LR) and the plain-words summary as text."""
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(log_dir=str(folder)) as writer:
        for i, (lr, loss, s) in enumerate(zip(result["lr"], result["loss"], smoothed)):
            writer.add_scalar("lr_finder/loss", loss, i)
            writer.add_scalar("lr_finder/smoothed_loss", s, i)
            writer.add_scalar("lr_finder/lr", lr, i)
            writer.add_scalar("lr_finder/log10_lr", math.log10(lr), i)
        writer.add_text("lr_finder/summary", summary.replace("\n", "  \n"))
