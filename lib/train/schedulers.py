"""Learning-rate schedules as pure functions of the optimiser step: resuming needs only the step counter.

`lr = build_schedule(cfg.schedule, base_lr, total_steps)` gives `lr(step) -> float`, set each step with
`set_lr(optimizer, lr(step))`. A linear warmup over `warmup_steps` multiplies every schedule except
one_cycle and cyclic, which ramp up themselves. Horizon schedules (warmup_cosine, poly) decay over
[warmup_steps, total_steps] and hold their final value after it; lr(total_steps) is that final value.
`reduce_on_plateau` is the one stateful schedule: build_schedule returns a ReduceOnPlateau, which is
also callable per step, takes the monitored metric after each validation through `.step(metric)` and
goes into checkpoints through state_dict().
"""
import bisect
import difflib
import math

from lib.core.errors import ConfigError


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear ramp: (step + 1) / warmup_steps during warmup (step 0 already trains), then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _anneal(start: float, end: float, frac: float) -> float:
    """Half a cosine from `start` (frac 0) to `end` (frac 1); frac is clamped to [0, 1]."""
    frac = min(max(frac, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))


def _decay_span(cfg, total_steps: int) -> int:
    if total_steps <= cfg.warmup_steps:
        raise ConfigError(f"schedule {cfg.name!r} decays over the steps after warmup, but schedule.warmup_steps "
                          f"({cfg.warmup_steps}) is not below the total optimiser steps ({total_steps})",
                          hint=f"--schedule.warmup_steps={total_steps // 4} (a quarter of this run), or train "
                               "longer (train.epochs, train.max_steps): a small dataset has few steps per epoch")
    return total_steps - cfg.warmup_steps


def warmup_cosine(cfg, base_lr: float, total_steps: int):
    """Linear warmup to base_lr, then half a cosine down to min_lr_ratio * base_lr at total_steps."""
    w, span, low = cfg.warmup_steps, _decay_span(cfg, total_steps), cfg.min_lr_ratio * base_lr
    return lambda step: _warmup(step, w) * _anneal(base_lr, low, (step - w) / span)


def _restart_position(t: int, period: int, mult: int) -> tuple[int, int]:
    """(steps into the current period, its length) for periods period, period*mult, period*mult^2, ..."""
    if mult == 1:
        return t % period, period
    while t >= period:                               # O(log t) periods: they grow geometrically
        t, period = t - period, period * mult
    return t, period


def cosine_restarts(cfg, base_lr: float, total_steps: int):
    """SGDR: cosine from base_lr to min_lr_ratio * base_lr, restarting at each period's end."""
    w, low = cfg.warmup_steps, cfg.min_lr_ratio * base_lr
    period, mult = cfg.restart_period_steps, cfg.restart_period_mult

    def lr(step):
        t, length = _restart_position(max(step - w, 0), period, mult)
        return _warmup(step, w) * _anneal(base_lr, low, t / length)
    return lr


def one_cycle(cfg, base_lr: float, total_steps: int):
    """Cosine up from base_lr / div_factor to base_lr at pct_start * total_steps, then down to
    base_lr / div_factor / final_div_factor at total_steps (Smith & Topin)."""
    peak = round(cfg.pct_start * total_steps)
    if not 0 < peak < total_steps:
        raise ConfigError(f"schedule.pct_start ({cfg.pct_start}) x total steps ({total_steps}) must leave at "
                          f"least one step on each side of the peak, found peak step {peak}")
    start = base_lr / cfg.div_factor
    end = start / cfg.final_div_factor

    def lr(step):
        if step <= peak:
            return _anneal(start, base_lr, step / peak)
        return _anneal(base_lr, end, (step - peak) / (total_steps - peak))
    return lr


def cyclic(cfg, base_lr: float, total_steps: int):
    """Triangular cycles between min_lr_ratio * base_lr (step 0) and base_lr (cycle_half_steps)."""
    low, half = cfg.min_lr_ratio * base_lr, cfg.cycle_half_steps

    def lr(step):
        rise = 1 - abs((step % (2 * half)) / half - 1)          # 0 at the cycle start, 1 at its middle
        return low + (base_lr - low) * rise
    return lr


