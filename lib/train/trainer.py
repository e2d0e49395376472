"""The training loop. It knows the model only through build_model(cfg.model) and the task interface.

One optimiser step, read top to bottom: set the LR from the pure schedule, forward under autocast,
backward (accumulating), unscale, clip (pre-clip norm kept), skip if non-finite, step, EMA, zero_grad.
"""
import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from lib import __version__
from lib.train.callbacks import CallbackList
from lib.train.checkpoint import atomic_torch_save, rng_states, set_rng_states
from lib.core.config import config_hash, config_to_dict
from lib.core.recipe import recipe_hash
from lib.train.distributed import all_reduce_sum, broadcast_buffers, broadcast_flag
from lib.core.errors import ConfigError
from lib.models.prior import gate_loss
from lib.train.optimizers import clip_gradients
from lib.train.schedulers import set_lr

log = logging.getLogger(__name__)


def autocast_dtype(amp: str, device: torch.device):
    """bf16 where the GPU has it, fp16 (with GradScaler) on other GPUs, None (fp32) on CPU or when off."""
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


class Trainer:
    """Owns the loop state (step, epoch, cursor) and the objects a checkpoint must restore."""

    def __init__(self, cfg, raw_model, model, task, criterion, optimizer, schedule, train_loader_fn,
                 val_loader, device, run_dir, callbacks=(), monitor=None, augment=None, ema=None,
                 plateau=None, version=None):
        self.cfg, self.raw_model, self.model = cfg, raw_model, model
        self.task, self.criterion, self.optimizer = task, criterion, optimizer
        self.schedule, self.plateau = schedule, plateau
        self.train_loader_fn, self.val_loader = train_loader_fn, val_loader
        self.device, self.run_dir = device, Path(run_dir)
        self.callbacks = CallbackList(callbacks)
        self.monitor, self.augment, self.ema = monitor, augment, ema
        self.version = version or {}
        self.amp_dtype = autocast_dtype(cfg.train.amp, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epochs, self.accumulate = cfg.train.epochs, cfg.optim.accumulate_steps
        self.step = self.epoch = self.batch_in_epoch = 0
        self.batches_per_epoch = 0
        self.nonfinite_streak = 0
        self.should_stop, self.stop_reason = False, None
        self.last_metrics: dict = {}
        # transfer learning: these get no update while epoch < train.freeze_encoder_epochs
        self.frozen_params = list(raw_model.encoder_parameters()) if cfg.train.freeze_encoder_epochs else []
        self.correction_weight = cfg.loss.prior_correction_weight
        self.rule_weight = cfg.loss.prior_rule_weight
        if self.correction_weight or self.rule_weight:
            if getattr(raw_model, "prior", None) is None:
                key = "prior_correction_weight" if self.correction_weight else "prior_rule_weight"
                raise ConfigError(f"loss.{key} is a loss term on the classical prior, but the model has none",
                                  hint=f"set --model.classical_prior=true, or --loss.{key}=0")
            raw_model.prior.record_parts = True
        self.gated = getattr(raw_model, "prior", None) is not None and raw_model.prior.gate is not None

    # ---- state -------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        if not self.should_stop:
            log.info("stopping: %s", reason)
        self.should_stop, self.stop_reason = True, reason

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimiser, scaler, EMA, RNGs, data cursor."""
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "criterion": self.criterion.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "callbacks": self.callbacks.state_dict(),
            "rng": rng_states(), "task": self.task.state_dict(),
            "augment": self.augment.state_dict() if self.augment else None,
            "config": config_to_dict(self.cfg),
            "normalization": self.task.normalizer.stats(),
            "metrics": {k: float(v) for k, v in self.last_metrics.items()},
            "version": {"project": __version__, "config_hash": config_hash(self.cfg),
                        "recipe_hash": recipe_hash(self.cfg), "time": time.time(), **self.version},
        }

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.criterion.load_state_dict(state["criterion"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if self.plateau and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.callbacks.load_state_dict(state["callbacks"])
        self.task.load_state_dict(state["task"])
        if self.augment and state.get("augment"):
            self.augment.load_state_dict(state["augment"])
        self.last_metrics = dict(state.get("metrics", {}))
        set_rng_states(state["rng"])

    def save_checkpoint(self, path, best: bool = False) -> None:
        """Atomic write; with EMA enabled, the EMA weights are what best.ckpt holds as 'model'."""
        if self.is_main:
            state = self.state_dict()
            if best and self.ema:
                state["model"] = self.ema.module.state_dict()
            atomic_torch_save(state, path)

    def restore_best(self) -> None:
        """best.ckpt's weights and, so that what is reported describes what is handed back, its metrics."""
        best = self.run_dir / "best.ckpt"
        if best.exists():
            from lib.train.checkpoint import load_checkpoint
            state = load_checkpoint(best, map_location=self.device)
            self.raw_model.load_state_dict(state["model"])
            self.last_metrics = dict(state.get("metrics") or self.last_metrics)

    @property
    def is_main(self) -> bool:
        from lib.train.distributed import rank
        return rank() == 0

    # ---- loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        self.callbacks.on_train_begin(self)
        max_steps = self.cfg.train.max_steps
        while self.epoch < self.epochs and not self.should_stop:
            if self.frozen_params and self.batch_in_epoch == 0:
                frozen = self.epoch < self.cfg.train.freeze_encoder_epochs
                log.info("epoch %d: encoder %s", self.epoch + 1, "frozen" if frozen else "trained")
            self.callbacks.on_epoch_begin(self)
            self.train_one_epoch()
            if max_steps and self.step >= max_steps:
                self.request_stop(f"reached train.max_steps={max_steps}")
            last = self.should_stop or self.epoch + 1 == self.epochs
            due = (self.epoch + 1) % self.cfg.train.val_every_epochs == 0
            metrics = self.validate() if last or due else {}
            self.epoch += 1
            self.batch_in_epoch = 0
            self.callbacks.on_epoch_end(self, metrics)
            self.should_stop = broadcast_flag(self.should_stop, self.device)
        self.callbacks.on_train_end(self)
        return self.last_metrics

    def train_one_epoch(self) -> None:
        self.model.train()
        loader = self.train_loader_fn(self.epoch)
        self.batches_per_epoch = len(loader) if hasattr(loader, "__len__") else 0
        skip = self.batch_in_epoch  # resuming mid-epoch: the same (seed, epoch) order, minus what was done
        wait_start, wait_total, t0 = time.perf_counter(), 0.0, time.perf_counter()
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            wait_total += time.perf_counter() - wait_start
            logs = self.train_step(batch)
            self.batch_in_epoch = i + 1
            if logs.get("optimizer_step"):
                logs["data_wait_fraction"] = wait_total / max(time.perf_counter() - t0, 1e-9)
            self.callbacks.on_batch_end(self, logs)
            if self.cfg.train.max_steps and self.step >= self.cfg.train.max_steps:
                break
            wait_start = time.perf_counter()

    def _forward_loss(self, batch: dict):
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if self.augment is not None:
            batch = self.augment(batch)
        x, t, target, t_idx = self.task.train_inputs(batch)  # x (B,C,H,W), t (B,), target (B,1,H,W)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype \
            else contextlib.nullcontext()
        with autocast:
            out = self.model(x, t)
        loss = self.criterion(self.task.output(out.float()), target, t_idx)
        if self.correction_weight or self.rule_weight:
            correction, rule = self.raw_model.prior.pop_parts()
            if self.correction_weight:
                loss = loss + self.correction_weight * correction.float().abs().mean()
            if self.rule_weight:
                loss = loss + self.rule_weight * self.criterion(self.task.output(rule.float()), target, t_idx)
        if self.gated:
            loss = loss + gate_loss(*self.raw_model.prior.pop_gate(), target, self.cfg.model.prior_gate_target)
        return loss, x.shape[0]

    def train_step(self, batch: dict) -> dict:
        micro = self.batch_in_epoch % self.accumulate
        last_micro = micro == self.accumulate - 1
        lr = self.schedule(self.step)
        set_lr(self.optimizer, lr)
        sync = contextlib.nullcontext() if last_micro or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            loss, batch_size = self._forward_loss(batch)
            self.scaler.scale(loss / self.accumulate).backward()
        logs = {"batch_size": batch_size, "lr": lr}
        if not last_micro:
            return logs
        self.scaler.unscale_(self.optimizer)
        if self.epoch < self.cfg.train.freeze_encoder_epochs:
            for p in self.frozen_params:  # no gradient: no step, no weight decay, no optimiser state change
                p.grad = None
        self.callbacks.on_before_optimizer_step(self)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = clip_gradients(params, self.cfg.optim.clip_mode, self.cfg.optim.grad_clip)
        # One host sync per optimiser step: the guard must know before stepping.
        finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm.to(loss.device)))
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema:
                self.ema.update(self.raw_model)
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1
            log.warning("step %d skipped: non-finite loss or gradient", self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        logs.update(optimizer_step=True, loss=float(loss.detach()), grad_norm=float(grad_norm), skipped=not finite)
        return logs

    @torch.no_grad()
    def validate(self) -> dict:
        """Every validation tile at every threshold (the EMA model when enabled); all-reduced counts."""
        eval_model = self.ema.module if self.ema else self.raw_model
        eval_model.eval()
        broadcast_buffers(eval_model)  # ranks updated their BatchNorm statistics from their own batches
        metrics = self.task.metrics(self.device)
        loss_sum = torch.zeros(2, device=self.device, dtype=torch.float64)
        for batch in self.val_loader:
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            x, t, target, t_idx = self.task.eval_inputs(batch)
            pred = self.task.output(eval_model(x, t).float())
            loss_sum += torch.stack([self.criterion(pred, target, t_idx).double() * x.shape[0],
                                     torch.tensor(float(x.shape[0]), device=self.device, dtype=torch.float64)])
            self.task.update_metrics(metrics, pred, target, t_idx, batch)
        metrics.all_reduce()
        all_reduce_sum(loss_sum)
        values = {f"val/{k}": v for k, v in metrics.compute().items()}
        values["val/loss"] = float(loss_sum[0] / loss_sum[1].clamp_min(1))
        if self.plateau is not None:
            self.plateau.step(values[self.cfg.train.monitor])
        self.last_metrics = values
        self.model.train()
        self.callbacks.on_validation_end(self, values)
        return values


def steps_per_epoch(n_samples: int, batch_size: int, accumulate: int, drop_last: bool = True) -> int:
    batches = n_samples // batch_size if drop_last else math.ceil(n_samples / batch_size)
    return max(1, batches // accumulate)
