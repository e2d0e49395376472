"""Callbacks that make promises: early stopping with patience (stops, hands back the best weights, stops at
the same step after a resume) and the gradient monitor (its interval and thresholds from the config, alerts
on vanishing and exploding layers, none on parameters that cannot receive a gradient by design)."""
import logging
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config
from lib.train import runner
from lib.train.callbacks import Callback, GradientMonitor
from lib.train.checkpoint import load_checkpoint

# the tiny run over-fits its 9 val tiles from the first epoch on: val/loss rises, so early stopping ends it
STOPPING = {"train": {"epochs": 8, "early_stopping_patience": 2, "monitor": "val/loss", "monitor_mode": "min"},
            "log": {"tensorboard": False, "images_every_epochs": 0}}


class Interrupted(Exception):
    pass


class Record(Callback):
    """Keeps the trainer's last state at the end of training; optionally dies after epoch `die_after`."""
    order = 95  # after ModelCheckpoint wrote last.ckpt

    def __init__(self, die_after=None):
        self.die_after, self.end = die_after, None

    def on_epoch_end(self, trainer, metrics):
        if self.die_after is not None and trainer.epoch == self.die_after:
            raise Interrupted

    def on_train_end(self, trainer):
        self.end = {"step": trainer.step, "epoch": trainer.epoch, "reason": trainer.stop_reason,
                    "model": {k: v.clone() for k, v in trainer.raw_model.state_dict().items() if torch.is_tensor(v)}}


def train_with(monkeypatch, cfg, record, resume=None):
    build = runner.build_callbacks
    monkeypatch.setattr(runner, "build_callbacks", lambda *a: build(*a) + [record])
    return runner.train_model(cfg, resume=resume)


@pytest.fixture(scope="module")
def stopped(tiny_dataset):
    """An uninterrupted run that early stopping ends: (run dir, what Record saw at the end)."""
    with pytest.MonkeyPatch.context() as mp:
        record = Record()
        run_dir = train_with(mp, tiny_config(tiny_dataset, run={"name": "stop"}, **STOPPING), record)
    return run_dir, record.end


def test_early_stopping_stops_and_hands_back_the_best_weights(stopped):
    run_dir, end = stopped
    assert end["reason"].startswith("no improvement of val/loss for 2 validations") and end["epoch"] < 8
    best, last = (load_checkpoint(run_dir / name) for name in ("best.ckpt", "last.ckpt"))
    # best.ckpt is written inside its epoch, last.ckpt after it: the best epoch, then 2 without improvement
    assert best["epoch"] + 1 + 2 == last["epoch"] == end["epoch"]
    for name, value in best["model"].items():
        if torch.is_tensor(value):
            assert torch.equal(end["model"][name], value), name               # the best weights, not the last
    assert any(not torch.equal(v, last["model"][k]) for k, v in best["model"].items() if torch.is_tensor(v))


def test_tensorboard_hparams_show_the_best_metrics_not_the_last(tiny_dataset, monkeypatch):
    from lib.train.monitor import MonitoringSystem
    logged = {}
    monkeypatch.setattr(MonitoringSystem, "log_hparams", lambda self, hp, metrics: logged.update(metrics))
    cfg = tiny_config(tiny_dataset, run={"name": "hparams"}, **{**STOPPING, "log": {"images_every_epochs": 0}})
    run_dir = runner.train_model(cfg)
    best, last = (load_checkpoint(run_dir / name)["metrics"] for name in ("best.ckpt", "last.ckpt"))
    assert best["val/loss"] < last["val/loss"]                             # the run got worse after its best
    assert logged["val/loss"] == best["val/loss"] and logged["val/iou_mean"] == best["val/iou_mean"]


def test_early_stopping_stops_at_the_same_step_after_a_resume(stopped, tiny_dataset, monkeypatch):
    cfg = tiny_config(tiny_dataset, run={"name": "stop_resumed"}, **STOPPING)
    with pytest.raises(Interrupted):
        train_with(monkeypatch, cfg, Record(die_after=2))                   # killed with patience half used
    record = Record()
    train_with(monkeypatch, cfg, record, resume="auto")
    assert (record.end["step"], record.end["epoch"]) == (stopped[1]["step"], stopped[1]["epoch"])
    assert all(torch.equal(v, stopped[1]["model"][k]) for k, v in record.end["model"].items())


def fake_trainer(step, **grads):
    """A trainer stand-in whose model has parameters named after `grads` (None: frozen, no gradient)."""
    model = torch.nn.Module()
    for name, grad in grads.items():
        p = torch.nn.Parameter(torch.ones(3), requires_grad=grad is not None)
        p.grad = None if grad is None else torch.full((3,), grad)
        model.register_parameter(name, p)
    return SimpleNamespace(step=step, raw_model=model, monitor=None)


def test_gradient_monitor_alerts_on_vanishing_and_exploding_layers_only(caplog):
    monitor = GradientMonitor(every_steps=5, vanishing=1e-6, exploding=10.0)
    with caplog.at_level(logging.WARNING):
        monitor.on_before_optimizer_step(fake_trainer(5, fine=1.0, tiny=1e-9, huge=1e3, frozen=None))
    text = caplog.text
    assert "vanishing gradients (< 1e-06) in 1 layer(s), e.g. ['tiny']" in text
    assert "exploding gradients (> 10) in 1 layer(s), e.g. ['huge']" in text
    assert "fine" not in text and "frozen" not in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        monitor.on_before_optimizer_step(fake_trainer(7, tiny=1e-9))        # not a multiple of 5: unchecked
    assert not caplog.text


def test_gradient_monitor_takes_its_interval_and_thresholds_from_the_config(tmp_path):
    cfg = tiny_config(tmp_path, log={"grad_norms_every_steps": 3, "grad_vanishing_norm": 1e-5,
                                     "grad_exploding_norm": 7.0})
    monitors = [c for c in runner.build_callbacks(cfg, tmp_path, object(), True) if isinstance(c, GradientMonitor)]
    assert [(m.every_steps, m.vanishing, m.exploding) for m in monitors] == [(3, 1e-5, 7.0)]
    off = tiny_config(tmp_path, log={"grad_norms_every_steps": 0})
    assert not any(isinstance(c, GradientMonitor) for c in runner.build_callbacks(off, tmp_path, object(), True))


def test_a_regression_run_raises_no_gradient_alert(tiny_dataset, caplog):
    """Its threshold input is always 0: FiLM's input weights get no gradient by design, and no alert."""
    cfg = tiny_config(tiny_dataset, run={"name": "reg_alerts"}, data={"task": "regression"}, loss={"name": "huber"},
                      train={"epochs": 1}, log={"tensorboard": False, "images_every_epochs": 0,
                                                "grad_norms_every_steps": 1})
    with caplog.at_level(logging.WARNING):
        runner.train_model(cfg)
    assert "gradients" not in caplog.text, caplog.text