def step_decay(cfg, base_lr: float, total_steps: int):
    """base_lr * gamma ** (step // decay_every_steps)."""
    w, every, gamma = cfg.warmup_steps, cfg.decay_every_steps, cfg.gamma
    return lambda step: _warmup(step, w) * base_lr * gamma ** (step // every)


def multistep(cfg, base_lr: float, total_steps: int):
    """base_lr times gamma once per milestone passed (milestones in absolute steps)."""
    w, gamma, milestones = cfg.warmup_steps, cfg.gamma, list(cfg.milestone_steps)
    if any(b <= a for a, b in zip(milestones, milestones[1:])) or any(m < 0 for m in milestones):
        raise ConfigError(f"schedule.milestone_steps must be non-negative and increasing, found {milestones}")
    return lambda step: _warmup(step, w) * base_lr * gamma ** bisect.bisect_right(milestones, step)


def poly(cfg, base_lr: float, total_steps: int):
    """low + (base_lr - low) * (1 - progress) ** poly_power after warmup, low = min_lr_ratio * base_lr."""
    w, span, low, power = cfg.warmup_steps, _decay_span(cfg, total_steps), cfg.min_lr_ratio * base_lr, cfg.poly_power

    def lr(step):
        progress = min(max((step - w) / span, 0.0), 1.0)
        return _warmup(step, w) * (low + (base_lr - low) * (1 - progress) ** power)
    return lr


def constant(cfg, base_lr: float, total_steps: int):
    """base_lr after warmup."""
    w = cfg.warmup_steps
    return lambda step: _warmup(step, w) * base_lr


SCHEDULES = {
    "warmup_cosine": warmup_cosine, "cosine_restarts": cosine_restarts, "one_cycle": one_cycle,
    "cyclic": cyclic, "step": step_decay, "multistep": multistep, "poly": poly, "constant": constant,
}


class ReduceOnPlateau:
    """Multiply the LR by `factor` after more than `patience` validations without improvement.

    Same rule as torch.optim.lr_scheduler.ReduceLROnPlateau (relative threshold): `patience` bad
    validations are tolerated, the next one reduces; `cooldown` validations after a reduction are not
    counted; NaN is never an improvement. Callable per step: warmup(step) * current LR.
    """

    def __init__(self, base_lr: float, factor=0.1, patience=10, cooldown=0, min_lr=0.0, mode="max",
                 threshold=1e-4, warmup_steps=0):
        if mode not in ("max", "min"):
            raise ConfigError(f"reduce_on_plateau mode must be 'max' or 'min', found {mode!r}")
        self.factor, self.patience, self.cooldown, self.min_lr = factor, patience, cooldown, min_lr
        self.mode, self.threshold, self.warmup_steps = mode, threshold, warmup_steps
        self.lr, self.best, self.num_bad, self.cooldown_left = base_lr, None, 0, 0

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps) * self.lr

    def _improves(self, metric: float) -> bool:
        if self.best is None:
            return not math.isnan(metric)
        if self.mode == "max":
            return metric > self.best * (1 + self.threshold)
        return metric < self.best * (1 - self.threshold)

    def step(self, metric: float) -> float:
        """Record one validation's monitored value; returns the (possibly reduced) LR."""
        metric = float(metric)
        if self._improves(metric):
            self.best, self.num_bad = metric, 0
        else:
            self.num_bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            self.lr = max(self.lr * self.factor, self.min_lr)
            self.cooldown_left, self.num_bad = self.cooldown, 0
        return self.lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best, "num_bad": self.num_bad, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best = state["lr"], state["best"]
        self.num_bad, self.cooldown_left = state["num_bad"], state["cooldown_left"]


def _check_extra(cfg) -> None:
    """schedule.extra is not read: every parameter is a named key of the schedule section."""
    if cfg.extra:
        key, fields = next(iter(cfg.extra)), [k for k in vars(cfg) if k != "extra"]
        near = [f for f in fields if key in f] or difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
        raise ConfigError(f"schedule.extra.{key} is not read: schedule parameters are named keys of the "
                          f"schedule section", hint=f"use schedule.{' or schedule.'.join(near or fields)}")


def build_schedule(cfg_schedule, base_lr: float, total_steps: int, monitor_mode: str = "max"):
    """lr(step) for `cfg_schedule.name`; a ReduceOnPlateau (mode = train.monitor_mode) for reduce_on_plateau."""
    _check_extra(cfg_schedule)
    c = cfg_schedule
    if c.name == "reduce_on_plateau":
        return ReduceOnPlateau(base_lr, c.plateau_factor, c.plateau_patience, c.plateau_cooldown,
                               c.min_lr_ratio * base_lr, monitor_mode, c.plateau_threshold, c.warmup_steps)
    if c.name not in SCHEDULES:
        raise ConfigError(f"unknown schedule.name {c.name!r}",
                          hint=f"valid names: {', '.join([*SCHEDULES, 'reduce_on_plateau'])}")
    return SCHEDULES[c.name](c, base_lr, total_steps)


def set_lr(optimizer, lr: float, group_scales=None) -> None:
    """Set each param group's lr to lr * its scale: group_scales[i], else group["lr_scale"] (default 1)."""
    groups = optimizer.param_groups
    if group_scales is not None and len(group_scales) != len(groups):
        raise ValueError(f"{len(group_scales)} group scales for {len(groups)} param groups")
    for i, group in enumerate(groups):
        scale = group_scales[i] if group_scales is not None else group.get("lr_scale", 1.0)
        group["lr"] = lr * scale
