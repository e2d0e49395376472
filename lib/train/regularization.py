"""The run's regularisers in one place, and the adaptive rule that strengthens them.

Dropout/Dropout2d, DropPath and spectral norm live in the model, weight decay in the optimiser's param
groups (none on norms and biases); `CompositeRegularization` finds them, describes them at the start of
a run, and scales dropout and weight decay together. `AdaptiveRegularization` (train.adaptive_regularization)
multiplies both by train.regularization_factor when the gap between validation and training loss has
widened at two validations in a row, and logs it. Only configured regularisers grow: a dropout or weight
decay of 0 stays 0.
"""
import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from lib.train.callbacks import Callback
from lib.train.distributed import all_reduce_sum
from lib.models.blocks import DropPath

log = logging.getLogger(__name__)


class CompositeRegularization:
    """Dropout modules, DropPath modules, spectral-norm layers and weight-decay groups of one run."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_dropout: float = 0.5):
        self.dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        self.base_dropout = [m.p for m in self.dropouts]
        self.drop_path = [m.p for m in model.modules() if isinstance(m, DropPath) and m.p > 0]
        self.spectral = sum(parametrize.is_parametrized(m, "weight") for m in model.modules())
        self.decay_groups = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
        self.base_decay = [g["weight_decay"] for g in self.decay_groups]
        self.max_dropout = max_dropout
        self.scale = 1.0

    def set_scale(self, scale: float) -> None:
        """Dropout = base x scale (capped at max_dropout, never below its base); weight decay = base x scale."""
        self.scale = scale
        for m, p in zip(self.dropouts, self.base_dropout):
            m.p = max(p, min(p * scale, self.max_dropout))
        for group, wd in zip(self.decay_groups, self.base_decay):
            group["weight_decay"] = wd * scale

    def describe(self) -> str:
        dropout = sorted({round(m.p, 4) for m in self.dropouts if m.p > 0})
        decay = sorted({g["weight_decay"] for g in self.decay_groups})
        drop_path = f"up to {max(self.drop_path):g} in {len(self.drop_path)} block(s)" if self.drop_path else "none"
        return (f"regularisation: dropout {dropout or 'none'} in {len(self.dropouts)} layer(s), DropPath {drop_path}, "
                f"weight decay {decay or 'none'} on {sum(len(g['params']) for g in self.decay_groups)} tensor(s), "
                f"spectral norm on {self.spectral} layer(s)")


def build_regularization(cfg, model: nn.Module, optimizer) -> CompositeRegularization:
    """From the config: the model's and optimiser's regularisers, capped by train.max_dropout."""
    return CompositeRegularization(model, optimizer, cfg.train.max_dropout)


class AdaptiveRegularization(Callback):
    """Raise dropout and weight decay (x factor) when val loss - mean train loss grew at two validations
    in a row; the train loss is averaged over the optimiser steps since the previous validation."""

    order = 20  # after early stopping, before the checkpoint saves this state

    def __init__(self, regularization: CompositeRegularization, factor: float = 1.5):
        self.reg, self.factor = regularization, factor
        self.gaps: list[float] = []
        self.loss_sum, self.loss_steps = 0.0, 0

    def on_train_begin(self, trainer):
        self.reg.set_scale(self.reg.scale)  # a resumed run: dropout is not in the state dict

    def on_batch_end(self, trainer, logs):
        if logs.get("optimizer_step") and not logs.get("skipped"):
            self.loss_sum += logs["loss"]
            self.loss_steps += 1

    def on_validation_end(self, trainer, metrics):
        # every rank must agree, or their weight decays (and then weights) would drift apart
        totals = all_reduce_sum(torch.tensor([self.loss_sum, float(self.loss_steps)], dtype=torch.float64,
                                             device=trainer.device))
        self.loss_sum, self.loss_steps = 0.0, 0
        if totals[1] == 0 or "val/loss" not in metrics:
            return
        gap = metrics["val/loss"] - float(totals[0] / totals[1])
        self.gaps = (self.gaps + [gap])[-3:]
        if len(self.gaps) == 3 and self.gaps[0] < self.gaps[1] < self.gaps[2]:
            self.reg.set_scale(self.reg.scale * self.factor)
            log.info("val - train loss gap widened twice (%s): dropout and weight decay now x%.3g of the config",
                     " -> ".join(f"{g:.4f}" for g in self.gaps), self.reg.scale)
            self.gaps = [gap]
            if trainer.monitor:
                trainer.monitor.log_scalars({"train/regularization_scale": self.reg.scale}, trainer.step,
                                            trainer.epoch)

    def state_dict(self):
        return {"scale": self.reg.scale, "gaps": list(self.gaps), "loss_sum": self.loss_sum,
                "loss_steps": self.loss_steps}

    def load_state_dict(self, state):
        self.reg.scale, self.gaps = state["scale"], list(state["gaps"])
        self.loss_sum, self.loss_steps = state["loss_sum"], state["loss_steps"]
